"""What a run read and how it planned, in a few hashes: a resume checks that the data, the plan
and the user set are the ones its checkpoint was trained on, and every rank checks at start that
it read what rank 0 read (a lagging shared filesystem, a rank started with another recipe)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flora_train import dist as fdist
from flora_train.config import recipe_to_yaml
from flora_train.data.examples import TokenizedExamples

# max_steps only cuts the same schedule short, so raising it to train longer is a plain resume.
PLAN_KEYS = ("train.users_per_step", "train.examples_per_user", "train.epochs", "train.seed", "data.max_examples_per_user",
             "train.retain.examples_per_user_step")


# What a resumed run computes with: a change would silently train the rest of every user's schedule
# differently from its start, so a resume refuses it whatever train.on_data_change says.
TRAINING_KEYS = ("store.optimizer.name", "store.optimizer.lr", "store.optimizer.schedule", "store.optimizer.warmup_steps",
                 "store.optimizer.min_lr_ratio", "store.optimizer.beta1", "store.optimizer.beta2", "store.optimizer.eps",
                 "store.optimizer.weight_decay", "store.optimizer.state_dtype", "store.init_seed", "adapter.method",
                 "adapter.rank", "adapter.alpha", "adapter.target_modules", "adapter.feedforward_modules", "train.precision",
                 "adapter.shared", "train.shared_phase", "train.shared_steps", "train.select", "train.validate_every_steps",
                 "train.patience", "train.sweep")


def _plain(value: Any) -> Any:
    """A recipe value as JSON keeps it (enums by value, lists as lists)."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, enum_to_str=True)
    return value.value if isinstance(value, Enum) else value


def _digest(h: "hashlib._Hash") -> str:
    return h.hexdigest()[:32]


def examples_fingerprint(*parts: TokenizedExamples | None) -> str:
    """A hash of every example's user, tokens and labels (what training sees, after bad rows)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if part is None:
            h.update(b"\x00none")
        else:
            part.update_hash(h)
    return _digest(h)


@dataclass(frozen=True)
class RunFingerprint:
    data: str
    plan: str
    users: str
    plan_keys: dict[str, Any]
    user_count: int
    training_keys: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def users_or_data_changed(self, saved: dict[str, Any] | None) -> bool:
        return bool(saved) and (saved.get("data") != self.data or saved.get("users") != self.users)

    def changes(self, saved: dict[str, Any] | None) -> list[str]:
        """What differs from a checkpoint's fingerprint, in words (empty when nothing does, or the
        checkpoint predates fingerprints)."""
        if not saved:
            return []
        out = []
        if saved.get("data") != self.data:
            out.append("the training data (examples, tokens or labels)")
        if saved.get("plan") != self.plan:
            old = saved.get("plan_keys", {})
            keys = [f"{k}: {old.get(k)} -> {v}" for k, v in self.plan_keys.items() if old.get(k) != v]
            out.append("the plan (" + ", ".join(keys or ["plan keys"]) + ")")
        if saved.get("users") != self.users:
            out.append(f"the user set ({saved.get('user_count')} -> {self.user_count} users)")
        return out

    def training_changes(self, saved: dict[str, Any] | None) -> list[str]:
        """``key: old -> new`` for every training key that differs (none for a checkpoint from
        before these keys were recorded)."""
        old = (saved or {}).get("training_keys")
        if not old:
            return []
        return [f"{k}: {old.get(k)} -> {v}" for k, v in self.training_keys.items() if k in old and old[k] != v]


def run_fingerprint(cfg: DictConfig, train: TokenizedExamples, retain: TokenizedExamples | None = None) -> RunFingerprint:
    # The retain key only counts when retain is on, so runs from before it existed still resume.
    keys = {k: OmegaConf.select(cfg, k) for k in PLAN_KEYS if retain is not None or not k.startswith("train.retain")}
    users = train.users()
    h = hashlib.blake2b(digest_size=16)
    for u in users:
        h.update(u.encode("utf-8", "surrogatepass") + b"\x00")
    plan = hashlib.blake2b(repr(sorted(keys.items())).encode(), digest_size=16)
    data = examples_fingerprint(train) if retain is None else examples_fingerprint(train, retain)
    training = {k: _plain(OmegaConf.select(cfg, k)) for k in TRAINING_KEYS}
    return RunFingerprint(data, _digest(plan), _digest(h), keys, len(users), training)


def check_ranks_agree(cfg: DictConfig, fingerprint: RunFingerprint, eval_examples: TokenizedExamples | None) -> str | None:
    """Why this rank differs from rank 0 (None when it does not). Collective: one all-gather of
    a few hashes; every rank gets every rank's answer, so all of them fail together."""
    mine = (fingerprint.data, examples_fingerprint(eval_examples), hashlib.sha256(recipe_to_yaml(cfg).encode()).hexdigest())
    everyone = fdist.all_gather_objects(mine)
    what = ("training data", "evaluation data", "recipe")
    for rank, theirs in enumerate(everyone):
        diff = [w for w, a, b in zip(what, theirs, everyone[0]) if a != b]
        if diff:
            return (f"rank {rank} read another {' and '.join(diff)} than rank 0: every rank must read the same files and "
                    "recipe (a shared filesystem that lags, or ranks started with other overrides)")
    return None

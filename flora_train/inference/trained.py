"""A frozen base with every trained user's adapter, ready to use: from a run directory (its newest
intact checkpoint), one checkpoint, or a ``--format flora`` export folder.

Users' rows stay in one table; a batch takes the rows of its distinct users and an index from each
prompt to its user, exactly as training does, so one forward serves many users.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from flora_train.adapters import AdapterLayout, AdapterSpec, inject_adapters, user_seed
from flora_train.adapters.shared import SharedAdapter
from flora_train.base import load_frozen_model, load_tokenizer, resolve_device
from flora_train.errors import UserError
from flora_train.run_dir import RunDir

log = logging.getLogger("flora_train")


class InferenceError(UserError, ValueError):
    """A source that cannot be served: not a run, checkpoint or export; a base that does not match."""


@dataclass
class Source:
    model_path: str
    gguf_file: str | None
    trust_remote_code: bool
    layout: AdapterLayout
    user_ids: list[str]
    rows: torch.Tensor  # [users, row_size] float32
    init_seed: int
    label: str  # where the adapters came from, for messages
    shared: SharedAdapter | None = None  # adapter.shared: under every user's row (the base's when None)


def _from_checkpoint(ckpt: Path, run_dir: Path) -> Source:
    from flora_train.config import load_recipe
    from flora_train.run_dir.checkpoints import (checkpoint_chain, read_shared_adapter, read_state, saved_layout,
                                                 verify_checkpoint)
    from flora_train.store.saved import read_saved_rows

    verify_checkpoint(ckpt)
    cfg = load_recipe(RunDir(run_dir).recipe)
    state = read_state(ckpt)
    layout = saved_layout(ckpt)
    ids, rows = read_saved_rows(checkpoint_chain(ckpt))
    saved = read_shared_adapter(ckpt)
    shared = None
    if saved is not None:
        shared = SharedAdapter(AdapterLayout.from_dict(json.loads(saved[1]["layout"])), saved[0]["row"])
    return Source(str(state.get("model_path") or cfg.base.name_or_path), cfg.base.gguf_file, cfg.base.trust_remote_code,
                  layout, ids, rows, cfg.store.init_seed, str(ckpt), shared)


def _from_export(folder: Path) -> Source:
    from flora_train.export import SHARED_FOLDER, load_flora_adapter

    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("format") != "flora":
        raise InferenceError(f"{folder}: a {manifest.get('format')!r} export; serve a run directory or a --format flora export")
    index = json.loads((folder / "index.json").read_text())
    layout, ids, rows = None, [], []
    for user, sub in index.items():
        user_layout, row = load_flora_adapter(folder / sub)
        if layout is not None and layout.compatible_with(user_layout):
            raise InferenceError(f"{folder / sub}: user {user!r} was exported with another layout than the others")
        layout = layout or user_layout
        ids.append(user)
        rows.append(row)
    if layout is None:
        raise InferenceError(f"{folder}: the export holds no user")
    shared = SharedAdapter(*load_flora_adapter(folder / SHARED_FOLDER)) if manifest.get("shared_adapter") else None
    return Source(str(manifest["base_model"]), manifest.get("gguf_file"), False, layout, ids, torch.stack(rows),
                  int(manifest.get("init_seed", 0)), str(folder), shared)


def resolve_source(path: Path, checkpoint: Path | None = None) -> Source:
    """Reads the adapters of a run directory, a checkpoint folder or a flora export folder."""
    from flora_train.run_dir.checkpoints import LAYOUT, latest_checkpoint

    path = Path(path)
    if checkpoint is not None:
        return _from_checkpoint(Path(checkpoint), path)
    if RunDir(path).recipe.is_file():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise InferenceError(f"{path}: no intact checkpoint to load adapters from")
        return _from_checkpoint(ckpt, path)
    if (path / LAYOUT).is_file() and RunDir(path.parent.parent).recipe.is_file():
        return _from_checkpoint(path, path.parent.parent)
    if (path / "index.json").is_file() and (path / "manifest.json").is_file():
        return _from_export(path)
    raise InferenceError(f"{path}: not a run directory (recipe.yaml), a checkpoint (layout.json) or a flora export (index.json)")


class TrainedAdapters:
    """The base with adapters injected, the tokenizer and every user's row."""

    def __init__(self, source: Source, device: str | torch.device = "auto", dtype: str = "float32") -> None:
        self.source = source
        self.device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        self.tokenizer = load_tokenizer(source.model_path, source.gguf_file, source.trust_remote_code)
        model = load_frozen_model(source.model_path, dtype, source.gguf_file, source.trust_remote_code)
        spec = source.layout.spec
        spec = AdapterSpec(spec.method, spec.rank, spec.alpha, feedforward_modules=spec.feedforward_modules)
        shared = None
        if source.shared is not None:
            s = source.shared.layout
            shared = (AdapterSpec(s.spec.method, s.spec.rank, s.spec.alpha, feedforward_modules=s.spec.feedforward_modules),
                      [m for m, _, _ in s.modules], 0)
        self.slot, layout = inject_adapters(model, spec, [m for m, _, _ in source.layout.modules], shared=shared)
        problems = layout.compatible_with(source.layout)
        if source.shared is not None:
            assert self.slot.shared is not None
            problems += [f"shared adapter {p}" for p in self.slot.shared.layout.compatible_with(source.shared.layout)]
            self.slot.shared = SharedAdapter(self.slot.shared.layout, source.shared.row.to(self.device))
        if problems:
            raise InferenceError(f"{source.label}: the adapters do not fit base {source.model_path!r}: {'; '.join(problems)}")
        self.layout = layout
        self.model = model.to(self.device).eval()
        self.rows = source.rows.to(self.device)
        self.position = {u: i for i, u in enumerate(source.user_ids)}

    @property
    def users(self) -> list[str]:
        return list(self.position)

    def __contains__(self, user: str) -> bool:
        return user in self.position

    def batch_rows(self, users: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """``(rows [distinct users, D], index [len(users)], users never trained)``. A user never
        trained gets its untrained row, which is the identity: the base model's own output."""
        unique = list(dict.fromkeys(users))
        unknown = [u for u in unique if u not in self.position]
        rows = torch.empty(len(unique), self.layout.row_size, device=self.device)
        known = [i for i, u in enumerate(unique) if u in self.position]
        if known:
            rows[known] = self.rows[[self.position[unique[i]] for i in known]]
        if unknown:
            seeds = torch.tensor([user_seed(self.source.init_seed, u) for u in unknown], dtype=torch.int64)
            rows[[i for i, u in enumerate(unique) if u not in self.position]] = self.layout.init_rows(seeds).to(self.device)
        pos = {u: i for i, u in enumerate(unique)}
        return rows, torch.tensor([pos[u] for u in users], device=self.device), unknown


def load_trained(path: str | Path, checkpoint: str | Path | None = None, device: str | torch.device = "auto",
                 dtype: str = "float32") -> TrainedAdapters:
    """The base plus every user's adapter from a run directory, a checkpoint or a flora export."""
    return TrainedAdapters(resolve_source(Path(path), Path(checkpoint) if checkpoint else None), device, dtype)

"""A run's data and tokenizer: rank 0 reads, checks and tokenises once into the run's data cache;
every rank (rank 0 included) then memory-maps the cache.

Other ranks never read the source files: they cannot disagree with rank 0 about them, and a
million examples cost them the page cache they share, not a private copy each. An error on rank
0 (a bad row, a missing file, a chat template the tokenizer lacks) is sent to every rank, so all
of them stop with the same message instead of waiting for rank 0 forever.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from omegaconf import DictConfig, OmegaConf

from flora_train import dist as fdist
from flora_train.base import ModelLoadError, build_tiny_model, load_tokenizer
from flora_train.base.fingerprint import base_fingerprint
from flora_train.base.loading import load_config
from flora_train.base.tiny import built_from, tiny_fingerprint
from flora_train.config import RecipeError
from flora_train.errors import warn
from flora_train.data import BadRows, Columns, DataError, SyntheticTask, cache, load_examples, tokenize_examples
from flora_train.data.examples import TokenizedExamples
from flora_train.data.sources import absolute_spec
from flora_train.data.persona_chat import PersonaChatTask
from flora_train.launch_env import LaunchError
from flora_train.run_dir import RunDir
from flora_train.run_dir.checkpoints import CheckpointError, list_checkpoints, read_state

PARTS = ("train", "eval", "retain", "general", "validation")
KEYS = {"train": "data.train_path", "eval": "data.eval_path", "retain": "train.retain.path", "general": "eval.general_path",
        "validation": "data.validation_path"}


@dataclass
class RunData:
    train: TokenizedExamples
    eval: TokenizedExamples | None
    retain: TokenizedExamples | None  # train.retain: user-anonymous examples mixed into users' steps
    general: TokenizedExamples | None  # eval.general_path: prompts the adapters should answer as the base does
    validation: TokenizedExamples | None  # each user's validation split (chooses kept adapters; reports nothing)
    bad_rows: BadRows
    model_path: str
    tokenizer: Any
    cache_dir: Path


def columns(cfg: DictConfig) -> Columns:
    d = cfg.data
    return Columns(user=d.user_column, text=d.text_column, prompt=d.prompt_column, completion=d.completion_column,
                   messages=d.messages_column)


def _data_paths(cfg: DictConfig, run_dir: Path) -> tuple[Any, Any, str]:
    d = cfg.data
    syn = d.synthetic
    if syn is not None:
        if syn.task.value == "persona_chat":
            chat = PersonaChatTask(syn.num_users, syn.train_examples_per_user, syn.eval_examples_per_user,
                                   syn.general_examples, syn.seed)
            paths = chat.write(RunDir(run_dir).data)
            return paths["train"], (paths["eval"] if chat.eval_examples_per_user else None), "jsonl"
        task = SyntheticTask(syn.num_users, syn.train_examples_per_user, syn.eval_examples_per_user, syn.num_keys,
                             syn.num_values, syn.seed)
        train_path, eval_path = task.write(RunDir(run_dir).data)
        return train_path, (eval_path if task.eval_examples_per_user else None), "jsonl"
    return _spec(d.train_path), (_spec(d.eval_path) if d.eval_path else None), d.format.value


def eval_is_held_out(cfg: DictConfig) -> bool:
    """The evaluation examples are ``data.eval_examples_per_user`` taken from each user's training
    examples (``hold_out``): no evaluation file was given (``_data_paths``)."""
    d = cfg.data
    given = d.synthetic.eval_examples_per_user if d.synthetic is not None else d.eval_path
    return bool(d.eval_examples_per_user) and not given


def _hold_out(users: list[str], count, stream: str) -> tuple[list[int], list[int]]:
    """(kept, held) example indices: ``count(n)`` of each user's n examples held out, drawn from a
    stream of that user's own (``stream/user``), so a user's draw never depends on other users."""
    by_user: dict[str, list[int]] = {}
    for i, u in enumerate(users):
        by_user.setdefault(u, []).append(i)
    train: list[int] = []
    held: list[int] = []
    for u, idx in by_user.items():
        k = count(len(idx))
        if k:
            random.Random(f"{stream}/{u}").shuffle(idx)
            held.extend(idx[:k])
            train.extend(idx[k:])
        else:
            train.extend(idx)
    return sorted(train), sorted(held)


def hold_out(users: list[str], k: int, seed: int) -> tuple[list[int], list[int]]:
    """Per user with more than ``k`` examples, ``k`` of them (chosen by seed) go to evaluation."""
    return _hold_out(users, lambda n: k if k and n > k else 0, f"{seed}/holdout")


def hold_out_fraction(users: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``floor(n * fraction)`` of each user's n examples go to its validation split; a user who would
    be left with no training example, or has none to spare, holds none out."""
    return _hold_out(users, lambda n: _validation_count(n, fraction), f"{seed}/validation")


def _validation_count(n: int, fraction: float) -> int:
    k = int(n * fraction)
    return k if 0 < k < n else 0


def rejoin_validation(train: TokenizedExamples, validation: TokenizedExamples, fraction: float,
                      seed: int) -> tuple[TokenizedExamples, dict[str, list[int]]]:
    """The training data as it was before ``hold_out_fraction`` took each user's validation split:
    ``train`` then ``validation`` joined, and each user's indices into that in the user's original
    order (the seeded draw is replayed per user), so a planner over them plans exactly what it would
    have planned without the split."""
    joined, offset = train.concat(validation), len(train)
    kept, held = train.by_user(), validation.by_user()
    out: dict[str, list[int]] = {}
    for u in sorted(set(kept) | set(held)):
        t_idx = [int(i) for i in kept.get(u, [])]
        v_idx = [offset + int(i) for i in held.get(u, [])]
        n = len(t_idx) + len(v_idx)
        k = _validation_count(n, fraction)
        if k != len(v_idx):
            raise DataError(f"user {u!r}: {len(v_idx)} validation examples where data.validation_fraction={fraction} "
                            f"of {n} holds out {k}; the data cache does not match the recipe")
        positions = list(range(n))  # _hold_out's draw: a shuffle depends only on the list's length
        random.Random(f"{seed}/validation/{u}").shuffle(positions)
        held_at, order = sorted(positions[:k]), [0] * n
        for rank, p in enumerate(held_at):
            order[p] = v_idx[rank]
        for rank, p in enumerate(sorted(positions[k:])):
            order[p] = t_idx[rank]
        out[u] = order
    return joined, out


def _texts(raw: datasets.Dataset) -> list[str]:
    """The corpus a tiny base is built from (its tokenizer and short pretraining)."""
    if "messages" in raw.column_names:
        return [" ".join(t["content"] for t in json.loads(m)) for m in raw["messages"]]
    if "text" in raw.column_names:
        return raw["text"]
    return [p + c for p, c in zip(raw["prompt"], raw["completion"])]


class _Build:
    """Rank 0's side: read, (build a tiny base,) tokenise and cache, unless the cache has it."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir, self.d = cfg, run_dir, cfg.data
        self.bad = BadRows(policy=self.d.on_bad_row.value)
        train_spec, eval_spec, self.fmt = _data_paths(cfg, run_dir)
        self.specs = {"train": train_spec, "eval": eval_spec, "retain": _spec(cfg.train.retain.path),
                      "general": _spec(cfg.eval.general_path), "validation": _spec(self.d.validation_path)}
        self._raw: dict[str, datasets.Dataset | None] = {}

    def split(self, part: str) -> str:
        return self.d.split if part == "train" else self.d.eval_split or self.d.split

    def raw(self, part: str) -> datasets.Dataset | None:
        if part not in self._raw:
            spec = self.specs[part]
            self._raw[part] = None if spec is None else load_examples(
                spec, self.fmt, columns(self.cfg), self.bad, self.split(part), self.d.subset, key=KEYS[part],
                anonymous=part in ("retain", "general"))
        return self._raw[part]

    def model_path(self) -> str:
        """Absolute when local: the checkpoints record it, and eval, serve and export read it from
        wherever they run (a path relative to the training's directory named another folder there)."""
        m = self.cfg.base
        if m.tiny is None:
            return str(absolute_spec(str(m.name_or_path)))
        raw = self.raw("train")
        assert raw is not None
        folder = RunDir(self.run_dir).base_model.absolute()
        tiny: dict = OmegaConf.to_container(m.tiny)  # type: ignore[assignment]
        texts = _texts(raw)
        self._keep_trained_base(folder, tiny, texts)
        return str(build_tiny_model(folder, tiny, texts))

    def _keep_trained_base(self, folder: Path, tiny: dict, texts: list[str]) -> None:
        """The run's checkpoints were trained on the tiny base in ``folder``, and generate, serve
        and export read it from there: a resume whose recipe would build another base is refused
        before it is rebuilt over the one they fit."""
        built = built_from(folder)
        if built is None or built.get("fingerprint") == tiny_fingerprint(tiny, texts):
            return
        if base_fingerprint(str(folder)) not in _trained_on(self.run_dir):
            return  # no checkpoint fits the base there (it was changed after them): building it again can only help
        before = built.get("config") or {}
        changed = [f"base.tiny.{k}: {before.get(k)} -> {tiny.get(k)}" for k in sorted(set(before) | set(tiny))
                   if before.get(k) != tiny.get(k)]
        what = "; ".join(changed) if changed else "the training data it is built from"
        raise CheckpointError(
            f"{folder}: this run's checkpoints were trained on the tiny base built here, and this recipe would build "
            f"another ({what} changed). Restore the recipe's values and data to resume, or start a new run "
            "(another run_dir, or train.overwrite=true)")

    def key(self, tokenizer: Any, context: int | None) -> str:
        d = self.d
        return cache.cache_key({
            **{part: cache.sources_digest(spec, self.split(part), d.subset, KEYS[part]) if spec is not None else None
               for part, spec in self.specs.items()},
            "format": self.fmt, "columns": vars(columns(self.cfg)), "on_bad_row": d.on_bad_row.value,
            "max_length": d.max_length, "context": context, "add_eos": d.add_eos, "hold_out": d.eval_examples_per_user,
            "validation_fraction": d.validation_fraction,
            "seed": self.cfg.train.seed, "tokenizer": cache.tokenizer_digest(tokenizer),
        })

    def write(self, folder: Path, tokenizer: Any, context: int | None) -> None:
        d = self.d
        parts = {}
        for part in PARTS:
            raw = self.raw(part)
            parts[part] = (tokenize_examples(raw, tokenizer, d.max_length, d.add_eos, self.bad, context)
                           if raw is not None else None)
        if not len(parts["train"]):
            raise DataError(f"{KEYS['train']}: no example left after tokenisation ({self.bad.summary()})")
        if eval_is_held_out(self.cfg):
            keep, held = hold_out(parts["train"]["user_id"], d.eval_examples_per_user, self.cfg.train.seed)
            parts["train"], parts["eval"] = parts["train"].select(keep), parts["train"].select(held)
        if parts["validation"] is None and d.validation_fraction:
            keep, held = hold_out_fraction(parts["train"]["user_id"], d.validation_fraction, self.cfg.train.seed)
            parts["train"], parts["validation"] = parts["train"].select(keep), parts["train"].select(held)
        cache.save(folder, parts, self.bad)


def _trained_on(run_dir: Path) -> set[str]:
    """The fingerprints of the bases this run's checkpoints were trained on."""
    found = set()
    for ckpt in list_checkpoints(run_dir):
        try:
            found.add(read_state(ckpt).get("base_fingerprint"))
        except (OSError, ValueError):
            continue  # a checkpoint cut short is no base's
    return found


def rebuild_tiny_base(cfg: DictConfig, run_dir: Path) -> str:
    """A run's ``base.tiny`` built again in its ``base_model/`` from its recipe and data, as the run
    built it (a run moved aside by ``train.overwrite`` leaves the folder to the run that replaced
    it); returns its path."""
    cfg = copy.deepcopy(cfg)
    cfg.run_dir = str(run_dir)
    return _Build(cfg, run_dir).model_path()


def _spec(value: Any) -> Any:
    return list(value) if OmegaConf.is_list(value) else value


def recipe_as_recorded(cfg: DictConfig) -> DictConfig:
    """The recipe a run writes into its directory: local data paths and the base's folder made
    absolute, so that ``eval``, ``forget --retrain-shared`` and ``serve`` find the same files from any
    working directory (relative ones named nothing, or another folder, outside the one it ran in)."""
    out = copy.deepcopy(cfg)
    for key in KEYS.values():
        value = OmegaConf.select(out, key)
        if value is not None:
            OmegaConf.update(out, key, absolute_spec(_spec(value)), merge=False)
    if out.base.tiny is None and out.base.name_or_path is not None:
        out.base.name_or_path = absolute_spec(str(out.base.name_or_path))
    return out


_PASSED_ON = {"DataError": DataError, "RecipeError": RecipeError, "LaunchError": LaunchError,
              "CheckpointError": CheckpointError}


def prepare_data(cfg: DictConfig) -> RunData:
    """Collective: every rank calls it; rank 0 does the reading and tokenising."""
    run_dir = Path(cfg.run_dir)
    m = cfg.base
    answer: tuple[str, str, str | None, str | None]
    loaded = None  # rank 0's read of a cache it found complete (read once, where it is checked)
    if fdist.rank() == 0:
        try:
            build = _Build(cfg, run_dir)
            model_path = build.model_path()
            tokenizer = load_tokenizer(model_path, m.gguf_file, m.trust_remote_code)
            context = base_context(model_path, m)
            folder = RunDir(run_dir).data_cache / build.key(tokenizer, context)
            if cache.is_complete(folder):
                try:
                    loaded = cache.load(folder)
                except cache.UnreadableCache as exc:
                    warn(f"{exc}; tokenising the data again")
                    shutil.rmtree(folder)
            if not cache.is_complete(folder):
                build.write(folder, tokenizer, context)
            answer = (str(folder), model_path, None, None)
        except Exception as exc:
            fdist.broadcast_object(("", "", type(exc).__name__, str(exc)))
            raise
        fdist.broadcast_object(answer)
    else:
        answer = fdist.broadcast_object(None)
        if answer[2] is not None:
            raise _PASSED_ON.get(answer[2], RuntimeError)(answer[3] if answer[2] in _PASSED_ON else f"rank 0 failed "
                                                          f"preparing the data: {answer[2]}: {answer[3]}")
        tokenizer = load_tokenizer(answer[1], m.gguf_file, m.trust_remote_code)
    folder = Path(answer[0])
    if not cache.is_complete(folder):
        raise LaunchError(f"rank {fdist.rank()} cannot see rank 0's data cache {folder}: put run_dir on a filesystem "
                          "every node shares")
    parts, bad = loaded if loaded is not None else cache.load(folder)
    return RunData(parts["train"], parts.get("eval"), parts.get("retain"), parts.get("general"), parts.get("validation"), bad,
                   answer[1], tokenizer, folder)


def base_context(model_path: str, m: DictConfig, local_files_only: bool = False) -> int | None:
    """The base's positions (its config's max_position_embeddings), read without its weights."""
    config = load_config(model_path, m.gguf_file, m.trust_remote_code, local_files_only=local_files_only)
    return getattr(config, "max_position_embeddings", None)


def load_eval_file(cfg: DictConfig, tokenizer: Any, path: Path, context: int | None) -> TokenizedExamples:
    """Another evaluation file (`flora-train eval --data`), read and tokenised as the recipe's data is."""
    d = cfg.data
    bad = BadRows(policy=d.on_bad_row.value)
    raw = load_examples(Path(path), "auto", columns(cfg), bad, key="--data")
    return cache.in_memory(tokenize_examples(raw, tokenizer, d.max_length, d.add_eos, bad, context))


def length_report(cfg: DictConfig) -> tuple[str, str | None]:
    """``flora-train validate``'s padding line, and a warning naming the keys to set when padding
    would take over a third of the compute: the training data tokenised (nothing is cached or
    built) and the first epoch's plan cut as the recipe cuts it."""
    if cfg.base.tiny is not None or cfg.data.synthetic is not None:
        return "# padding: estimated when the run starts (base.tiny and synthetic data are built by the run)", None
    from flora_train.data.batching import MicroBatching
    from flora_train.data.length_check import padding_report
    from flora_train.data.planner import BatchPlanner

    build, d, t = _Build(cfg, Path(cfg.run_dir)), cfg.data, cfg.train
    raw = build.raw("train")  # the data is checked whether or not the tokenizer is at hand
    assert raw is not None
    try:  # what is on this machine only: a hub id is read from the cache, never downloaded
        tokenizer = load_tokenizer(str(cfg.base.name_or_path), cfg.base.gguf_file, cfg.base.trust_remote_code,
                                   local_files_only=True)
    except ModelLoadError as exc:
        return f"# padding: not estimated ({str(exc).splitlines()[0][:300]})", None
    try:
        context = base_context(str(cfg.base.name_or_path), cfg.base, local_files_only=True)
    except ModelLoadError:
        context = None
    examples = cache.in_memory(tokenize_examples(raw, tokenizer, d.max_length, d.add_eos, build.bad, context))
    planner = BatchPlanner(examples.by_user(), t.users_per_step, t.examples_per_user, t.seed, d.max_examples_per_user)
    share, warning = padding_report(planner, examples.lengths(), MicroBatching(t.micro_batch_size, t.micro_batch_tokens,
                                                                               t.packing), d.max_length)
    return f"# padding: {share:.0%} of the tokens the base computes are real ({len(examples)} examples, the first epoch's plan)", warning

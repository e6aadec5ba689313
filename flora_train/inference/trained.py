"""A frozen base with every trained user's adapter, ready to use: from a run directory (its newest
intact checkpoint), one checkpoint, or a ``--format flora`` or ``--format packed`` export folder.

Users' rows stay in the tier they were saved in (``rows.RowSource``: a checkpoint read by slices,
an export folder per user) and are read when a batch needs them; a batch takes the rows of its
distinct users and an index from each prompt to its user, exactly as training does, so one forward
serves many users. The base is loaded in the recipe's dtype, and runs under the recipe's autocast.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flora_train.adapters import AdapterLayout, AdapterSpec, inject_adapters, user_seed
from flora_train.adapters.shared import SharedAdapter
from flora_train.base import load_frozen_model, load_tokenizer, resolve_device
from flora_train.base.fingerprint import base_changed, recorded_id_only
from flora_train.base.loading import hub_unavailable, looks_local
from flora_train.base.tiny import built_from
from flora_train.errors import UserError, warn
from flora_train.files import read_json
from flora_train.inference.rows import CheckpointRows, RowSource
from flora_train.run_dir import RunDir
from flora_train.run_dir.readers import CheckpointLease
from flora_train.train.sweep import check_chosen

log = logging.getLogger("flora_train")


class InferenceError(UserError, ValueError):
    """A source that cannot be served: not a run, checkpoint or export; a base that does not match."""


@dataclass
class Source:
    model_path: str
    gguf_file: str | None
    trust_remote_code: bool
    layout: AdapterLayout
    rows: RowSource
    init_seed: int
    label: str  # where the adapters came from, for messages
    shared: SharedAdapter | None = None  # adapter.shared: under every user's row (the base's when None)
    dtype: str = "float32"  # base.dtype of the recipe it was trained with
    precision: str = "auto"  # train.precision: the autocast it was trained (and is served) under
    max_length: int | None = None  # data.max_length: the context the adapters were trained on
    checkpoint: Path | None = None  # the checkpoint it was read from (None: an export)

    @property
    def user_ids(self) -> list[str]:
        return self.rows.users


def _from_checkpoint(ckpt: Path, run_dir: Path, lease: CheckpointLease | None = None,
                     base_at: Path | None = None) -> Source:
    """``lease``: held on ``ckpt`` already (the newest intact one, found leased); else taken here,
    so that a run training beside the reader prunes none of the checkpoint while it is served.
    ``base_at``: where the base is now (``--base``), if not where the run trained on it."""
    from flora_train.config import load_recipe
    from flora_train.run_dir.checkpoints import (
        checkpoint_chain,
        lease_checkpoint,
        read_shared_adapter,
        read_state,
        saved_layout,
        verify_checkpoint,
    )

    if lease is None:
        lease = lease_checkpoint(ckpt)
        verify_checkpoint(ckpt)
    check_chosen(ckpt)
    if (unleased := lease.warning()) is not None:
        warn(f"{ckpt}: {unleased}")
    cfg = load_recipe(RunDir(run_dir).recipe)
    state = read_state(ckpt)
    layout = saved_layout(ckpt)
    rows = CheckpointRows(checkpoint_chain(ckpt), lease)
    saved = read_shared_adapter(ckpt)
    shared = None
    if saved is not None:
        shared = SharedAdapter(AdapterLayout.from_dict(json.loads(saved[1]["layout"])), saved[0]["row"])
    tiny, recorded = cfg.base.tiny is not None, state.get("base_fingerprint")
    base = RunDir(run_dir).trained_base(state.get("model_path") or cfg.base.name_or_path, tiny)
    if base_at is not None:
        if tiny:
            raise InferenceError(f"--base: {run_dir} built its own tiny base in {base}; it takes no other")
        base = _moved_base(base_at, recorded, cfg.base.gguf_file, f"{ckpt} was trained on", base)
    else:
        changed = base_changed(recorded, base, cfg.base.gguf_file)
        if tiny and (changed or built_from(Path(base)) is None):
            from flora_train.train.data_setup import rebuild_tiny_base

            base = rebuild_tiny_base(cfg, run_dir)  # derived from the recipe and data: built again as trained
            changed = base_changed(recorded, base, cfg.base.gguf_file)
        check_base_is_there(base, ckpt, cfg.base.gguf_file)
        if changed:
            raise InferenceError(
                f"{ckpt}: trained on the base in {base} as it was then, and the config or weights there have changed "
                "since; adapters only fit the base they were trained on: put that base back, or train on this one")
    return Source(base, cfg.base.gguf_file, cfg.base.trust_remote_code,
                  layout, rows, cfg.store.init_seed, str(ckpt), shared, cfg.base.dtype, cfg.train.precision.value,
                  cfg.data.max_length, ckpt)


def _moved_base(base_at: Path, recorded: str | None, gguf_file: str | None, trained: str, trained_on: str) -> str:
    """``--base``: where the base is now, accepted only when its fingerprint is the ``recorded`` one
    (``trained_on``: the base as training named it; a hub id's files were not recorded)."""
    base = str(Path(base_at).absolute())
    if not Path(base).is_dir():
        raise InferenceError(f"--base {base_at}: no such folder")
    if recorded_id_only(recorded, trained_on, gguf_file):
        warn(f"--base {base_at}: {trained} the hub id {trained_on!r}, whose files were not recorded: taken as that "
             "model unchecked (only its layers' shapes are)")
    elif base_changed(recorded, base, gguf_file):
        raise InferenceError(f"--base {base_at}: not the base {trained} (its config or weights differ); adapters "
                             "only fit the base they were trained on")
    return base


def base_for_training_on(run_dir: Path, cfg: Any, base_at: Path | None) -> str | None:
    """Work that trains on a finished run (``forget --retrain-shared``) loads its base: the folder
    ``base_at`` names (``--base``: it must be the base the newest checkpoint was trained on), or None
    for the recipe's, refused here when it is gone. Asked before anything of the run changes: a base
    found missing after a forget had removed the shared adapter left nothing to retrain it from."""
    from flora_train.run_dir.checkpoints import latest_checkpoint, read_state

    if base_at is None:
        if cfg.base.tiny is None:
            check_base_is_there(str(cfg.base.name_or_path), run_dir, cfg.base.gguf_file)
        return None
    if cfg.base.tiny is not None:
        raise InferenceError(f"--base: {run_dir} built its own tiny base; it takes no other")
    ckpt = latest_checkpoint(run_dir)
    state = read_state(ckpt) if ckpt is not None else {}
    return _moved_base(base_at, state.get("base_fingerprint"), cfg.base.gguf_file, f"{run_dir} was trained on",
                       state.get("model_path") or str(cfg.base.name_or_path))


def check_base_is_there(base: str, trained: Path, gguf_file: str | None = None) -> None:
    """A base the adapters cannot be loaded on from here is named with the way on (``--base``), not
    as a recipe key the reader never set: a local folder that is gone (the run was copied to another
    machine, the base moved), or a hub id (an export's ``--base-model-id``, a recipe's) that this
    machine can neither download nor find in the Hugging Face cache."""
    if looks_local(base):
        if not Path(base).exists():
            raise InferenceError(f"{trained}: its base {base} is not there (moved, or on another machine?): name "
                                 "where it is now with --base PATH")
    elif (host := hub_unavailable(base, gguf_file)) is not None:
        raise InferenceError(f"{trained}: its base is the hub id {base!r}, which is not in the Hugging Face cache, and "
                             f"{host} cannot be reached from this machine: name the base's folder with --base PATH")


def _from_export(folder: Path, base_at: Path | None = None) -> Source:
    from flora_train.export import EXPORT_FORMATS, ExportError, get_format

    manifest, index = read_json(folder / "manifest.json"), read_json(folder / "index.json")
    for name, value in (("manifest.json", manifest), ("index.json", index)):
        if not isinstance(value, dict):
            raise InferenceError(f"{folder / name}: cannot be read (torn, or not an export's): export the run again")
    fmt = manifest.get("format")
    if fmt not in EXPORT_FORMATS or not EXPORT_FORMATS[fmt].servable:
        served = " or ".join(f"--format {name}" for name, e in EXPORT_FORMATS.items() if e.servable)
        raise InferenceError(f"{folder}: a {fmt!r} export is not read back; give a run directory, or a {served} export")
    if not index:
        raise InferenceError(f"{folder}: the export holds no user")
    try:
        export = get_format(fmt)
        layout, rows = export.serving_rows(folder, manifest, index)
        shared = SharedAdapter(*export.shared_adapter(folder, manifest)) if manifest.get("shared_adapter") else None
    except ExportError as exc:
        raise InferenceError(str(exc)) from None
    if "base_model" not in manifest:
        raise InferenceError(f"{folder / 'manifest.json'}: names no base_model: export the run again")
    base, recorded, gguf = str(manifest["base_model"]), manifest.get("base_fingerprint"), manifest.get("gguf_file")
    if base_at is not None:
        base = _moved_base(base_at, recorded, gguf, f"{folder} was exported from", base)
    else:
        check_base_is_there(base, folder, gguf)
        if base_changed(recorded, base, gguf):
            raise InferenceError(
                f"{folder}: exported from adapters trained on the base in {base} as it was then, and the "
                "config or weights there have changed since; adapters only fit the base they were trained on")
    return Source(base, gguf, False, layout, rows,
                  int(manifest.get("init_seed", 0)), str(folder), shared)


def resolve_source(path: Path, checkpoint: Path | None = None, base: Path | None = None) -> Source:
    """Reads the adapters of a run directory, a checkpoint folder or a flora export folder;
    ``base``: where their base is now, if it moved after training (checked to be that base)."""
    from flora_train.run_dir.checkpoints import LAYOUT, leased_latest_checkpoint

    path = Path(path)
    if checkpoint is not None:
        RunDir(path).require("--checkpoint")  # the run it must belong to
        if (foreign := RunDir(path).foreign_checkpoint_error(Path(checkpoint))) is not None:
            raise InferenceError(foreign)
        return _from_checkpoint(Path(checkpoint), path, base_at=base)
    if RunDir(path).recipe.is_file():
        RunDir(path).refuse_interrupted_forget()
        found = leased_latest_checkpoint(path)
        if found is None:
            raise InferenceError(f"{path}: no intact checkpoint to load adapters from")
        return _from_checkpoint(found[0], path, found[1], base)
    if (path / LAYOUT).is_file() and RunDir(path.parent.parent).recipe.is_file():
        RunDir(path.parent.parent).refuse_interrupted_forget()
        return _from_checkpoint(path, path.parent.parent, base_at=base)
    if (path / "index.json").is_file() and (path / "manifest.json").is_file():
        return _from_export(path, base)
    raise InferenceError(f"{path}: not a run directory (recipe.yaml), a checkpoint (layout.json) or an export "
                         "(index.json)")


def context_of(model: torch.nn.Module) -> int:
    """Positions the model has (prompt and generated tokens together), from its config."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None) or 4096


class TrainedAdapters:
    """The base with adapters injected, the tokenizer and every user's row."""

    def __init__(self, source: Source, device: str | torch.device = "auto", dtype: str | None = None) -> None:
        from flora_train.train.session import autocast_dtype_for

        self.source = source
        self.device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        self.tokenizer = load_tokenizer(source.model_path, source.gguf_file, source.trust_remote_code)
        self.dtype = dtype or source.dtype
        self.autocast_dtype = autocast_dtype_for(source.precision, self.device)
        model = load_frozen_model(source.model_path, self.dtype, source.gguf_file, source.trust_remote_code)
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
        self.rows = source.rows

    @property
    def users(self) -> list[str]:
        return self.rows.users

    @property
    def context(self) -> int:
        """Positions the base has (prompt and generated tokens together): past them a model with
        learned positions (GPT-2) indexes outside its table, and a rotary one runs untrained."""
        return context_of(self.model)

    def __contains__(self, user: str) -> bool:
        return user in self.rows

    def row(self, user: str) -> torch.Tensor:
        """A trained user's row (float32, on the CPU)."""
        return self.rows.read([user])[0]

    def batch_rows(self, users: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """``(rows [distinct users, D], index [len(users)], users never trained)``. A user never
        trained gets its untrained row, which is the identity: the base model's own output."""
        unique = list(dict.fromkeys(users))
        unknown = [u for u in unique if u not in self.rows]
        known = [u for u in unique if u in self.rows]
        got = dict(zip(known, self.rows.read(known))) if known else {}
        if unknown:
            seeds = torch.tensor([user_seed(self.source.init_seed, u) for u in unknown], dtype=torch.int64)
            got.update(zip(unknown, self.layout.init_rows(seeds)))
        rows = torch.stack([got[u] for u in unique]).to(self.device)
        pos = {u: i for i, u in enumerate(unique)}
        return rows, torch.tensor([pos[u] for u in users], device=self.device), unknown


def load_trained(path: str | Path, checkpoint: str | Path | None = None, device: str | torch.device = "auto",
                 dtype: str | None = None, base: str | Path | None = None) -> TrainedAdapters:
    """The base plus every user's adapter from a run directory, a checkpoint, or a flora, packed or peft export
    (``base``: where the base is now, if it moved after training)."""
    return TrainedAdapters(resolve_source(Path(path), Path(checkpoint) if checkpoint else None,
                                          Path(base) if base else None), device, dtype)

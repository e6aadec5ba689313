"""The formats that write the checkpoint's adapter rows as they are (peft, flora, packed): rows
are streamed from the checkpoint's shards a chunk at a time, so export memory does not grow with
the population, and each format says only how it places a user's row and the shared adapter."""

from __future__ import annotations

import json
from abc import abstractmethod
from pathlib import Path
from typing import Any

import torch

from flora_train.adapters import AdapterLayout
from flora_train.errors import warn
from flora_train.export.base import AdapterExport, ExportError, ExportRequest, select_users, write_json
from flora_train.run_dir import RunDir
from flora_train.run_dir.checkpoints import (
    CheckpointError,
    checkpoint_chain,
    lease_checkpoint,
    leased_latest_checkpoint,
    read_manifest,
    read_shared_adapter,
    read_state,
    saved_layout,
    verify_checkpoint,
)
from flora_train.run_dir.readers import CheckpointLease
from flora_train.train.sweep import check_chosen
from flora_train.store.saved import iter_saved_rows, saved_user_ids


def _checkpoint(run_dir: Path, checkpoint: Path | None, just_written: bool) -> tuple[Path, CheckpointLease]:
    """The checkpoint to export, leased: a run training beside the export prunes none of it meanwhile."""
    if checkpoint is not None:
        run = RunDir(run_dir)
        foreign = run.holds_run and run.foreign_checkpoint_error(checkpoint)
        if foreign:
            raise ExportError(foreign)
        held = lease_checkpoint(checkpoint)
        # Every byte hashed, unless this process wrote (and hashed) it a moment ago.
        verify_checkpoint(checkpoint, contents=not just_written)
        check_chosen(checkpoint)
        return checkpoint, held
    RunDir(run_dir).require("export")
    found = leased_latest_checkpoint(run_dir)  # hashed through: the newest intact one
    if found is None:
        raise CheckpointError(f"{run_dir}: no intact checkpoint to export from")
    check_chosen(found[0])
    return found


def _run_recipe(run_dir: Path) -> Any:
    recipe = RunDir(run_dir).recipe
    if not recipe.is_file():
        return None
    from flora_train.config import load_recipe

    return load_recipe(recipe)


class RowExport(AdapterExport):
    """The driver every row format shares; ``place`` and ``finish`` are the format's."""

    def check(self, layout: AdapterLayout, what: str) -> None:
        """Refuses an adapter (``what``: whose) this format cannot express."""

    @abstractmethod
    def place(self, out: Path, user: str, row: torch.Tensor, layout: AdapterLayout, base_model: str) -> None:
        """Writes (or buffers) one user's row; records where in ``self.index``."""

    def finish(self, out: Path) -> None:
        """Writes what ``place`` buffered."""

    def manifest_extra(self, layout: AdapterLayout, shared: AdapterLayout | None) -> dict[str, Any]:
        """What the format's manifest holds besides the common keys (``shared``: the shared adapter's
        layout, where the run has one)."""
        return {}

    @abstractmethod
    def write_shared(self, out: Path, layout: AdapterLayout, row: torch.Tensor, base_model: str) -> str:
        """The shared adapter once, beside the users'; returns where (the manifest's ``shared_adapter``)."""

    def export(self, request: ExportRequest) -> dict[str, Any]:
        """Writes the users' rows under ``request.out`` plus ``index.json`` and ``manifest.json``.
        Part 0 writes those two once every part's files are written (``request.gather``)."""
        ckpt, lease = _checkpoint(Path(request.run_dir), request.checkpoint, request.just_written)
        if (unleased := lease.warning()) is not None:
            warn(f"{ckpt}: {unleased}")
        with lease:
            return self._export(request, ckpt)

    def _export(self, request: ExportRequest, ckpt: Path) -> dict[str, Any]:
        out, part = request.out, request.part
        layout = saved_layout(ckpt)
        state = read_state(ckpt)
        self.check(layout, "this run's")
        selected = select_users(saved_user_ids(checkpoint_chain(ckpt)), request.users)  # every shard, any world size
        saved_shared = read_shared_adapter(ckpt)
        shared = None
        if saved_shared is not None:
            shared = (AdapterLayout.from_dict(json.loads(saved_shared[1]["layout"])), saved_shared[0]["row"])
            self.check(shared[0], "this run's shared")
        out.mkdir(parents=True, exist_ok=True)
        cfg = _run_recipe(Path(request.run_dir))
        base_model = request.base_model_id or RunDir(request.run_dir).trained_base(
            state.get("model_path"), cfg is not None and cfg.base.tiny is not None)
        self.index: dict[str, Any] = {}
        self.part = part
        error = None
        try:
            for chunk_users, chunk_rows in iter_saved_rows(checkpoint_chain(ckpt), set(selected), part=part):
                for user, row in zip(chunk_users, chunk_rows):
                    self.place(out, user, row, layout, base_model)
            self.finish(out)
        except OSError as exc:  # a full disk on one rank: every rank stops, none waits in the gather
            error = f"rank {part[0]}: writing the export to {out} failed: {exc}"
        pieces = request.gather((self.index, error))
        failed = [e for _, e in pieces if e]
        if failed:
            raise ExportError("; ".join(failed))
        merged = {u: where for piece, _ in pieces for u, where in piece.items()}
        index = {u: merged[u] for u in selected}  # the caller's order (or the checkpoint's), not the shards'
        manifest = {"format": self.name, "method": layout.spec.method, "rank": layout.spec.rank, "num_users": len(index),
                    "users_per_part": [len(p) for p, _ in pieces], "checkpoint": str(ckpt.absolute()), "base_model": base_model,
                    "run_id": read_manifest(ckpt).get("run_id"),  # which run: the run directory may move
                    # what loading the base and the untrained rows needs beyond its path (serving an export)
                    **({} if cfg is None else {"gguf_file": cfg.base.gguf_file, "init_seed": cfg.store.init_seed}),
                    # the trained base's identity, so that serving the export finds a changed base (not for an
                    # id named by --base-model-id: that is another name for it)
                    **({} if request.base_model_id else {"base_fingerprint": state.get("base_fingerprint")}),
                    **self.manifest_extra(layout, None if shared is None else shared[0])}
        if part[0] == 0 and shared is not None:
            manifest["shared_adapter"] = self.write_shared(out, *shared, base_model)
        if part[0] == 0:
            # each in one rename: a server reading this folder sees the old index or the new, never half
            write_json(out / "manifest.json", manifest)
            write_json(out / "index.json", index)
        return manifest

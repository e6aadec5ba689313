"""Writing a checkpoint (the format is ``checkpoints.py``'s): every rank its shard, rank 0 the
shared files and, last, the manifest, in a temporary folder renamed into place; a delta where the
chain allows one; nothing where the newest checkpoint already holds the same."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from flora_train import dist as fdist
from flora_train.adapters import AdapterLayout
from flora_train.files import save_tensors
from flora_train.run_dir.checkpoints import (
    LAYOUT,
    MANIFEST,
    SHARD_PLAN,
    SHARED_ADAPTER,
    TRAINER_STATE,
    CheckpointError,
    _fsync,
    file_entry,
    prune_checkpoints,
    read_shared_adapter,
    read_state,
    verify_checkpoint,
)
from flora_train.store.sharded import ShardedAdapterStore


def _delta_parent(root: Path, saved_at: str | None, full_every: int, run_id: str | None) -> list[str]:
    """The chain a new delta would extend (oldest first), or [] when it must be full: no parent
    the store is known to equal, a parent that is not intact or of another run, or a chain
    ``full_every`` long."""
    if not saved_at or full_every <= 1:
        return []
    try:
        manifest = verify_checkpoint(root / saved_at, contents=False)
    except CheckpointError:
        return []
    if manifest.get("run_id") != run_id:
        return []
    chain = manifest.get("chain") or [saved_at]
    return chain if len(chain) < full_every else []


def save_checkpoint(
    run_dir: Path, step: int, store: ShardedAdapterStore, layout: AdapterLayout, trainer_state: dict[str, Any], keep: int,
    full_every: int = 1, run_id: str | None = None, shared: tuple[dict[str, Any], dict[str, str]] | None = None,
) -> Path:
    """Every rank writes and hashes its own shard in parallel; rank 0 adds the shared files and the
    manifest, then renames the folder into place. Collective: all ranks call it together.
    ``full_every`` > 1: a delta on the previous checkpoint unless that would make the chain longer.
    ``run_id``: the run it belongs to (in the manifest; deltas and pruning stay inside the run).
    ``shared``: the shared adapter's ``(tensors, metadata)``, whole in every checkpoint (one row)."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if _saved_already(final, store, trainer_state, shared):
        return final
    # Every rank's store must equal the same parent for a delta; rank 0 decides for all.
    same_parent = len(set(fdist.all_gather_objects(store.saved_at))) == 1
    chain: list[str] = []
    if fdist.rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        if same_parent and store.saved_at != final.name:
            chain = _delta_parent(root, store.saved_at, full_every, run_id)
    chain = fdist.broadcast_object(chain)
    fdist.barrier()
    entries: dict[str, Any] = {}
    error = None
    try:
        for name in store.save_shard(tmp, {"layout": json.dumps(layout.to_dict())}, delta=bool(chain)):
            entries[name] = file_entry(tmp / name)
    except OSError as exc:  # ENOSPC and friends: reported, the previous checkpoint stays the latest
        error = f"rank {fdist.rank()}: writing checkpoint {final.name} failed: {exc}"
    gathered = fdist.all_gather_objects((entries, error))
    errors = [e for _, e in gathered if e]
    if fdist.rank() == 0:
        try:
            if not errors:
                _finish(tmp, final, step, store, layout, trainer_state, {k: v for ent, _ in gathered for k, v in ent.items()},
                        [*chain, final.name] if chain else [], store.plan_saved_in if store.plan_saved_in in chain else None,
                        run_id, shared)
        except OSError as exc:
            errors.append(f"rank 0: finishing checkpoint {final.name} failed: {exc}")
        if errors:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            prune_checkpoints(root, keep, run_id)
    errors = fdist.broadcast_object(errors)  # rank 0 has the final word (it may have failed finishing)
    if errors:
        raise CheckpointError("; ".join(errors))
    store.mark_saved(final.name)
    if store.plan_saved_in not in chain:
        store.plan_saved_in = final.name
    return final


def _saved_already(final: Path, store: ShardedAdapterStore, trainer_state: dict[str, Any],
                   shared: tuple[dict[str, Any], dict[str, str]] | None) -> bool:
    """Whether ``final`` holds what this save would write: every rank's rows are as saved in it or
    restored from it, and its trainer state and shared adapter are these (a resume of a finished
    run; a preemption before a resumed run's first step). Writing it again would replace a whole
    checkpoint, a full one where it was a delta, under its readers for nothing. Collective."""
    if not all(fdist.all_gather_objects(store.saved_at == final.name and store.unchanged_since_saved())):
        return False
    same = False
    if fdist.rank() == 0:
        try:
            verify_checkpoint(final, contents=False)  # hashed when it was restored or written
            same = read_state(final) == json.loads(json.dumps(trainer_state)) and _same_tensors(
                read_shared_adapter(final), shared)
        except (CheckpointError, OSError, ValueError):  # not intact: written again
            same = False
    return bool(fdist.broadcast_object(same))


def _same_tensors(a: tuple[dict[str, Any], dict[str, str]] | None,
                  b: tuple[dict[str, Any], dict[str, str]] | None) -> bool:
    if a is None or b is None:
        return a is b
    return a[1] == b[1] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], v) for k, v in b[0].items())


def _finish(tmp: Path, final: Path, step: int, store: ShardedAdapterStore, layout: AdapterLayout,
            trainer_state: dict[str, Any], files: dict[str, Any], chain: list[str], plan_in: str | None,
            run_id: str | None, shared_adapter: tuple[dict[str, Any], dict[str, str]] | None = None) -> None:
    """``plan_in``: the checkpoint of the chain that already holds this shard plan (a delta with no
    user added since names it instead of writing it again)."""
    shared = {LAYOUT: layout.to_dict(), TRAINER_STATE: trainer_state}
    if plan_in is None:
        shared[SHARD_PLAN] = store.plan.to_dict()
    for name, obj in shared.items():
        (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False))
        files[name] = file_entry(tmp / name)
    if shared_adapter is not None:
        save_tensors(shared_adapter[0], tmp / SHARED_ADAPTER, metadata=shared_adapter[1])
        files[SHARED_ADAPTER] = file_entry(tmp / SHARED_ADAPTER)
    manifest = {"step": step, "world": store.world, "users": len(store), "files": dict(sorted(files.items()))}
    if run_id is not None:
        manifest["run_id"] = run_id
    if chain:
        manifest.update(kind="delta", parent=chain[-2], chain=chain)
    if plan_in is not None:
        manifest["shard_plan_in"] = plan_in
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _fsync(tmp / MANIFEST)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)

"""Atomic checkpoints of the adapter store and the trainer state.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN`` holding one store shard per rank
(``store-RRRRR-of-WWWWW.safetensors``: rows, optimizer moments and per-row step counters, with
``users-RRRRR-of-WWWWW.json``), ``shard_plan.json``, ``layout.json``, ``trainer_state.json`` and,
written last, ``manifest.json`` with each file's size and SHA-256. It is assembled under a
temporary name, fsynced, then renamed into place, so a crash mid-write leaves the previous
checkpoint as the latest valid one. Only safetensors and JSON are read back. The run directory
must be shared by all ranks (as on any cluster file system).

Every manifest carries the ``run_id`` of the run that wrote it: a delta builds only on a parent of
its own run, a chain with a member of another run is refused, and pruning deletes only the run's
own checkpoints. A reader that passes over a newer broken checkpoint says so, naming it.

Incremental: a checkpoint may be a *delta* that holds only the users whose rows changed since
the checkpoint before it (its ``parent``); its manifest lists the ``chain`` from the last full
checkpoint to itself, and restoring reads the chain oldest first, the newest copy of each user
winning. Every ``full_every``-th checkpoint of a chain is full again (compaction), and pruning
never deletes a checkpoint a kept one builds on.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open

from flora_train import dist as fdist
from flora_train.adapters import AdapterLayout
from flora_train.errors import UserError, warn
from flora_train.run_dir import readers
from flora_train.store.sharded import ShardedAdapterStore
from flora_train.store.sharding import ShardError, ShardPlan

MANIFEST = "manifest.json"
LAYOUT = "layout.json"
TRAINER_STATE = "trainer_state.json"
SHARD_PLAN = "shard_plan.json"
SHARED_ADAPTER = "shared_adapter.safetensors"  # adapter.shared: its row, moments and phase (rank 0 writes it)


class CheckpointError(UserError, RuntimeError):
    pass


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such checkpoint folder") from None
        inside = list_checkpoints(path)
        if inside:  # a run directory (or its checkpoints/) given where one checkpoint is asked
            raise CheckpointError(f"{path}: a folder of checkpoints, not one; name one of them, e.g. {inside[-1]}") from None
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / MANIFEST}: corrupt manifest ({exc})") from None


def read_state(path: Path) -> dict[str, Any]:
    """The trainer state a checkpoint was written with (step, run id, fingerprints, phase)."""
    return json.loads((path / TRAINER_STATE).read_text())


def read_shared_adapter(path: Path) -> tuple[dict[str, Any], dict[str, str]] | None:
    """A checkpoint's shared adapter ``(tensors, metadata)``, or None when the run has none."""
    file = path / SHARED_ADAPTER
    if not file.is_file():
        return None
    with safe_open(str(file), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def saved_layout(path: Path) -> AdapterLayout:
    return AdapterLayout.from_dict(json.loads((path / LAYOUT).read_text()))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_entry(path: Path) -> dict[str, Any]:
    _fsync(path)
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def fsync_dir(path: Path) -> None:
    _fsync(path)


def verify_checkpoint(path: Path, contents: bool = True, chain: bool = True) -> dict[str, Any]:
    """The manifest of a complete, intact checkpoint; raises ``CheckpointError`` naming the bad file.

    ``contents=False`` checks that every file is there at its recorded size without hashing it
    (a read of every byte: gigabytes for LoRA on every layer of many users). ``chain=False`` checks
    this folder's own files, not the checkpoints a delta builds on (a caller checking them all)."""
    manifest = read_manifest(path)
    for name, info in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: file {name} listed in the manifest is missing")
        if f.stat().st_size != info["bytes"] or (contents and _sha256(f) != info["sha256"]):
            raise CheckpointError(f"{f}: does not match the manifest (corrupt or partial)")
    for name in manifest.get("chain", [])[:-1] if chain else []:  # a delta is only as good as what it builds on
        member = path.parent / name
        try:
            theirs = verify_checkpoint(member, contents).get("run_id")
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: builds on {name}, which is not intact ({exc})") from None
        if theirs != manifest.get("run_id"):
            raise CheckpointError(f"{path}: builds on {name}, which another run wrote (run {theirs}, not "
                                  f"{manifest.get('run_id')}); refusing to restore a chain that mixes two runs")
    return manifest


def checkpoint_chain(path: Path) -> list[Path]:
    """The checkpoints ``path`` is made of, oldest first: itself when it is full, else the full
    checkpoint its deltas build on and each delta up to it (``chain`` in its manifest)."""
    try:
        chain = read_manifest(path).get("chain")
    except CheckpointError:
        chain = None
    return [path.parent / name for name in chain] if chain else [path]


def list_checkpoints(run_dir_or_root: Path) -> list[Path]:
    root = run_dir_or_root if run_dir_or_root.name == "checkpoints" else run_dir_or_root / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def holds_checkpoints(run_dir: Path) -> bool:
    """Whether a run already wrote checkpoints here (intact or not)."""
    return bool(list_checkpoints(run_dir))


def _newest_intact(run_dir: Path, warn_skipped: bool,
                   take_lease: bool) -> tuple[Path, readers.CheckpointLease | None] | None:
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        held = None
        if take_lease:
            held = readers.lease(checkpoint_chain(path))
            if held is None:  # pruned since it was listed: not broken, and not worth a word
                continue
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            if held is not None:
                held.close()
            skipped.append(str(exc))
            continue
        if skipped and warn_skipped:
            for why in skipped:
                warn(f"skipping a broken checkpoint: {why}")
            warn(f"using {path}, the newest intact checkpoint")
        return path, held
    return None


def latest_checkpoint(run_dir: Path, warn_skipped: bool = True) -> Path | None:
    """The newest checkpoint that verifies. Newer broken ones are passed over, each named in a
    warning (a reader never falls back in silence)."""
    found = _newest_intact(run_dir, warn_skipped, take_lease=False)
    return found[0] if found is not None else None


def leased_latest_checkpoint(run_dir: Path, warn_skipped: bool = True) -> tuple[Path, readers.CheckpointLease] | None:
    """``latest_checkpoint`` for a reader beside a training run, with a lease that keeps pruning off
    it (and off what it builds on) until released. Each candidate is leased before its bytes are
    hashed, so it cannot vanish midway."""
    found = _newest_intact(run_dir, warn_skipped, take_lease=True)
    if found is None:
        return None
    path, held = found
    assert held is not None
    return path, held


def lease_checkpoint(path: Path) -> readers.CheckpointLease:
    """A lease on a checkpoint a reader named (``--checkpoint``); an error if it was pruned."""
    held = readers.lease(checkpoint_chain(path))
    if held is None:
        raise CheckpointError(f"{path}: not there (pruned by its run since: train.keep_checkpoints)")
    return held


def prune_checkpoints(root: Path, keep: int, run_id: str | None = None) -> None:
    """Keeps the newest ``keep`` complete checkpoints of run ``run_id`` and every checkpoint they
    build on; never deletes the newest complete one, nor another run's, nor one a reader leases
    (``readers.py``: `serve`, `export`, `generate` beside the run) or that a leased one builds on.

    Complete means every file at its manifest size: their bytes were hashed when written and are
    hashed again before anything reads them, so pruning does not re-read every checkpoint."""
    valid = []
    for path in reversed(list_checkpoints(root)):
        try:
            if verify_checkpoint(path, contents=False).get("run_id") == run_id:
                valid.append(path)
        except CheckpointError:
            continue
    kept = valid[: max(keep, 1)]
    needed = {p.name for p in kept}
    for path in kept:  # and everything a kept delta builds on
        try:
            needed.update(json.loads((path / MANIFEST).read_text()).get("chain", []))
        except (OSError, ValueError):
            pass
    for path in valid[max(keep, 1) :]:  # newest first: a leased delta keeps what it builds on
        if path.name not in needed and not readers.prune(path):
            needed.update(member.name for member in checkpoint_chain(path))


def read_layout(path: Path, layout: AdapterLayout) -> None:
    saved = saved_layout(path)
    problems = layout.compatible_with(saved)
    if problems:
        raise CheckpointError(f"{path}: made for another model or adapter ({'; '.join(problems)}); refusing to load")


def plan_file(path: Path) -> Path:
    """Where checkpoint ``path``'s shard plan is: its own file, or that of the chain member its
    manifest names (``shard_plan_in``)."""
    try:
        holder = json.loads((path / MANIFEST).read_text()).get("shard_plan_in")
    except (OSError, ValueError):
        holder = None
    return (path.parent / holder if holder else path) / SHARD_PLAN


def _saved_plan(path: Path) -> ShardPlan:
    source = plan_file(path)
    try:
        return ShardPlan.from_dict(json.loads(source.read_text()), str(source))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source}: unreadable shard plan ({exc})") from None


def saved_users(path: Path) -> set[str]:
    """Every user checkpoint ``path`` holds a row of (its shard plan's users): a user of the data
    missing here was never saved or was forgotten, and has no adapter of its own."""
    return set(_saved_plan(path).owners)


def restore_plan(path: Path, world: int, user_tokens: dict[str, int]) -> tuple[ShardPlan, set[str]]:
    """The checkpoint's own shard plan when the world size is unchanged (every user keeps its
    owner), else a fresh balanced packing of the saved users and the data's users onto ``world``.
    Also returns the users new in the data (they get fresh rows)."""
    saved = _saved_plan(path)
    fresh = set(user_tokens).difference(saved.owners)
    if saved.world == world:
        saved.add_users(user_tokens)
        return saved, fresh
    tokens = {u: 0 for u in saved.owners}
    tokens.update(user_tokens)
    return ShardPlan.balanced(tokens, world), fresh


def load_checkpoint(path: Path, store: ShardedAdapterStore, layout: AdapterLayout, user_tokens: dict[str, int],
                    verified: bool = False) -> dict[str, Any]:
    """Restores the store from ``path`` (saved at any world size; rows are re-partitioned), after
    checking it is intact (unless the caller just did: ``verified``, as ``latest_checkpoint`` does)
    and made for the same adapter layout. Collective: either every rank restores or every rank
    raises, so no run starts on a half-restored store."""
    error, state = None, {}
    try:
        manifest = verify_checkpoint(path, contents=not verified)
        read_layout(path, layout)
        plan, fresh = restore_plan(path, store.world, user_tokens)
        store.load_shards(checkpoint_chain(path), plan, fresh)
        unchanged = not fresh and json.loads(plan_file(path).read_text())["world"] == store.world
        store.plan_saved_in = plan_file(path).parent.name if unchanged else None
        if len(plan.owners) - len(fresh) != manifest.get("users"):
            raise CheckpointError(f"{path}: the shard plan names {len(plan.owners) - len(fresh)} users, the manifest {manifest.get('users')}")
        state = read_state(path)
    except (CheckpointError, ShardError, ValueError, OSError) as exc:
        error = f"rank {fdist.rank()}: {exc}" if fdist.world_size() > 1 else str(exc)
    fdist.raise_if_any_failed(error, CheckpointError)
    return state

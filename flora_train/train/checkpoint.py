"""Atomic checkpoints of the adapter store and the trainer state.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN`` holding ``store.safetensors`` (rows,
optimizer moments and per-row step counters), ``users.json``, ``layout.json``,
``trainer_state.json`` and, written last, ``manifest.json`` with each file's size and SHA-256.
It is assembled under a temporary name, fsynced, then renamed into place, so a crash mid-write
leaves the previous checkpoint as the latest valid one. Only safetensors and JSON are read back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from flora_train.adapters import AdapterLayout
from flora_train.store import AdapterStore

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    pass


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


def save_checkpoint(
    run_dir: Path, step: int, store: AdapterStore, layout: AdapterLayout, trainer_state: dict[str, Any], keep: int
) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        store.save(tmp, metadata={"layout": json.dumps(layout.to_dict())})
        (tmp / "layout.json").write_text(json.dumps(layout.to_dict()))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:
            _fsync(tmp / name)
        manifest = {"step": step, "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _fsync(tmp / MANIFEST)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(root, keep)
    return final


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest of a complete, intact checkpoint; raises ``CheckpointError`` naming the bad file."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path}: corrupt manifest ({exc})") from None
    for name, info in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: file {name} listed in the manifest is missing")
        if f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{f}: does not match the manifest (corrupt or partial)")
    return manifest


def list_checkpoints(run_dir_or_root: Path) -> list[Path]:
    root = run_dir_or_root if run_dir_or_root.name == "checkpoints" else run_dir_or_root / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; newer broken ones are passed over."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError:
            continue
        return path
    return None


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keeps the newest ``keep`` valid checkpoints; never deletes the newest valid one."""
    valid = []
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
            valid.append(path)
        except CheckpointError:
            continue
    for path in valid[max(keep, 1) :]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path, store: AdapterStore, layout: AdapterLayout) -> dict[str, Any]:
    """Restores the store from ``path`` after checking that it was made for the same adapter layout."""
    verify_checkpoint(path)
    saved = AdapterLayout.from_dict(json.loads((path / "layout.json").read_text()))
    problems = layout.compatible_with(saved)
    if problems:
        raise CheckpointError(f"{path}: made for another model or adapter ({'; '.join(problems)}); refusing to load")
    store.load(path)
    return json.loads((path / "trainer_state.json").read_text())

"""Rewriting a checkpoint in place, crash-safely (``flora-train forget``; collapsing a sweep).

A checkpoint is never edited where it lies: a copy ``.rewrite-NAME`` is edited and re-manifested,
then swapped in by two renames (NAME -> .replaced-NAME, .rewrite-NAME -> NAME) and the old copy
removed. ``recover_rewrites`` finishes or undoes a swap a crash interrupted, so at every instant
exactly one intact copy of each checkpoint can be found, and a second run completes the first.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from flora_train.run_dir.checkpoints import MANIFEST, CheckpointError, _fsync, file_entry, read_manifest, verify_checkpoint


def _rewrite_names(ckpt: Path) -> tuple[Path, Path]:
    return ckpt.parent / f".rewrite-{ckpt.name}", ckpt.parent / f".replaced-{ckpt.name}"


def recover_rewrites(root: Path) -> list[str]:
    """Completes (or undoes) every interrupted rewrite under ``root``; returns what it did."""
    done = []
    if not root.is_dir():
        return done
    for old in sorted(root.glob(".replaced-step-*")):
        ckpt = root / old.name[len(".replaced-"):]
        new, _ = _rewrite_names(ckpt)
        if not ckpt.exists():
            try:
                verify_checkpoint(new, contents=True) if new.exists() else None
                ok = new.exists()
            except CheckpointError:
                ok = False
            os.replace(new if ok else old, ckpt)  # the edited copy when it is whole, else the original
            done.append(f"{ckpt.name}: {'finished' if ok else 'undid'} an interrupted rewrite")
        shutil.rmtree(old, ignore_errors=True)
    for new in sorted(root.glob(".rewrite-step-*")):  # edits that never reached the swap
        shutil.rmtree(new, ignore_errors=True)
    _fsync(root)
    return done


def rewrite_checkpoint(ckpt: Path, edit: Callable[[Path, dict[str, Any]], int | None]) -> None:
    """Edits a copy of ``ckpt`` with ``edit(folder, manifest)`` (which rewrites files in it and
    returns the new user count, or None when it is unchanged), re-hashes every file into a new manifest and
    swaps the copy in. The chain and run id stay as they were."""
    new, old = _rewrite_names(ckpt)
    shutil.rmtree(new, ignore_errors=True)
    shutil.copytree(ckpt, new)
    manifest = read_manifest(new)
    (new / MANIFEST).unlink()  # a copy without a manifest is never taken for a checkpoint
    users = edit(new, manifest)
    if users is not None:
        manifest["users"] = users
    manifest["files"] = {name: file_entry(new / name) for name in sorted(manifest["files"])}
    (new / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _fsync(new / MANIFEST)
    _fsync(new)
    os.replace(ckpt, old)
    os.replace(new, ckpt)
    _fsync(ckpt.parent)
    shutil.rmtree(old)

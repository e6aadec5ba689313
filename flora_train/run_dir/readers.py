"""Checkpoints that a reader is using are not pruned under it.

A training run keeps its newest ``train.keep_checkpoints`` and deletes older ones as it goes. A
reader beside it (`serve`, which reads users' rows from its checkpoint when first asked for;
`export` and `generate`, which read for minutes) would lose its files halfway: `export` then found
"no intact checkpoint" and `generate` ended on a missing shard.

A reader takes a *shared* ``flock`` on ``checkpoints/.readers/<checkpoint>`` for the checkpoint and
every checkpoint it builds on, and holds it while it reads. Pruning deletes a checkpoint only
after taking that file's *exclusive* lock without waiting; when a reader holds it, the checkpoint
stays (the next save tries again). As with the run's writer lock (``lock.py``) the kernel drops a
reader's lock when the reader dies however it dies, so a crashed reader never pins a checkpoint,
and on NFSv4 the lock holds across a cluster's nodes.

The order closes the race: a reader locks first and then checks that the checkpoint is still
there; pruning holds the exclusive lock while it deletes. A reader that finds it gone picks again.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

READERS = ".readers"


def _lease_file(checkpoint: Path) -> Path:
    return checkpoint.parent / READERS / checkpoint.name


def _open(path: Path) -> int:
    path.parent.mkdir(exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _open_to_share(path: Path) -> int | None:
    """A descriptor to hold a shared lock on; None where this reader may not write the run
    directory (a read-only mount, another account's run) and no lease file is there yet: it reads
    without a lease. A lease file already there takes a shared lock read-only."""
    try:
        return _open(path)
    except OSError:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None


class HeldLocks:
    """``flock``s held on open descriptors; ``close()`` (or dropping the object, or the process
    ending) releases them."""

    def __init__(self, fds: list[int]) -> None:
        self._fds = fds
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        return bool(self._fds)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)  # closing the descriptor drops its flock

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit the process's end drops the locks anyway
            pass

    def __enter__(self) -> HeldLocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CheckpointLease(HeldLocks):
    """Shared locks on a checkpoint and the checkpoints it builds on."""

    def __init__(self, fds: list[int], unleased: list[str]) -> None:
        super().__init__(fds)
        self.unleased = unleased  # checkpoints read without a lease (the run directory is not writable here)

    def warning(self) -> str | None:
        """What a reader should say when it holds no lease on some of what it reads."""
        if not self.unleased:
            return None
        return (f"cannot lease {', '.join(self.unleased)} (the run directory is not writable here): a run training "
                "beside this reader may prune it while it is read")


def lease(chain: list[Path]) -> CheckpointLease | None:
    """Leases every checkpoint of ``chain`` (a checkpoint and those it builds on); None when one of
    them was pruned before its lock was held (the caller picks a checkpoint again)."""
    fds: list[int] = []
    unleased: list[str] = []
    for member in chain:
        fd = _open_to_share(_lease_file(member))
        if fd is None:
            unleased.append(member.name)
        else:
            fds.append(fd)
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while pruning holds it, deleting that checkpoint
        if not member.is_dir():
            for held in fds:
                os.close(held)
            return None
    return CheckpointLease(fds, unleased)


def prune(checkpoint: Path) -> bool:
    """Deletes ``checkpoint`` unless a reader leases it; True when it was deleted."""
    path = _lease_file(checkpoint)
    fd = _open(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        shutil.rmtree(checkpoint, ignore_errors=True)
        path.unlink(missing_ok=True)  # under the lock: a reader waiting on it then finds the checkpoint gone
        return True
    finally:
        os.close(fd)


# Exports against `forget` and `train.overwrite`. An export copies users' rows out of the run for a
# minute or more; a `forget` in that window rewrote the checkpoint under it (the export ended on a
# KeyError) or found the export not yet written, so the forgotten user's folder was left in it after
# `forget` said it was done; an overwrite moved the run away under it. Exports hold this file's lock
# shared, `forget` and the overwrite exclusive: each waits for the other to finish, and exports
# still run side by side.
EXPORTS_LOCK = "exports.lock"


def _hold(checkpoints: Path, mode: int, waiting: str, say: Callable[[str], None], may_skip: bool) -> HeldLocks:
    path = checkpoints / READERS / EXPORTS_LOCK
    fd = _open_to_share(path) if may_skip else _open(path)
    if fd is None:
        return HeldLocks([])
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        say(waiting)
        fcntl.flock(fd, mode)
    return HeldLocks([fd])


def hold_for_export(checkpoints: Path, say: Callable[[str], None]) -> HeldLocks:
    """Taken by an export before it picks its checkpoint, released once its folder is written and
    recorded. Not held where the run directory is read-only here (nothing on this host can forget
    in it)."""
    return _hold(checkpoints, fcntl.LOCK_SH, f"waiting for `flora-train forget` on {checkpoints.parent} to finish",
                 say, may_skip=True)


def hold_for_overwrite(checkpoints: Path, say: Callable[[str], None]) -> HeldLocks:
    """Taken by ``train.overwrite`` while it moves the run aside: an export copying rows out of it
    would find its files gone, or another run's under the same names."""
    return _hold(checkpoints, fcntl.LOCK_EX, f"waiting for the export(s) of {checkpoints.parent} under way to "
                 "finish before train.overwrite moves the run aside", say, may_skip=False)


def hold_for_forget(checkpoints: Path, say: Callable[[str], None]) -> HeldLocks:
    """Taken by `forget` (after the run's writer lock) before it changes anything."""
    return _hold(checkpoints, fcntl.LOCK_EX, f"waiting for the export(s) of {checkpoints.parent} under way to "
                 "finish: nothing is changed until then", say, may_skip=False)

"""Which run a run directory holds, and taking it for a writer.

A run id is made when a run starts fresh and kept by every resume; it is in every checkpoint
manifest, trainer state and phase file, so nothing of two runs is ever chained, pruned or planned
together. A fresh start into a directory that already holds a run's checkpoints is refused (the
user meant ``--resume``, or another ``run_dir``) unless ``train.overwrite`` says to move the old run
aside first.
"""

from __future__ import annotations

import datetime as _dt
import os
import uuid
from pathlib import Path

from flora_train import dist as fdist
from flora_train.errors import UserError, warn
from flora_train.run_dir import readers
from flora_train.run_dir.checkpoints import holds_checkpoints
from flora_train.run_dir.layout import RUN_OWNED, RunDir
from flora_train.run_dir.lock import RunLock


class RunDirInUse(UserError):
    """A fresh run into a directory that holds another run, or another writer holds it."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def move_aside(rd: RunDir) -> Path:
    """Moves what belongs to the run in ``rd`` into ``rd/replaced/<run id>-<time>/``, checkpoints
    first: each move is one rename, and once the checkpoints are gone nothing can mix with them."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = rd.replaced / f"{rd.run_id() or 'run'}-{stamp}"
    target.mkdir(parents=True)
    for name in RUN_OWNED:
        if (rd.path / name).exists():
            os.replace(rd.path / name, target / name)
    return target


def claim(run_dir: Path, fresh: bool | None, overwrite: bool = False, command: str | None = None) -> RunLock | None:
    """Rank 0 takes the run directory's writer lock for this process's life (the other ranks
    hold none: rank 0 holds it for the job). ``fresh``: the run starts at step 0, so a directory
    holding checkpoints is refused, or moved aside with ``overwrite``. Collective: every rank
    raises when rank 0 could not claim the directory."""
    lock, error = None, None
    if fdist.rank() == 0:
        rd = RunDir(run_dir)
        try:
            lock = RunLock(rd.path, command).acquire()
            rd.refuse_interrupted_forget()
            if fresh and holds_checkpoints(rd.path):
                if not overwrite:
                    raise RunDirInUse(
                        f"{rd.path}: already holds a run's checkpoints and this run starts fresh. Resume it with "
                        "--resume, or start another run_dir, or set train.overwrite=true to move the old run aside "
                        f"(into {rd.replaced}/)")
                with readers.hold_for_overwrite(rd.checkpoints, warn):
                    where = move_aside(rd)
                print(f"train.overwrite=true: moved the previous run in {rd.path} to {where}")
        except UserError as exc:
            if lock is not None:
                lock.release()
                lock = None
            error = str(exc)
    fdist.raise_if_any_failed(error, RunDirInUse)
    return lock

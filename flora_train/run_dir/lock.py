"""The writer's lock of a run directory: one process at a time may change a run.

``fcntl.flock`` on ``run_dir/.lock``, held for the life of the process that took it (training,
``forget``, ``eval``). The kernel drops a flock when its holder dies however it dies (SIGKILL,
OOM, a node that reboots and is fenced), so a stale lock never blocks: there is no pid file to
clean up and no timeout to guess. The file also says who holds it (host, pid, command, since
when), so a refused writer names the holder. On NFSv4 Linux maps flock onto the server's byte-range
locks, so the lock holds across the nodes of a cluster filesystem too.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from flora_train.errors import UserError
from flora_train.files import STORAGE_ERRNOS

LOCK_NAME = ".lock"


class RunLocked(UserError):
    """Another live process writes this run directory."""


def _holder_text(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        info = {}
    if not info:
        return "another process (it is starting, or the disk was full when it took the lock)"
    return (f"`{info.get('command', '?')}` (pid {info.get('pid', '?')} on host {info.get('host', '?')}, "
            f"since {info.get('since', '?')})")


class RunLock:
    """``with RunLock(run_dir, "flora-train run"):`` or ``acquire()`` / ``release()``."""

    def __init__(self, run_dir: Path, command: str | None = None) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.command = command or " ".join(["flora-train", *sys.argv[1:]])[:300]
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # CLOEXEC: a program this process starts must not keep the lock alive after it ends.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(fd)
            os.close(fd)
            raise RunLocked(f"{self.path.parent}: in use by {holder}; one process writes a run directory at a time. "
                            "Wait for it to end (or stop it), or use another run_dir") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        try:
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError as exc:  # a full disk: the flock locks all the same, only who holds it goes unsaid
            if exc.errno not in STORAGE_ERRNOS:
                os.close(fd)
                raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # who held it is no longer true
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

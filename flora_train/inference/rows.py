"""Where served users' rows live (the device cache of the hot ones is ``adapter_cache.py``).

A ``RowSource`` answers ``read(users) -> [n, row_size]`` from the tier the rows were saved in,
without loading the population: a run's checkpoint chain is indexed once (its user lists only)
and read by safetensors slices; a ``--format packed`` export is read by slices the same way; a
``--format flora`` export reads a user's folder. A source rewritten on disk by `flora-train forget`
is indexed again (``refresh``), and a run that ``train.overwrite`` moved aside is read where it
went.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from flora_train.files import read_json
from flora_train.run_dir.layout import RunDir, TornJournal
from flora_train.run_dir.readers import CheckpointLease

log = logging.getLogger("flora_train")


class RowSource(Protocol):
    label: str

    def __contains__(self, user: str) -> bool: ...

    def __len__(self) -> int: ...

    @property
    def users(self) -> list[str]: ...

    generation: int  # bumped by each refresh that indexed the rows again

    def refresh(self) -> bool:
        """Index the rows again if they changed on disk (a forget rewrote them); True when so."""
        ...

    def read(self, users: list[str]) -> torch.Tensor:
        """Rows ``[len(users), row_size]`` float32 of trained users, in order."""
        ...

    def read_held(self, users: list[str]) -> dict[str, torch.Tensor]:
        """The rows of those of ``users`` the source holds, by user: membership and rows from one
        index, so a refresh by another thread in between cannot fail the read."""
        ...


class _IndexedRows:
    """A source whose users are the keys of an index to where each row lives."""

    def __init__(self, label: str, index: dict) -> None:
        self.label = label
        self._index = index

    def __contains__(self, user: str) -> bool:
        return user in self._index

    def __len__(self) -> int:
        return len(self._index)

    generation = 0  # how many times the source was indexed again (refresh)

    def read(self, users: list[str]) -> torch.Tensor:
        return self._read(users, self._index)

    def read_held(self, users: list[str]) -> dict[str, torch.Tensor]:
        index = self._index  # one index for both (a refresh replaces it whole)
        held = [u for u in users if u in index]
        return dict(zip(held, self._read(held, index))) if held else {}

    def _read(self, users: list[str], index: dict) -> torch.Tensor:
        raise NotImplementedError

    def refresh(self) -> bool:
        """Index the source again if it changed on disk; True when it did (checkpoints and exports)."""
        return False

    @property
    def users(self) -> list[str]:
        return list(self._index)


class TensorRows(_IndexedRows):
    """Rows already in memory (tests, small populations)."""

    def __init__(self, users: list[str], rows: torch.Tensor, label: str = "memory") -> None:
        super().__init__(label, {u: i for i, u in enumerate(users)})
        self._rows = rows

    def _read(self, users: list[str], index: dict) -> torch.Tensor:
        return self._rows[[index[u] for u in users]]


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is written again (or renamed over); None when it is not there."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def chain_identity(chain: list[Path]) -> tuple:
    """What changes when a checkpoint of ``chain`` is written again in place (`flora-train forget`
    rewrites it beside the old one and renames it over it): each member's manifest file identity."""
    return tuple(_file_identity(path / "manifest.json") for path in chain)


def run_of(checkpoint: Path) -> str | None:
    """The run id ``checkpoint``'s manifest records; None where it cannot be read (gone, partial)."""
    try:
        return json.loads((checkpoint / "manifest.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def moved_chain(chain: list[Path], run_id: str | None) -> list[Path] | None:
    """Where ``chain`` of run ``run_id`` is now, if ``train.overwrite`` moved the run aside (into
    ``run_dir/replaced/<run id>-<time>/``, newest first); None where it is nowhere to be found."""
    if run_id is None:
        return None
    for aside in reversed(RunDir(chain[-1].parent.parent).moved_aside(run_id)):
        moved = [aside.checkpoints / member.name for member in chain]
        if all(run_of(member) == run_id for member in moved):
            return moved
    return None


class CheckpointRows(_IndexedRows):
    """A checkpoint chain's rows, read by slices: only the user lists are read up front. When the
    chain is written again under it (`flora-train forget` removed users), ``refresh`` indexes it
    again: a shard's rows then no longer line up with the user list read before. The rows are
    those of the run the chain was: when ``train.overwrite`` moves that run aside and another run
    writes checkpoints of the same names, they are read where the run went (the base being served
    is that run's), never from the other run. The users of a ``forget`` under way (or killed: its
    journal, ``forget-pending.json``) are not served from the moment it starts, before the
    checkpoint that holds them is written again."""

    def __init__(self, chain: list[Path], lease: CheckpointLease | None = None) -> None:
        super().__init__(str(chain[-1]), {})
        self.chain = chain
        self.run_dir = RunDir(chain[-1].parent.parent)  # whose forget journal counts: forget runs on the run,
        # never on a copy train.overwrite moved aside
        self.run_id = run_of(chain[-1])
        self.lease = lease  # run_dir.readers.CheckpointLease: its run prunes none of the chain while held
        self._lock = threading.Lock()  # refreshes come from the engine's thread and the HTTP threads
        self._index_chain()

    def _watched(self) -> tuple:
        return chain_identity(self.chain), _file_identity(self.run_dir.forget_pending)

    def _index_chain(self) -> None:
        from flora_train.store.saved import newest_copies

        self.identity = self._watched()
        index: dict[str, tuple[Path, int, list[str]]] = {}  # user -> its shard, row, and the shard's user list
        for path, (users, take) in newest_copies(self.chain, None).items():
            for i in take:
                index[users[i]] = (path, i, users)
        try:
            pending = [u for u in self.run_dir.forget_pending_users() if u in index]
        except TornJournal as torn:  # who is being forgotten is not known: no one is served from the run
            log.warning("%s: a `flora-train forget` was interrupted and %s: every user gets the base until it is "
                        "completed", self.label, torn)
            pending = list(index)
        for u in pending:
            del index[u]
        if pending:
            log.warning("%s: a `flora-train forget` of %d served user(s) is under way or was interrupted: they get "
                        "the base from now on", self.label, len(pending))
        self._index = index  # (readers take _index unlocked: it is replaced whole, never changed)

    def refresh(self) -> bool:
        with self._lock:
            if self._watched() == self.identity:
                return False
            if any(run_of(member) != self.run_id for member in self.chain):
                moved = moved_chain(self.chain, self.run_id)
                if moved is None:  # gone with no trace: nothing of another run is served in its place
                    self._index, self.identity = {}, self._watched()
                    log.warning("%s no longer holds run %s's checkpoint: its users get the base from now on",
                                self.label, self.run_id)
                    self.generation += 1
                    return True
                log.warning("%s holds another run now (train.overwrite moved run %s to %s): its rows are read there",
                            self.label, self.run_id, moved[-1].parent.parent)
                self.chain, self.label = moved, str(moved[-1])  # /health names where the rows are read
            self._index_chain()
            self.generation += 1
            return True

    def read(self, users: list[str]) -> torch.Tensor:
        self.refresh()  # (the server's cache refreshes before it reads; `generate` reads here)
        return super().read(users)

    def _read(self, users: list[str], index: dict) -> torch.Tensor:
        from flora_train.store.saved import iter_saved_rows_of

        by_path: dict[Path, tuple[list[str], list[int]]] = {}
        for u in users:
            path, i, listing = index[u]
            by_path.setdefault(path, (listing, []))[1].append(i)
        got: dict[str, torch.Tensor] = {}
        for path, (listing, take) in by_path.items():
            for ids, rows in iter_saved_rows_of(path, listing, sorted(set(take))):
                got.update(zip(ids, rows))
        return torch.stack([got[u] for u in users]).float()


class _ExportIndexRows(_IndexedRows):
    """An export folder read through its ``index.json``, indexed again when that file is replaced
    (`flora-train forget` rewrites an export's index without the forgotten users)."""

    def __init__(self, folder: Path, index: dict) -> None:
        super().__init__(str(folder), index)
        self._folder = folder
        self._lock = threading.Lock()
        self._identity = _file_identity(folder / "index.json")

    def refresh(self) -> bool:
        with self._lock:
            identity = _file_identity(self._folder / "index.json")
            if identity is None or identity == self._identity:
                return False
            index = read_json(self._folder / "index.json")
            if not isinstance(index, dict):  # torn: the users stay as read before (said at each change of the file)
                log.warning("%s: cannot be read; its users are served as they were", self._folder / "index.json")
                self._identity = identity
                return False
            self._index = index
            self._identity = identity
            self.generation += 1
            return True


class FolderRows(_ExportIndexRows):
    """An export of one folder per user (``--format flora``, ``peft``), each read when its user is
    first asked for by the format's ``read(folder, user) -> row``."""

    def __init__(self, folder: Path, index: dict[str, str], read: Callable[[Path, str], torch.Tensor]) -> None:
        super().__init__(folder, index)
        self._read_one = read

    def _read(self, users: list[str], index: dict) -> torch.Tensor:
        from flora_train.export.base import indexed

        return torch.stack([self._read_one(indexed(self._folder, u, index[u]), u) for u in users]).float()


class PackedRows(_ExportIndexRows):
    """A ``--format packed`` export: ``pack-NNNNN.safetensors`` files of many users' rows, read by
    slices (the index of users to ``[file, row]`` is read once, and again when it is replaced)."""

    def _read(self, users: list[str], index: dict) -> torch.Tensor:
        from flora_train.export.packed import pack_of
        from flora_train.files import open_tensors

        by_file: dict[Path, list[tuple[int, str]]] = {}
        for u in users:
            path, i = pack_of(self._folder, u, index[u])
            by_file.setdefault(path, []).append((i, u))
        got: dict[str, torch.Tensor] = {}
        for path, wanted in by_file.items():
            with open_tensors(path) as f:
                rows = f.get_slice("rows")
                for i, u in wanted:
                    got[u] = rows[i : i + 1][0]
        return torch.stack([got[u] for u in users]).float()


__all__ = ["CheckpointRows", "FolderRows", "PackedRows", "RowSource", "TensorRows", "chain_identity", "moved_chain",
           "run_of"]

"""Where served users' rows live, and the bounded device cache of the hot ones.

A ``RowSource`` answers ``read(users) -> [n, row_size]`` from the tier the rows were saved in,
without loading the population: a run's checkpoint chain is indexed once (its user lists only)
and read by safetensors slices; a ``--format packed`` export is read by slices the same way; a
``--format flora`` export reads a user's folder. A source rewritten on disk by `flora-train forget`
is indexed again (``refresh``) and the cache drops the rows of users it no longer holds. ``AdapterCache``
holds at most ``capacity`` rows on the device, least recently used out first, filled on demand
(and read ahead for queued requests by a background reader); a row in use by a running request is
pinned and never evicted. It is the same idea as the
store's hot-row cache, for serving: 10^5 users served from a 256-row device table.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from flora_train.adapters import AdapterLayout, user_seed
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
    run_dir = chain[-1].parent.parent
    for aside in sorted((run_dir / "replaced").glob(f"{run_id}-*"), reverse=True):
        moved = [aside / "checkpoints" / member.name for member in chain]
        if all(run_of(member) == run_id for member in moved):
            return moved
    return None


class CheckpointRows(_IndexedRows):
    """A checkpoint chain's rows, read by slices: only the user lists are read up front. When the
    chain is written again under it (`flora-train forget` removed users), ``refresh`` indexes it
    again: a shard's rows then no longer line up with the user list read before. The rows are
    those of the run the chain was: when ``train.overwrite`` moves that run aside and another run
    writes checkpoints of the same names, they are read where the run went (the base being served
    is that run's), never from the other run."""

    def __init__(self, chain: list[Path], lease: CheckpointLease | None = None) -> None:
        super().__init__(str(chain[-1]), {})
        self.chain = chain
        self.run_id = run_of(chain[-1])
        self.lease = lease  # run_dir.readers.CheckpointLease: its run prunes none of the chain while held
        self._lock = threading.Lock()  # refreshes come from the engine's thread and the HTTP threads
        self._index_chain()

    def _index_chain(self) -> None:
        from flora_train.store.saved import newest_copies

        self.identity = chain_identity(self.chain)
        index: dict[str, tuple[Path, int, list[str]]] = {}  # user -> its shard, row, and the shard's user list
        for path, (users, take) in newest_copies(self.chain, None).items():
            for i in take:
                index[users[i]] = (path, i, users)
        self._index = index  # (readers take _index unlocked: it is replaced whole, never changed)

    def refresh(self) -> bool:
        with self._lock:
            if chain_identity(self.chain) == self.identity:
                return False
            if any(run_of(member) != self.run_id for member in self.chain):
                moved = moved_chain(self.chain, self.run_id)
                if moved is None:  # gone with no trace: nothing of another run is served in its place
                    self._index, self.identity = {}, chain_identity(self.chain)
                    log.warning("%s no longer holds run %s's checkpoint: its users get the base from now on",
                                self.label, self.run_id)
                    self.generation += 1
                    return True
                log.warning("%s holds another run now (train.overwrite moved run %s to %s): its rows are read there",
                            self.label, self.run_id, moved[-1].parent.parent)
                self.chain = moved
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
            self._index = json.loads((self._folder / "index.json").read_text())
            self._identity = identity
            self.generation += 1
            return True


class ExportRows(_ExportIndexRows):
    """A ``--format flora`` export: one folder per user, read when the user is first asked for."""

    def __init__(self, folder: Path, index: dict[str, str], layout: AdapterLayout) -> None:
        super().__init__(folder, index)
        self._layout = layout

    def _read(self, users: list[str], index: dict) -> torch.Tensor:
        from flora_train.export.base import indexed
        from flora_train.export.flora import load_flora_adapter

        rows = []
        for u in users:
            folder = indexed(self._folder, u, index[u])
            layout, row = load_flora_adapter(folder)
            if self._layout.compatible_with(layout):
                raise ValueError(f"{folder}: user {u!r} was exported with another layout than the others")
            rows.append(row)
        return torch.stack(rows).float()


class PackedRows(_ExportIndexRows):
    """A ``--format packed`` export: ``pack-NNNNN.safetensors`` files of many users' rows, read by
    slices (the index of users to ``[file, row]`` is read once, and again when it is replaced)."""

    def _read(self, users: list[str], index: dict) -> torch.Tensor:
        from safetensors import safe_open

        from flora_train.export.packed import pack_of

        by_file: dict[Path, list[tuple[int, str]]] = {}
        for u in users:
            path, i = pack_of(self._folder, u, index[u])
            by_file.setdefault(path, []).append((i, u))
        got: dict[str, torch.Tensor] = {}
        for path, wanted in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                rows = f.get_slice("rows")
                for i, u in wanted:
                    got[u] = rows[i : i + 1][0]
        return torch.stack([got[u] for u in users]).float()


@dataclass
class CacheStats:
    capacity: int
    resident: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetched: int = 0  # misses whose row a prefetch had already read
    staged: int = 0  # rows read ahead, not yet asked for


class CacheFull(RuntimeError):
    """Every cached row is pinned by a running request."""


class AdapterCache:
    """``capacity`` rows on the device. ``acquire(user)`` returns the row's slot and pins it;
    ``release(slot)`` unpins. Users never trained (and ``None``: the base model) get their
    untrained row, the identity. Called from the serving thread; ``stats`` from any."""

    def __init__(self, source: RowSource, layout: AdapterLayout, init_seed: int, capacity: int,
                 device: torch.device, version: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"the adapter cache needs at least one row, got {capacity}")
        self.source, self.layout, self.init_seed, self.version = source, layout, init_seed, version
        self.table = torch.zeros(capacity, layout.row_size, device=device)
        self._slot_of: OrderedDict[str | None, int] = OrderedDict()  # least recently used first
        self._user_at: dict[int, str | None] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._pins = [0] * capacity
        self._lock = threading.Lock()
        self._stats = CacheStats(capacity)
        self._staged: OrderedDict[str, torch.Tensor] = OrderedDict()  # prefetched rows, host side
        self._prefetching: set[str] = set()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="flora-prefetch")
        self._generation = source.generation
        self._orphans: set[int] = set()  # slots of users a refresh removed, still in use by running requests

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(**{**vars(self._stats), "staged": len(self._staged)})

    def prefetch(self, users: list[str | None]) -> None:
        """Reads the rows of queued requests' users in the background (host side, at most
        ``capacity`` staged), so admitting them later does not wait on the source."""
        with self._lock:
            todo = [u for u in dict.fromkeys(users) if u is not None and u not in self._slot_of
                    and u not in self._staged and u not in self._prefetching and u in self.source]
            self._prefetching.update(todo)
        if todo:
            self._reader.submit(self._stage, todo)

    def _stage(self, users: list[str]) -> None:
        generation = self.source.generation
        try:
            rows = self.source.read_held(users)
        except Exception:  # noqa: BLE001 - admission reads it again and fails that request alone
            rows = None
        with self._lock:
            self._prefetching.difference_update(users)
            # Rows read while a refresh indexed the source again may be a forgotten user's: not kept.
            if rows is not None and generation == self.source.generation == self._generation:
                self._staged.update(rows)
                while len(self._staged) > self.table.shape[0]:
                    self._staged.popitem(last=False)

    def _sync_with_source(self) -> None:
        """After the source was indexed again (a forget rewrote it), rows of users it no longer holds
        are never handed out again: staged ones are dropped, cached ones unmapped (their slots freed
        now, or when the last running request using them ends)."""
        self.source.refresh()
        with self._lock:
            if self.source.generation == self._generation:
                return
            self._generation = self.source.generation
            self._staged.clear()
            gone = [u for u in self._slot_of if u is not None and u not in self.source]
            for u in gone:
                slot = self._slot_of.pop(u)
                del self._user_at[slot]
                if self._pins[slot]:
                    self._orphans.add(slot)
                else:
                    self._free.append(slot)
            self._stats.resident = len(self._slot_of)
        if gone:
            log.warning("%s was written again on disk: %d user(s) no longer in it get the base from now on (%d users)",
                        self.source.label, len(gone), len(self.source))

    def _load(self, users: list[str | None]) -> torch.Tensor:
        with self._lock:
            got: dict[str | None, torch.Tensor] = {u: self._staged.pop(u) for u in users if u in self._staged}
            self._stats.prefetched += len(got)
        asked = [u for u in users if u is not None and u not in got]
        got.update(self.source.read_held(asked) if asked else {})
        missing = [u for u in users if u not in got]
        if missing:
            seeds = torch.tensor([user_seed(self.init_seed, u or "") for u in missing], dtype=torch.int64)
            got.update(zip(missing, self.layout.init_rows(seeds)))
        return torch.stack([got[u] for u in users])

    def acquire_many(self, users: list[str | None]) -> list[int]:
        """Slots of ``users`` (pinned once per entry), loading the missing ones in one read."""
        self._sync_with_source()
        with self._lock:  # the resident ones are pinned first, so making room never evicts them
            resident = [u for u in users if u in self._slot_of]
            for u in resident:
                self._pins[self._slot_of[u]] += 1
        need = [u for u in dict.fromkeys(users) if u not in self._slot_of]
        taken: list[int] = []
        try:
            for _ in need:
                taken.append(self._take_slot())
            if need:
                self.table[taken] = self._load(need).to(self.table.device, self.table.dtype)
        except Exception:
            with self._lock:
                for u in resident:
                    self._pins[self._slot_of[u]] -= 1
                self._free.extend(taken)
            raise
        with self._lock:
            for u, slot in zip(need, taken):
                self._slot_of[u] = slot
                self._user_at[slot] = u
            for u in users:
                if u not in resident:
                    self._pins[self._slot_of[u]] += 1
                self._slot_of.move_to_end(u)
            self._stats.misses += len(need)
            self._stats.hits += len(users) - len(need)
            self._stats.resident = len(self._slot_of)
            return [self._slot_of[u] for u in users]

    def acquire(self, user: str | None) -> int:
        return self.acquire_many([user])[0]

    def release(self, slot: int) -> None:
        with self._lock:
            self._pins[slot] -= 1
            if not self._pins[slot] and slot in self._orphans:
                self._orphans.discard(slot)
                self._free.append(slot)

    def _take_slot(self) -> int:
        with self._lock:
            if self._free:
                return self._free.pop()
            for user, slot in self._slot_of.items():
                if not self._pins[slot]:
                    del self._slot_of[user]
                    del self._user_at[slot]
                    self._stats.evictions += 1
                    return slot
        raise CacheFull(f"all {self.table.shape[0]} cached adapters are in use; raise --cache-users")

    def pinned(self) -> int:
        with self._lock:
            return sum(1 for p in self._pins if p)


__all__ = ["AdapterCache", "CacheFull", "CacheStats", "CheckpointRows", "ExportRows", "PackedRows", "RowSource",
           "TensorRows"]

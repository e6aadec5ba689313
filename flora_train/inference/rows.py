"""Where served users' rows live, and the bounded device cache of the hot ones.

A ``RowSource`` answers ``read(users) -> [n, row_size]`` from the tier the rows were saved in,
without loading the population: a run's checkpoint chain is indexed once (its user lists only)
and read by safetensors slices; a ``--format packed`` export is read by slices the same way; a
``--format flora`` export reads a user's folder. ``AdapterCache``
holds at most ``capacity`` rows on the device, least recently used out first, filled on demand
(and read ahead for queued requests by a background reader); a row in use by a running request is
pinned and never evicted. It is the same idea as the
store's hot-row cache, for serving: 10^5 users served from a 256-row device table.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from flora_train.adapters import AdapterLayout, user_seed


class RowSource(Protocol):
    label: str

    def __contains__(self, user: str) -> bool: ...

    @property
    def users(self) -> list[str]: ...

    def read(self, users: list[str]) -> torch.Tensor:
        """Rows ``[len(users), row_size]`` float32 of trained users, in order."""
        ...


class _IndexedRows:
    """A source whose users are the keys of an index to where each row lives."""

    def __init__(self, label: str, index: dict) -> None:
        self.label = label
        self._index = index

    def __contains__(self, user: str) -> bool:
        return user in self._index

    @property
    def users(self) -> list[str]:
        return list(self._index)


class TensorRows(_IndexedRows):
    """Rows already in memory (tests, small populations)."""

    def __init__(self, users: list[str], rows: torch.Tensor, label: str = "memory") -> None:
        super().__init__(label, {u: i for i, u in enumerate(users)})
        self._rows = rows

    def read(self, users: list[str]) -> torch.Tensor:
        return self._rows[[self._index[u] for u in users]]


class CheckpointRows(_IndexedRows):
    """A checkpoint chain's rows, read by slices: only the user lists are read up front."""

    def __init__(self, chain: list[Path]) -> None:
        from flora_train.store.saved import newest_copies

        super().__init__(str(chain[-1]), {})
        self._listing: dict[Path, list[str]] = {}
        for path, (users, take) in newest_copies(chain, None).items():
            self._listing[path] = users
            for i in take:
                self._index[users[i]] = (path, i)

    def read(self, users: list[str]) -> torch.Tensor:
        from flora_train.store.saved import iter_saved_rows_of

        by_path: dict[Path, list[int]] = {}
        for u in users:
            path, i = self._index[u]
            by_path.setdefault(path, []).append(i)
        got: dict[str, torch.Tensor] = {}
        for path, take in by_path.items():
            listing = self._listing[path]
            for ids, rows in iter_saved_rows_of(path, listing, sorted(set(take))):
                got.update(zip(ids, rows))
        return torch.stack([got[u] for u in users]).float()


class ExportRows(_IndexedRows):
    """A ``--format flora`` export: one folder per user, read when the user is first asked for."""

    def __init__(self, folder: Path, index: dict[str, str], layout: AdapterLayout) -> None:
        super().__init__(str(folder), index)
        self._folder = folder
        self._layout = layout

    def read(self, users: list[str]) -> torch.Tensor:
        from flora_train.export import load_flora_adapter

        rows = []
        for u in users:
            layout, row = load_flora_adapter(self._folder / self._index[u])
            if self._layout.compatible_with(layout):
                raise ValueError(f"{self._folder / self._index[u]}: user {u!r} was exported with another layout than the others")
            rows.append(row)
        return torch.stack(rows).float()


class PackedRows(_IndexedRows):
    """A ``--format packed`` export: ``pack-NNNNN.safetensors`` files of many users' rows, read by
    slices (the index of users to ``[file, row]`` is read once)."""

    def __init__(self, folder: Path, index: dict[str, list]) -> None:
        super().__init__(str(folder), index)
        self._folder = folder

    def read(self, users: list[str]) -> torch.Tensor:
        from safetensors import safe_open

        by_file: dict[str, list[tuple[int, str]]] = {}
        for u in users:
            name, i = self._index[u]
            by_file.setdefault(name, []).append((int(i), u))
        got: dict[str, torch.Tensor] = {}
        for name, wanted in by_file.items():
            with safe_open(str(self._folder / name), framework="pt") as f:
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
        try:
            rows = self.source.read(users)
        except Exception:  # noqa: BLE001 - admission reads it again and fails that request alone
            rows = None
        with self._lock:
            self._prefetching.difference_update(users)
            if rows is not None:
                self._staged.update(zip(users, rows))
                while len(self._staged) > self.table.shape[0]:
                    self._staged.popitem(last=False)

    def _load(self, users: list[str | None]) -> torch.Tensor:
        with self._lock:
            got: dict[str | None, torch.Tensor] = {u: self._staged.pop(u) for u in users if u in self._staged}
            self._stats.prefetched += len(got)
        trained = [u for u in users if u is not None and u not in got and u in self.source]
        got.update(zip(trained, self.source.read(trained)) if trained else {})
        missing = [u for u in users if u not in got]
        if missing:
            seeds = torch.tensor([user_seed(self.init_seed, u or "") for u in missing], dtype=torch.int64)
            got.update(zip(missing, self.layout.init_rows(seeds)))
        return torch.stack([got[u] for u in users])

    def acquire_many(self, users: list[str | None]) -> list[int]:
        """Slots of ``users`` (pinned once per entry), loading the missing ones in one read."""
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

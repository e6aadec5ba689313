"""Storage tiers for the store's per-row columns (adapter rows and their optimizer state).

A ``RowTable`` holds named columns of equal length, one entry per row, in memory on one device
(the ``device`` tier's compute device or the ``host`` tier's CPU; ``tiers.py`` picks). The ``disk``
tier's ``DiskTable`` (disk_table.py) keeps the same columns as records in one file, for
populations larger than RAM. Optimizer moments are columns of the same table, so they always live
with their rows. Access goes through ``gather`` / ``scatter`` (``scatter_columns``: several columns of
the same rows at once) on row numbers, the only operations a step needs; ``locate`` hands out the
rows' places for updates in place where a tier allows them (``updates_in_place``). ``HotRowCache``
offers the same in front of a slower tier.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from flora_train.store.disk_table import DiskTable
    from flora_train.store.transfer import Transfers

@dataclass(frozen=True)
class Column:
    shape: tuple[int, ...]  # per-row shape: (row_size,) for vectors, () for scalars
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def saved_key(column: str) -> str:
    """A column's key in a saved shard: ``rows``, the selection's ``select.*`` as they are, and
    the optimizer's state as ``optim.<name>``."""
    return column if column == "rows" or "." in column else f"optim.{column}"


class RowTable:
    updates_in_place = True

    def __init__(self, columns: dict[str, Column], device: torch.device | str = "cpu") -> None:
        self.columns = dict(columns)
        self.device = torch.device(device)
        self.capacity = 0
        self._data: dict[str, torch.Tensor] = {}
        self._allocate(0)

    def _allocate(self, capacity: int) -> None:
        for name, col in self.columns.items():
            grown = torch.zeros(capacity, *col.shape, dtype=col.dtype, device=self.device)
            old = self._data.get(name)
            if old is not None and old.shape[0]:
                grown[: old.shape[0]] = old
            self._data[name] = grown
        self.capacity = capacity

    def reserve(self, n: int) -> None:
        """Room for at least ``n`` rows; grows geometrically so adding users is amortised O(1)."""
        if n > self.capacity:
            self._allocate(max(n, 2 * self.capacity, 16))

    def column(self, name: str) -> torch.Tensor:
        return self._data[name]

    def gather(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        return self._data[name].index_select(0, rows.to(self.device))

    def scatter(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        data = self._data[name]
        data.index_copy_(0, rows.to(self.device), values.to(device=self.device, dtype=data.dtype))

    def locate(self, rows: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Where ``rows`` live: every column's tensor and the rows' positions in them, for updates in place."""
        return self._data, rows.to(self.device)

    def scatter_columns(self, rows: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        for name, v in values.items():
            self.scatter(name, rows, v)

    def flush(self) -> None:
        """Nothing is buffered."""

    def reads_free_on(self, device: torch.device) -> bool:
        """A gather for ``device`` is a plain index there: nothing worth overlapping with a step."""
        return self.device == device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._data.values())


class HotRowCache:
    """A write-back cache of hot rows (all columns) on the compute device, in front of a table.

    ``gather``/``scatter`` take table row numbers like ``RowTable``'s. Rows a step asks for are
    made resident first (least recently used rows make room and are written back if changed), so
    the optimizer reads and writes them on the device. ``flush`` writes every changed row back.

    The owner placement's prefetch thread reads through the cache while the main thread reads
    step counters: every entry point holds one lock, so an eviction never interleaves with another
    access. ``locate`` hands out slots for in-place updates after the lock is released: the
    store settles its prefetch before it updates (``ShardedAdapterStore._settle_prefetch``).
    """

    updates_in_place = True

    def __init__(self, table: "RowTable | DiskTable", capacity: int, device: torch.device | str,
                 transfers: "Transfers | None" = None) -> None:
        """``transfers``: where the rows (every column) it loads and writes back are counted."""
        if capacity < 1:
            raise ValueError("cache capacity must be >= 1")
        self.table = table
        self.transfers = transfers
        self.capacity = capacity
        self.device = torch.device(device)
        self.columns = table.columns
        self._cache = {n: torch.zeros(capacity, *c.shape, dtype=c.dtype, device=self.device) for n, c in self.columns.items()}
        self._slot_row = torch.full((capacity,), -1, dtype=torch.int64)  # table row held by each slot
        self._row_slot: dict[int, int] = {}
        self._last_used = torch.zeros(capacity, dtype=torch.int64)
        self._dirty = torch.zeros(capacity, dtype=torch.bool)
        self._tick = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.RLock()

    def _slots(self, rows: torch.Tensor) -> torch.Tensor:
        wanted = rows.tolist()
        unique = list(dict.fromkeys(wanted))
        if len(unique) > self.capacity:
            raise ValueError(f"a step needs {len(unique)} rows but the hot-row cache holds {self.capacity}; raise store.cache_rows")
        self._tick += 1
        missing = [r for r in unique if r not in self._row_slot]
        self.hits += len(unique) - len(missing)
        self.misses += len(missing)
        if missing:
            self._load(missing, keep={self._row_slot[r] for r in unique if r in self._row_slot})
        slots = torch.tensor([self._row_slot[r] for r in wanted], dtype=torch.int64)
        self._last_used[slots] = self._tick
        return slots

    def _load(self, missing: list[int], keep: set[int]) -> None:
        order = torch.argsort(self._last_used, stable=True).tolist()  # least recently used first; empty slots have 0
        victims = [s for s in order if s not in keep][: len(missing)]
        victims_t = torch.tensor(victims, dtype=torch.int64)
        self._write_back(victims_t)
        for s in victims:
            old = int(self._slot_row[s])
            if old >= 0:
                del self._row_slot[old]
        missing_t = torch.tensor(missing, dtype=torch.int64)
        dev_slots = victims_t.to(self.device)
        for name, data in self._cache.items():
            loaded = self.table.gather(name, missing_t)
            if self.transfers is not None:
                self.transfers.add(h2d=loaded.nbytes)
            data.index_copy_(0, dev_slots, loaded.to(self.device))
        self._slot_row[victims_t] = missing_t
        self._row_slot.update(zip(missing, victims))
        self._dirty[victims_t] = False

    def _write_back(self, slots: torch.Tensor) -> None:
        slots = slots[self._dirty[slots] & (self._slot_row[slots] >= 0)]
        if slots.numel():
            rows = self._slot_row[slots]
            dev_slots = slots.to(self.device)
            back = {name: data.index_select(0, dev_slots) for name, data in self._cache.items()}
            if self.transfers is not None:
                self.transfers.add(d2h=sum(v.nbytes for v in back.values()))
            self.table.scatter_columns(rows, back)
            self._dirty[slots] = False

    def gather(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return self._cache[name].index_select(0, self._slots(rows.cpu()).to(self.device))

    def scatter(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        with self._lock:
            slots = self._slots(rows.cpu())
            data = self._cache[name]
            data.index_copy_(0, slots.to(self.device), values.to(device=self.device, dtype=data.dtype))
            self._dirty[slots] = True

    def scatter_columns(self, rows: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        for name, v in values.items():
            self.scatter(name, rows, v)

    def locate(self, rows: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Makes ``rows`` resident and returns the cache's columns and their slots; the caller
        updates them in place, so they are marked changed."""
        with self._lock:
            slots = self._slots(rows.cpu())
            self._dirty[slots] = True
            return self._cache, slots.to(self.device)

    def invalidate(self) -> None:
        """Forgets every cached row without writing back (after the table was overwritten)."""
        with self._lock:
            self._row_slot.clear()
            self._slot_row.fill_(-1)
            self._dirty.fill_(False)
            self._last_used.zero_()

    def flush(self) -> None:
        with self._lock:
            self._write_back(torch.arange(self.capacity))
            self.table.flush()

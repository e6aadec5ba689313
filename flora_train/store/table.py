"""Storage tiers for the store's per-row columns (adapter rows and their optimizer state).

A ``RowTable`` holds named columns of equal length, one entry per row, on one tier:

- ``device``: tensors on the compute device;
- ``host``: tensors in host memory;
- ``disk``: one memory-mapped file of records (``torch.from_file(shared=True)``), a user's row and
  its optimizer state side by side in one record, so a population larger than RAM pages in only
  the rows a step touches, and each user touched costs the pages of one record rather than a page
  in every column's file (5,384 bytes for FLoRA r1 on q/v with AdamW: 2 pages instead of 5). The
  columns are strided views of the records. Growing a disk table extends the file in place;
  nothing is copied.

Optimizer moments are columns of the same table, so they always live with their rows. Access goes
through ``gather`` / ``scatter`` on row numbers, the only operations a step needs; ``HotRowCache``
offers the same two in front of a slower tier.
"""

from __future__ import annotations


import ctypes
import functools
import math
import mmap
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

TIERS = ("device", "host", "disk")


@dataclass(frozen=True)
class Column:
    shape: tuple[int, ...]  # per-row shape: (row_size,) for vectors, () for scalars
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


PAGE = mmap.PAGESIZE
MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in, writable, as a write to each would
_LIBC = ctypes.CDLL(None, use_errno=True)


@functools.cache
def _populate_write_works() -> bool:
    """Whether this kernel knows MADV_POPULATE_WRITE (older ones answer EINVAL: prefault is skipped)."""
    if sys.platform != "linux":
        return False
    buf = mmap.mmap(-1, PAGE)
    view = ctypes.c_char.from_buffer(buf)
    ok = _LIBC.madvise(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(PAGE), MADV_POPULATE_WRITE) == 0
    del view  # the buffer cannot close while a ctypes view of it exists
    buf.close()
    return ok


def record_layout(columns: dict[str, Column]) -> tuple[int, dict[str, int]]:
    """A record's size and each column's byte offset in it: the widest dtypes first, so every field
    is aligned to its dtype, and the size rounded up to the widest (every record aligned alike)."""
    offsets, end = {}, 0
    for name in sorted(columns, key=lambda n: -columns[n].dtype.itemsize):
        offsets[name] = end
        end += columns[name].numel * columns[name].dtype.itemsize
    widest = max((c.dtype.itemsize for c in columns.values()), default=1)
    return -(-end // widest) * widest, offsets


class RowTable:
    def __init__(
        self, columns: dict[str, Column], tier: str = "host", device: torch.device | str = "cpu", directory: Path | None = None
    ) -> None:
        if tier not in TIERS:
            raise ValueError(f"store tier must be one of {TIERS}, got {tier!r}")
        if tier == "disk" and directory is None:
            raise ValueError("the disk tier needs a directory for its memory-mapped files")
        self.columns = dict(columns)
        self.tier = tier
        self.device = torch.device(device) if tier == "device" else torch.device("cpu")
        self.directory = directory
        self.capacity = 0
        self._data: dict[str, torch.Tensor] = {}
        self.record_bytes, self._offsets = record_layout(self.columns)
        self._records: torch.Tensor | None = None  # disk: [capacity, record_bytes] uint8, mapped
        if directory is not None and tier == "disk":
            directory.mkdir(parents=True, exist_ok=True)
            self._path().write_bytes(b"")  # a fresh table: stale bytes from an earlier process never leak in
        self._allocate(0)

    def _path(self) -> Path:
        assert self.directory is not None
        return self.directory / "records.bin"

    def _allocate(self, capacity: int) -> None:
        if self.tier == "disk":
            path = self._path()
            os.truncate(path, capacity * self.record_bytes)  # extends with zeros; existing rows stay where they are
            records = torch.from_file(str(path), shared=True, size=capacity * self.record_bytes, dtype=torch.uint8)
            self._records = records.view(capacity, self.record_bytes)
        for name, col in self.columns.items():
            if self._records is not None:
                start = self._offsets[name]
                field = self._records[:, start : start + col.numel * col.dtype.itemsize].view(col.dtype)
                self._data[name] = field.view(capacity, *col.shape) if col.shape else field.squeeze(-1)
            else:
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

    def prefault(self, rows: torch.Tensor) -> None:
        """Maps the pages of ``rows``' records, writable, before they are read and updated (disk
        tier). Records of a large table that a step picks at random are mostly in pages this
        process has not mapped, or that writeback made read-only again: a page fault each (about
        400 a step at 10^5 users with a file per column, before records; ``bench scale``). The prefetch thread calls this for the next
        step, so the faults are taken there instead of in the training step. Other tiers: nothing."""
        if self._records is None or not _populate_write_works() or not rows.numel():
            return
        base, size = self._records.data_ptr(), self.record_bytes
        ranges: list[list[int]] = []
        for r in sorted(set(rows.tolist())):  # each record's pages, merged where records share or touch pages
            a = (base + r * size) & ~(PAGE - 1)
            b = (base + (r + 1) * size + PAGE - 1) & ~(PAGE - 1)
            if ranges and a <= ranges[-1][1]:
                ranges[-1][1] = max(ranges[-1][1], b)
            else:
                ranges.append([a, b])
        for a, b in ranges:
            _LIBC.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), MADV_POPULATE_WRITE)

    def flush(self) -> None:
        """Nothing is buffered: memory-mapped pages reach the file when the OS writes them back."""

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

    def __init__(self, table: RowTable, capacity: int, device: torch.device | str) -> None:
        if capacity < 1:
            raise ValueError("cache capacity must be >= 1")
        self.table = table
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
            data.index_copy_(0, dev_slots, self.table.gather(name, missing_t).to(self.device))
        self._slot_row[victims_t] = missing_t
        self._row_slot.update(zip(missing, victims))
        self._dirty[victims_t] = False

    def _write_back(self, slots: torch.Tensor) -> None:
        slots = slots[self._dirty[slots] & (self._slot_row[slots] >= 0)]
        if slots.numel():
            rows = self._slot_row[slots]
            for name, data in self._cache.items():
                self.table.scatter(name, rows, data.index_select(0, slots.to(self.device)))
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

"""The disk tier: one file of records, a user's row and its optimizer state side by side, with a
step's updates appended as one contiguous run instead of written where the rows lie.

Why appended: a step's users are random rows of a table far larger than a step. Written in place,
each one dirties the ~2.3 pages its record spans (5,384 B for FLoRA r1 on q/v with AdamW), pages
that writeback has made clean and read-only since they were last written: making one writable
again costs 8 us of kernel CPU on ext4 here, and writing it back as its own I/O more (about 14 us
a page in all, 2 ms a step for 64 users at 10^6 users, against a 17 ms step). The same 64 records
written as one 344 KB ``pwrite`` at the head of a log cost 0.04 ms, and their writeback one
sequential I/O. Reads stay where they were: through a read-only use of the memory map.

Layout: ``capacity`` home slots (row ``r`` starts at slot ``r``), then ``capacity`` log slots. A row
lives at ``slot_of[r]``. Small writes (a step's update) append the rows' whole records at the log
head and point ``slot_of`` there; the old copies become garbage. Large writes (adding users,
restoring a checkpoint) are written where the rows are, through the map. When
the log is full, and before whole columns are handed out (a full checkpoint), ``compact`` writes
every row's live record back to its home slot in a fresh file, sequentially (at 10^6 users once per
15,600 steps of 64 users, or at the full checkpoint that rewrites every row anyway). Slots past the
log head are always zeros: the file is extended with ``truncate``, never rewritten there.

The file is scratch, as the host tier's memory is: a fresh table starts empty, and what persists
is the checkpoint. Every entry point holds one lock: the prefetch thread reads while the training
thread may append or compact.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from flora_train.store.table import Column

IN_PLACE_ROWS = 4096  # writes of at least this many rows go where the rows are (bulk: set-up, restore)
COMPACTING = "records.compacting"
COMPACT_CHUNK = 16_384  # records copied at a time by compaction (88 MB for FLoRA r1 on q/v)


def record_layout(columns: dict[str, Column]) -> tuple[int, dict[str, int]]:
    """A record's size and each column's byte offset in it: the widest dtypes first, so every field
    is aligned to its dtype, and the size rounded up to the widest (every record aligned alike)."""
    offsets, end = {}, 0
    for name in sorted(columns, key=lambda n: -columns[n].dtype.itemsize):
        offsets[name] = end
        end += columns[name].numel * columns[name].dtype.itemsize
    widest = max((c.dtype.itemsize for c in columns.values()), default=1)
    return -(-end // widest) * widest, offsets


class DiskTable:
    updates_in_place = False  # the optimizer gathers, updates and scatters: a scatter appends

    def __init__(self, columns: dict[str, Column], directory: Path) -> None:
        self.columns = dict(columns)
        self.device = torch.device("cpu")
        self.directory = directory
        self.record_bytes, self._offsets = record_layout(self.columns)
        self.capacity = 0
        self.head = 0  # the next free log slot
        self.compactions = 0
        self._slot_of = torch.zeros(0, dtype=torch.int64)
        self._records = torch.zeros(0, self.record_bytes, dtype=torch.uint8)  # every slot, mapped
        self._fd = -1
        self._lock = threading.RLock()
        directory.mkdir(parents=True, exist_ok=True)
        self._path.write_bytes(b"")  # a fresh table: stale bytes from an earlier process never leak in
        self._path.with_name(COMPACTING).unlink(missing_ok=True)  # a compaction a killed process left
        self._map(0, torch.zeros(0, dtype=torch.int64))

    @property
    def _path(self) -> Path:
        return self.directory / "records.bin"

    def _map(self, capacity: int, slot_of: torch.Tensor) -> None:
        """Maps ``records.bin`` (extended with zeros to ``2 * capacity`` slots) with ``slot_of`` as the rows' places."""
        slots = 2 * capacity
        os.truncate(self._path, slots * self.record_bytes)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self._path, os.O_RDWR)
        mapped = torch.from_file(str(self._path), shared=True, size=slots * self.record_bytes, dtype=torch.uint8)
        self._records = mapped.view(slots, self.record_bytes)
        self._slot_of = slot_of
        self.capacity = capacity

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)

    # -- growth and compaction ---------------------------------------------------------------------

    def reserve(self, n: int) -> None:
        """Room for at least ``n`` rows; grows geometrically so adding users is amortised O(1)."""
        with self._lock:
            if n > self.capacity:
                self._rebuild(max(n, 2 * self.capacity, 16))

    def compact(self) -> None:
        """Every row's live record back at its home slot, in a fresh file; the log starts empty."""
        with self._lock:
            if self.head > self.capacity:
                self._rebuild(self.capacity)

    def _rebuild(self, capacity: int) -> None:
        old = self.capacity
        if self.head <= old:  # nothing in the log: every row is home, and the home slots stay put
            self._map(capacity, torch.arange(capacity))
            self.head = capacity
            return
        fresh = self._path.with_name(COMPACTING)
        with open(fresh, "wb") as f:
            for a in range(0, old, COMPACT_CHUNK):
                f.write(self._take(self._slot_of[a : a + COMPACT_CHUNK]).numpy())
        os.replace(fresh, self._path)  # the old file lives on for views handed out until they go
        self._map(capacity, torch.arange(capacity))
        self.head = capacity
        self.compactions += 1

    # -- reads -----------------------------------------------------------------------------------

    def _field(self, records: torch.Tensor, name: str) -> torch.Tensor:
        col = self.columns[name]
        start = self._offsets[name]
        field = records[:, start : start + col.numel * col.dtype.itemsize].view(col.dtype)
        return field.view(records.shape[0], *col.shape) if col.shape else field.squeeze(-1)

    def _take(self, slots: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Bytes ``start:stop`` of the records at ``slots``, copied by numpy: the prefetch thread
        reads through here, and a torch op as large as a step's records would start an OpenMP
        team of its own there, whose threads spin on the cores the step computes on (a CPU step
        took 1.6x as long)."""
        stop = self.record_bytes if stop is None else stop
        if not slots.numel():
            return torch.empty(0, stop - start, dtype=torch.uint8)
        # Indexing, not np.take: take first copies a strided array whole (the table, every read).
        return torch.from_numpy(self._records.numpy()[slots.numpy(), start:stop])

    def gather(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        col = self.columns[name]
        start = self._offsets[name]
        with self._lock:
            picked = self._take(self._slot_of[rows.cpu()], start, start + col.numel * col.dtype.itemsize)
        return picked.view(col.dtype).view(len(picked), *col.shape)

    def column(self, name: str) -> torch.Tensor:
        """Column ``name`` of every row, in row order: a strided view of the home slots (the table
        is compacted first when the log holds rows), never a copy."""
        with self._lock:
            self.compact()
            return self._field(self._records[: self.capacity], name)

    # -- writes ----------------------------------------------------------------------------------

    def scatter(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        self.scatter_columns(rows, {name: values})

    def scatter_columns(self, rows: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Writes ``values[name][i]`` into row ``rows[i]`` for each column given; the others keep
        theirs. A row given twice in a step-sized write keeps its last values."""
        rows = rows.cpu()
        if not rows.numel():
            return
        with self._lock:
            slots = self._slot_of[rows]
            if len(rows) >= IN_PLACE_ROWS:
                # A bulk write (adding users, a restore) goes through the map where the rows are:
                # rows numbered together sit together, so its pages are dirtied once each.
                for name, v in values.items():
                    field = self._field(self._records, name)
                    field.index_copy_(0, slots, v.detach().to(device="cpu", dtype=field.dtype).reshape(len(rows), *field.shape[1:]))
                return
            # An optimizer step gives every column: nothing of the old records is kept, so they are
            # not read again (the step gathered them moments ago).
            every = values.keys() == self.columns.keys()
            records = torch.zeros(len(rows), self.record_bytes, dtype=torch.uint8) if every else self._take(slots)
            for name, v in values.items():
                field = self._field(records, name)
                field.copy_(v.detach().reshape(field.shape))
            self._append(rows, records)

    def _append(self, rows: torch.Tensor, records: torch.Tensor) -> None:
        last = {r: i for i, r in enumerate(rows.tolist())}  # a row given twice: its last record
        if len(last) != len(rows):
            pick = torch.tensor(list(last.values()), dtype=torch.int64)
            rows, records = rows[pick], records[pick]
        if self.head + len(rows) > 2 * self.capacity:
            self._rebuild(self.capacity)
        os.pwrite(self._fd, records.numpy(), self.head * self.record_bytes)
        self._slot_of.index_copy_(0, rows, torch.arange(self.head, self.head + len(rows)))
        self.head += len(rows)

    # -- what the other tiers have -----------------------------------------------------------------

    def locate(self, rows: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        raise NotImplementedError("the disk tier appends updates; it hands out no rows to update in place")

    def flush(self) -> None:
        """Nothing is buffered: every write is in the page cache, which the OS writes back."""

    def reads_free_on(self, device: torch.device) -> bool:
        """Never: a gather reads records from the file, which a prefetch overlaps with the step."""
        return False

    @property
    def nbytes(self) -> int:
        return self.capacity * self.record_bytes

    @property
    def log_rows(self) -> int:
        """Rows appended since the last compaction (each also leaves a stale copy behind)."""
        return self.head - self.capacity


"""Tokenised examples as Arrow columns, read one example at a time without Python lists.

A run's examples live in an Arrow table, memory-mapped from the run's data cache (see
``cache.py``): ``input_ids`` and ``labels`` are list<int32> columns, so example ``i`` is a slice
of one flat buffer between two offsets, handed out as a numpy view. Every rank maps the same
file, so the pages are shared through the page cache instead of each rank holding its own copy
of every token as Python ints (about 36 bytes a token, against 4 here). User ids are kept once
per user, with one int32 code per example.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

IGNORE = -100


class _ListColumn:
    """Element ``i`` of a (chunked) list<int> column as a numpy view of its values."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self.values: list[np.ndarray] = []
        self.offsets: list[np.ndarray] = []
        starts = [0]
        for chunk in column.chunks:
            # ``offsets`` index ``values`` (the whole child array, slice offset included).
            self.offsets.append(chunk.offsets.to_numpy())
            self.values.append(chunk.values.to_numpy(zero_copy_only=True))
            starts.append(starts[-1] + len(chunk))
        self.starts = np.asarray(starts, dtype=np.int64)

    def _locate(self, i: int) -> tuple[int, int]:
        c = int(np.searchsorted(self.starts, i, side="right")) - 1 if len(self.values) > 1 else 0
        return c, i - int(self.starts[c])

    def __getitem__(self, i: int) -> np.ndarray:
        c, j = self._locate(i)
        off = self.offsets[c]
        return self.values[c][off[j] : off[j + 1]]

    def lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(o) for o in self.offsets]) if self.offsets else np.zeros(0, np.int64)

    def target_counts(self) -> np.ndarray:
        """Per element, how many entries after the first are not IGNORE (the loss's targets)."""
        out = []
        for off, values in zip(self.offsets, self.values):
            kept = np.concatenate([[0], np.cumsum(values[off[0] : off[-1]] != IGNORE)])
            rel = off - off[0]
            starts, ends = rel[:-1], rel[1:]
            first = (values[off[:-1]] != IGNORE).astype(np.int64) if len(starts) else np.zeros(0, np.int64)
            out.append(kept[ends] - kept[starts] - first)
        return np.concatenate(out) if out else np.zeros(0, np.int64)


class TokenizedExamples:
    """``user_id``, ``input_ids``, ``labels`` and ``source`` ("file:line") of each example.

    ``select(indices)`` is a view (the table is shared, not copied)."""

    def __init__(self, table: pa.Table, rows: np.ndarray | None = None,
                 _shared: tuple[_ListColumn, _ListColumn, np.ndarray, list[str]] | None = None) -> None:
        self.table = table
        if _shared is None:
            users = table.column("user_id")
            names = pc.unique(users).sort()
            codes = pc.index_in(users, value_set=names).to_numpy().astype(np.int32)
            _shared = (_ListColumn(table.column("input_ids")), _ListColumn(table.column("labels")), codes, names.to_pylist())
        self._shared = _shared
        self._ids, self._labels, self._all_codes, self.user_names = _shared
        self.rows = rows  # None: every row of the table, in order

    @classmethod
    def from_rows(cls, rows: Iterable[dict]) -> "TokenizedExamples":
        """From plain dicts (tests, small in-memory sets)."""
        rows = list(rows)
        return cls(pa.table({
            "user_id": pa.array([r["user_id"] for r in rows], pa.string()),
            "input_ids": pa.array([list(r["input_ids"]) for r in rows], pa.list_(pa.int32())),
            "labels": pa.array([list(r["labels"]) for r in rows], pa.list_(pa.int32())),
            "source": pa.array([r.get("source", f"row {k}") for k, r in enumerate(rows)], pa.string()),
        }))

    def concat(self, other: "TokenizedExamples") -> "TokenizedExamples":
        """These examples, then ``other``'s (index ``len(self) + j`` is ``other``'s ``j``). Whole
        tables only; the columns are chained, not copied."""
        if self.rows is not None or other.rows is not None:
            raise ValueError("concat joins whole tables, not views")
        names = ["user_id", "input_ids", "labels", "source"]
        first = self.table.select(names).replace_schema_metadata(None)
        return TokenizedExamples(pa.concat_tables([first, other.table.select(names).replace_schema_metadata(None).cast(first.schema)]))

    def __len__(self) -> int:
        return self.table.num_rows if self.rows is None else len(self.rows)

    def _row(self, i: int) -> int:
        return int(i) if self.rows is None else int(self.rows[i])

    def input_ids(self, i: int) -> np.ndarray:
        return self._ids[self._row(i)]

    def labels(self, i: int) -> np.ndarray:
        return self._labels[self._row(i)]

    def user(self, i: int) -> str:
        return self.user_names[self._all_codes[self._row(i)]]

    def source(self, i: int) -> str:
        return str(self.table.column("source")[self._row(i)].as_py())

    @property
    def user_codes(self) -> np.ndarray:
        """Per example, the index of its user in ``user_names``."""
        return self._all_codes if self.rows is None else self._all_codes[self.rows]

    def users(self) -> list[str]:
        """The distinct users of these examples, sorted."""
        return [self.user_names[c] for c in np.unique(self.user_codes)]

    def select(self, indices: Sequence[int] | np.ndarray) -> "TokenizedExamples":
        idx = np.asarray(indices, dtype=np.int64)
        return TokenizedExamples(self.table, idx if self.rows is None else self.rows[idx], self._shared)

    def by_user(self) -> dict[str, np.ndarray]:
        """Each user's example indices (into this view), in order."""
        codes = self.user_codes
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        return {self.user_names[int(codes[g[0]])]: g for g in np.split(order, bounds) if len(g)}

    def target_counts(self) -> np.ndarray:
        """Per example, the target tokens the loss is on."""
        counts = self._labels.target_counts()
        return counts if self.rows is None else counts[self.rows]

    def lengths(self) -> np.ndarray:
        lengths = self._ids.lengths()
        return lengths if self.rows is None else lengths[self.rows]

    def update_hash(self, h: "hashlib._Hash") -> None:
        """Feeds every example's user, tokens and labels into ``h``: the same bytes for the same
        examples however they are held (a whole table in any chunks, or a view)."""
        if self.rows is None:
            names, codes = self.user_names, self._all_codes
            columns = [(col.lengths(), [v[o[0] : o[-1]] for v, o in zip(col.values, col.offsets)])
                       for col in (self._ids, self._labels)]
        else:
            present, codes = np.unique(self.user_codes, return_inverse=True)
            names = [self.user_names[c] for c in present]
            columns = [(self.lengths(), [self.input_ids(i) for i in range(len(self))]),
                       (np.array([len(self.labels(i)) for i in range(len(self))]), [self.labels(i) for i in range(len(self))])]
        for name in names:
            h.update(name.encode("utf-8", "surrogatepass") + b"\x00")
        h.update(np.asarray(codes).astype("<i4").tobytes())
        for lengths, chunks in columns:
            h.update(b"\x01" + np.asarray(lengths).astype("<i8").tobytes())
            for values in chunks:
                h.update(np.asarray(values).astype("<i4").tobytes())

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        self.update_hash(h)
        return h.hexdigest()

"""The bounded device cache of served users' rows. ``AdapterCache`` holds at most ``capacity``
rows on the device, least recently used out first, filled on demand from a ``RowSource``
(``rows.py``) and read ahead for queued requests by a background reader; a row in use by a running
request is pinned and never evicted, and when the source is indexed again (a forget rewrote it)
the rows of users it no longer holds are dropped. It is the same idea as the store's hot-row
cache, for serving: 10^5 users served from a 256-row device table.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from flora_train.adapters import AdapterLayout, user_seed
from flora_train.cpu_threads import release_thread_team
from flora_train.inference.rows import RowSource

log = logging.getLogger("flora_train")


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
        finally:  # this thread's copies made an OpenMP team: it would slow the engine's (cpu_threads.py)
            release_thread_team()
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


__all__ = ["AdapterCache", "CacheFull", "CacheStats"]

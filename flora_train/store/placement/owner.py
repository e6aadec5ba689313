"""Owner placement: each example runs on the rank that owns its user, so rows never travel.

A rank's share of a step is its own users' examples; rows come from its own shard (read ahead for
the next step on a background thread when they live away from the compute device: disk tier,
host rows for a GPU, a hot-row cache), and gradients are already at the owner.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from flora_train.store.comm import CommCounters, Route
from flora_train.store.placement.base import OwnedStep, Placement, Prefetched, ShardedRows

if TYPE_CHECKING:
    from flora_train.store.sharded import ShardedAdapterStore


class OwnerPlacement(Placement):
    name = "owner"

    def __init__(self, store: "ShardedAdapterStore") -> None:
        super().__init__(store)
        self._counters = CommCounters()  # rows served from this rank's own shard
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="row-prefetch")

    @staticmethod
    def shares(pairs: list[tuple[str, int]], world: int, owner_of: Mapping[str, int]) -> list[list[tuple[str, int]]]:
        out: list[list[tuple[str, int]]] = [[] for _ in range(world)]
        for user, ex in pairs:
            out[owner_of[user]].append((user, ex))
        return out

    def _read(self, users: list[str]) -> tuple[torch.Tensor, Route | None]:
        self.store.check_local(users)
        self._counters.rows_fetched += len(users)
        if not users:
            return torch.empty(0, self.local.row_size, dtype=torch.float32), None
        return self.local.upload(users).wait(), None

    def _start_prefetch(self, users: list[str]) -> Prefetched | None:
        self.store.check_local(users)
        local = self.local
        if local.cache is None and local.table.reads_free_on(local.compute_device):
            return None  # rows already sit where they are computed on: nothing to overlap
        self._counters.rows_fetched += len(users)
        return Prefetched(users, future=self._pool.submit(self.local.upload, users, True)) if users else None

    def _reduce(self, rows: ShardedRows, grad: torch.Tensor) -> OwnedStep:
        return OwnedStep(rows.user_ids, self.local.row_ids(rows.user_ids), grad)

    def counters(self) -> CommCounters:
        return self._counters

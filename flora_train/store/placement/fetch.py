"""Fetch placement: a step's examples are cut into equal contiguous shares whatever their owners
(a user's examples may land on several ranks), and rows travel to where they are needed.

Each rank sends each owner the keys of the users it needs (a 63-bit hash of the user id); the
owner resolves them to its own table rows, so no rank ever assumes where another keeps a row. Rows
come back on one ``RowExchange`` (the next step's on a second, asynchronously, as a prefetch), and
after backward the gradients travel the same routes in reverse and are summed at the owner.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from flora_train import dist as fdist
from flora_train.store.comm import CommCounters, PendingRows, Route, RowExchange
from flora_train.store.placement.base import OwnedStep, Placement, Prefetched, ShardedRows
from flora_train.store.registry import user_key
from flora_train.data.batching import split_even

if TYPE_CHECKING:
    from flora_train.store.sharded import ShardedAdapterStore


class FetchPlacement(Placement):
    name = "fetch"

    def __init__(self, store: "ShardedAdapterStore") -> None:
        super().__init__(store)
        # Two groups of their own: the step's synchronous traffic and the asynchronous prefetch never
        # share a queue with each other or with the trainer's collectives.
        self.exchange = RowExchange(fdist.new_group(), self.local.row_size, self.local.compute_device)
        self.prefetcher = RowExchange(fdist.new_group(), self.local.row_size, self.local.compute_device)
        self._keys: dict[str, int] = {}
        self.local.registry.index_keys()  # an owner resolves keys: two users with one key fail at set-up

    @staticmethod
    def shares(pairs: list[tuple[str, int]], world: int, owner_of: Mapping[str, int]) -> list[list[tuple[str, int]]]:
        return [list(s) for s in split_even(pairs, world)]

    def _key(self, user: str) -> int:
        key = self._keys.get(user)
        if key is None:
            key = self._keys[user] = user_key(user)
        return key

    def _request(self, exchange: RowExchange, users: list[str], async_op: bool) -> PendingRows:
        owners = torch.tensor([self.store.owner(u) for u in users], dtype=torch.int64)
        keys = torch.tensor([self._key(u) for u in users], dtype=torch.int64)
        route = exchange.route(owners, keys, resolve=self.local.registry.rows_for_keys)
        return exchange.send_rows(route, self.local.step_rows, async_op)

    def _read(self, users: list[str]) -> tuple[torch.Tensor, Route | None]:
        pending = self._request(self.exchange, users, async_op=False)
        return pending.wait(), pending.route

    def _start_prefetch(self, users: list[str]) -> Prefetched | None:
        return Prefetched(users, pending=self._request(self.prefetcher, users, async_op=True))

    def _reduce(self, rows: ShardedRows, grad: torch.Tensor) -> OwnedStep:
        served_rows, served_grads = [], []
        for route, pos in rows.routes:
            g = torch.zeros(route.order.numel(), self.local.row_size, dtype=torch.float32, device=grad.device)
            present = pos >= 0  # prefetched rows of users that this step no longer needs send zeros
            g[present.nonzero().squeeze(1).to(g.device)] = grad[pos[present].to(g.device)]
            served_grads.append(self.exchange.send_grads(route, g))  # grads go back on the synchronous group
            served_rows.append(route.served_rows)
        all_rows = torch.cat(served_rows)
        all_grads = torch.cat(served_grads)
        unique, inverse = torch.unique(all_rows, return_inverse=True)
        summed = torch.zeros(unique.numel(), self.local.row_size, dtype=torch.float32).index_add_(0, inverse, all_grads.cpu())
        users = [self.local.registry.user(int(r)) for r in unique.tolist()]
        # Summed on the host: rows whose home is the host are updated there (store/transfer.py).
        return OwnedStep(users, unique, summed if self.local.link.host_home else summed.to(self.local.compute_device))

    def counters(self) -> CommCounters:
        total = CommCounters()
        for ex in (self.exchange, self.prefetcher):
            total.add(ex.counters)
        return total

"""The interface a placement gives the trainer, and what every placement shares.

A placement decides where a step's examples run (``shares``: a pure function every rank computes
alike) and how the rows get there and the gradients back (``fetch``, ``prefetch``,
``reduce_grads``). The trainer asks the store for its ``work`` and drives these four calls; it never
sees owners, row numbers or exchanges.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from flora_train.store.comm import CommCounters, PendingRows, Route
from flora_train.data.batching import MicroBatching
from flora_train.store.sharding import RankWork
from flora_train.store.store import StepRows
from flora_train.store.transfer import Download

if TYPE_CHECKING:
    from flora_train.store.sharded import ShardedAdapterStore


@dataclass
class ShardedRows(StepRows):
    """A rank's step rows, with the routes their gradients take back to the owners."""

    routes: list[tuple[Route, torch.Tensor]] = field(default_factory=list)  # (route, positions in values)


@dataclass
class OwnedStep:
    """What an owner updates: its local rows touched by the step and their summed gradients."""

    user_ids: list[str]
    row_ids: torch.Tensor
    grads: torch.Tensor
    download: Download | None = None  # the gradients on their way to the rows' home (started by the store)


@dataclass
class Prefetched:
    """Rows on their way for the next step: a background read (owner) or an exchange (fetch)."""

    users: list[str]
    pending: PendingRows | None = None
    future: Future | None = None

    def values(self) -> torch.Tensor:
        if self.future is not None:  # an Upload from the read thread: waited for here, where it is used
            return self.future.result().wait()
        return self.pending.wait()  # type: ignore[union-attr]


def micro_batches(shares: list[list[tuple[str, int]]], batching: MicroBatching | int,
                  lengths: np.ndarray | None = None) -> list[RankWork]:
    """Every rank's share cut into the same number of micro-batches (ZeRO-3 needs the same module
    sequence on every rank); a rank with less work gets smaller, or empty, micro-batches.
    ``batching``: the policy (an int: that many examples a micro-batch); ``lengths``: every
    example's token count (token budgets group by it)."""
    if isinstance(batching, int):
        batching = MicroBatching(examples=batching)
    if batching.tokens is not None and lengths is None:
        raise ValueError("token-budget micro-batches need the examples' lengths")
    return [RankWork(mbs) for mbs in batching.align(shares, lengths if lengths is not None else np.zeros(0, np.int64))]


class Placement(ABC):
    name: str

    def __init__(self, store: "ShardedAdapterStore") -> None:
        self.store = store
        self.local = store.local
        self._prefetch: Prefetched | None = None

    # -- what a strategy defines ------------------------------------------------------------------

    @staticmethod
    @abstractmethod
    def shares(pairs: list[tuple[str, int]], world: int, owner_of: Mapping[str, int]) -> list[list[tuple[str, int]]]:
        """Each rank's ``(user, example)`` pairs of a step (pure: every rank computes the same)."""

    @abstractmethod
    def _read(self, users: list[str]) -> tuple[torch.Tensor, Route | None]:
        """The rows of ``users`` not prefetched, and the route their gradients go back on."""

    @abstractmethod
    def _start_prefetch(self, users: list[str]) -> Prefetched | None:
        """Starts getting ``users``' rows for the next step (None: nothing worth overlapping)."""

    @abstractmethod
    def _reduce(self, rows: ShardedRows, grad: torch.Tensor) -> OwnedStep:
        """The gradients of the step's rows, summed at their owners."""

    @abstractmethod
    def counters(self) -> CommCounters:
        """What this rank fetched, served and sent."""

    # -- the interface the trainer drives ------------------------------------------------------

    def work(self, pairs: Iterable[tuple[str, int]], batching: MicroBatching | int,
             lengths: np.ndarray | None = None) -> RankWork:
        """This rank's micro-batches of a step's ``(user, example)`` pairs."""
        store = self.store
        return micro_batches(self.shares(list(pairs), store.world, store.plan.owners), batching, lengths)[store.rank]

    def fetch(self, users: Sequence[str], requires_grad: bool = True) -> ShardedRows:
        """The rows of ``users`` (unique) on the compute device as one leaf. Collective in fetch
        placement: every rank calls it once per step, even with no users."""
        if len(set(users)) != len(users):
            raise ValueError("fetch takes each user once")
        users = list(users)
        pre, self._prefetch = self._prefetch, None
        pieces: list[tuple[torch.Tensor, torch.Tensor]] = []  # (positions, values)
        routes: list[tuple[Route, torch.Tensor]] = []
        pos_of = {u: i for i, u in enumerate(users)}
        got: set[str] = set()
        if pre is not None:
            values = pre.values()
            keep = [i for i, u in enumerate(pre.users) if u in pos_of]
            pieces.append((torch.tensor([pos_of[pre.users[i]] for i in keep], dtype=torch.int64),
                           values[keep] if len(keep) != len(pre.users) else values))
            if pre.pending is not None:
                routes.append((pre.pending.route, torch.tensor([pos_of.get(u, -1) for u in pre.users], dtype=torch.int64)))
            got.update(pre.users)
        rest = [u for u in users if u not in got]
        values, route = self._read(rest)
        pos = torch.tensor([pos_of[u] for u in rest], dtype=torch.int64)
        if rest or not pieces:
            pieces.append((pos, values))
        if route is not None:
            routes.append((route, pos))
        device = self.local.compute_device
        if len(pieces) == 1 and torch.equal(pieces[0][0], torch.arange(len(users))):
            # Every piece is a fresh copy (a gather or a received buffer): one already in step
            # order is the step's rows. A second copy of LoRA's rows costs a pass over tens of MiB.
            out = pieces[0][1].to(device=device, dtype=torch.float32)
        else:
            out = torch.empty(len(users), self.local.row_size, dtype=torch.float32, device=device)
            for p, vals in pieces:
                if p.numel():
                    out.index_copy_(0, p.to(device), vals.to(device))
        return ShardedRows(users, torch.empty(0, dtype=torch.int64), out.requires_grad_(requires_grad), routes)

    def prefetch(self, users: Sequence[str], exclude: Sequence[str]) -> None:
        """Starts fetching the next step's rows, except those the current step will update.
        Collective in fetch placement (every rank calls it, in step order)."""
        skip = set(exclude)
        self._prefetch = self._start_prefetch([u for u in dict.fromkeys(users) if u not in skip])

    def settle(self) -> None:
        """Waits for a background read before the optimizer touches the table (or its cache)."""
        pre = self._prefetch
        if pre is not None and pre.future is not None:
            pre.future.result()

    def reset(self) -> None:
        """Forgets a prefetch (the store was restored under it)."""
        self._prefetch = None

    def reduce_grads(self, rows: ShardedRows) -> OwnedStep:
        """The gradients of the step's rows summed at their owners. Collective in fetch placement."""
        grad = rows.values.grad
        if grad is None:
            raise RuntimeError("no gradient on the step's rows; did backward run inside the adapter slot?")
        return self._reduce(rows, grad)

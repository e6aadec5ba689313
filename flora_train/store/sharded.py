"""The adapter store across ranks: every rank owns a shard of the users' rows and their optimizer
state (a local ``AdapterStore``), a ``ShardPlan`` says who owns whom, and in fetch placement a
``RowExchange`` moves rows and gradients. With one process it is the local store and nothing else.

A step, as the trainer drives it:

1. ``fetch(users)``: the rows of the users whose examples this rank computes, as one leaf tensor;
2. ``prefetch(next_users, exclude=step_users)``: starts getting the next step's rows (rows of the
   current step's users are fetched after their update, never stale);
3. forward/backward;
4. ``reduce_grads(rows)``: gradients go to the owners and are summed there -> ``OwnedStep``;
5. ``apply(owned, lr, keep)``: the owner's row-wise optimizer step on exactly those rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from flora_train import dist as fdist
from flora_train.store.comm import CommCounters, PendingRows, Route, RowExchange
from flora_train.store.saved import checkpoint_chain, read_users, shard_file
from flora_train.store.sharding import ShardError, ShardPlan
from flora_train.store.store import AdapterStore, StepRows


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


@dataclass
class _Prefetch:
    users: list[str]
    pending: PendingRows | None = None
    future: Future | None = None


class ShardedAdapterStore:
    def __init__(self, local: AdapterStore, plan: ShardPlan, placement: str = "owner", group: dist.ProcessGroup | None = None) -> None:
        self.local = local
        self.plan = plan
        self.placement = placement
        self.group = group
        self.rank = dist.get_rank(group) if fdist.is_distributed() else 0
        self.world = dist.get_world_size(group) if fdist.is_distributed() else 1
        plan.check(self.world)
        # Two groups of their own: the step's synchronous traffic and the asynchronous prefetch never
        # share a queue with each other or with the trainer's collectives.
        self.exchange = self.prefetcher = None
        if self.world > 1:
            self.exchange = RowExchange(fdist.new_group(), local.row_size, local.compute_device)
            self.prefetcher = RowExchange(fdist.new_group(), local.row_size, local.compute_device)
        self._row_index: tuple[int, dict[str, int]] | None = None
        self.local_counters = CommCounters()  # rows served from this rank's own shard
        self._prefetch: _Prefetch | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="row-prefetch")
        self.local.add_users(plan.users_of(self.rank))
        # The checkpoint whose shard_plan.json is this plan: a delta names it instead of rewriting
        # every user's owner (tens of MB at 10^6 users) when no user has joined since.
        self.plan_saved_in: str | None = None

    # -- population ----------------------------------------------------------------------------

    @property
    def row_size(self) -> int:
        return self.local.row_size

    @property
    def hyper(self):
        return self.local.hyper

    @property
    def row_init(self):
        return self.local.row_init

    def __len__(self) -> int:
        return len(self.plan.owners)

    def __contains__(self, user: str) -> bool:
        return user in self.plan.owners

    def owner(self, user: str) -> int:
        return self.plan.owner(user)

    def owns(self, user: str) -> bool:
        return self.plan.owner(user) == self.rank

    def add_users(self, user_tokens: Mapping[str, int]) -> list[str]:
        """New users (every rank passes the same mapping) join the least-loaded ranks with fresh rows;
        nothing already stored moves or is rebuilt."""
        new = self.plan.add_users(user_tokens)
        if new:
            self.plan_saved_in = None
        self.local.add_users([u for u in new if self.plan.owners[u] == self.rank])
        return new

    @property
    def counters(self) -> CommCounters:
        total = CommCounters()
        total.add(self.local_counters)
        for ex in (self.exchange, self.prefetcher):
            if ex is not None:
                total.add(ex.counters)
        return total

    def cache_stats(self) -> tuple[int, int]:
        c = self.local.cache
        return (c.hits, c.misses) if c is not None else (0, 0)

    # -- one step ------------------------------------------------------------------------------

    def _check_local(self, users: Sequence[str]) -> None:
        foreign = [u for u in users if not self.owns(u)]
        if foreign:
            raise ShardError(
                f"rank {self.rank} asked for rows of users it does not own in owner placement "
                f"(e.g. {foreign[0]!r} on shard {self.owner(foreign[0])})"
            )

    def _request(self, exchange: RowExchange | None, users: Sequence[str], async_op: bool) -> PendingRows:
        assert exchange is not None
        owners = torch.tensor([self.owner(u) for u in users], dtype=torch.int64)
        index = self._rows_at_owner()
        rows = torch.tensor([index[u] for u in users], dtype=torch.int64)
        route = exchange.route(owners, rows)
        return exchange.send_rows(route, lambda served: self.local.access.gather("rows", served), async_op)

    def _rows_at_owner(self) -> dict[str, int]:
        """Each user's row number in its owner's table. Owners register their users in plan order,
        so every rank can compute it without asking."""
        cached = self._row_index
        if cached is None or cached[0] != len(self.plan.owners):
            counts = [0] * self.world
            index = {}
            for user, r in self.plan.owners.items():
                index[user] = counts[r]
                counts[r] += 1
            cached = (len(self.plan.owners), index)
            self._row_index = cached
        return cached[1]

    def fetch(self, users: Sequence[str], requires_grad: bool = True) -> ShardedRows:
        """The rows of ``users`` (unique) on the compute device as one leaf. Collective in fetch
        placement: every rank calls it once per step, even with no users."""
        if len(set(users)) != len(users):
            raise ValueError("fetch takes each user once")
        users = list(users)
        pre, self._prefetch = self._prefetch, None
        got: set[str] = set()
        pieces: list[tuple[torch.Tensor, torch.Tensor]] = []  # (positions, values)
        routes: list[tuple[Route, torch.Tensor]] = []
        pos_of = {u: i for i, u in enumerate(users)}
        if pre is not None:
            values = pre.future.result() if pre.future is not None else pre.pending.wait()  # type: ignore[union-attr]
            keep = [i for i, u in enumerate(pre.users) if u in pos_of]
            pos = torch.tensor([pos_of[pre.users[i]] for i in keep], dtype=torch.int64)
            pieces.append((pos, values[keep] if len(keep) != len(pre.users) else values))
            if pre.pending is not None:
                routes.append((pre.pending.route, torch.tensor([pos_of.get(u, -1) for u in pre.users], dtype=torch.int64)))
            got.update(pre.users)
        rest = [u for u in users if u not in got]
        if self.exchange is None or self.placement == "owner":
            self._check_local(rest)
            if rest:
                pieces.append((torch.tensor([pos_of[u] for u in rest]), self.local.read(rest)))
            self.local_counters.rows_fetched += len(rest)
        else:
            pending = self._request(self.exchange, rest, async_op=False)
            pos = torch.tensor([pos_of[u] for u in rest], dtype=torch.int64)
            pieces.append((pos, pending.wait()))
            routes.append((pending.route, pos))
        device = self.local.compute_device
        if len(pieces) == 1 and torch.equal(pieces[0][0], torch.arange(len(users))):
            # Every piece is a fresh copy (a gather or a received buffer): one already in step
            # order is the step's rows. A second copy of LoRA's rows costs a pass over tens of MiB.
            values = pieces[0][1].to(device=device, dtype=torch.float32)
        else:
            values = torch.empty(len(users), self.row_size, dtype=torch.float32, device=device)
            for pos, vals in pieces:
                if pos.numel():
                    values.index_copy_(0, pos.to(device), vals.to(device))
        return ShardedRows(users, torch.empty(0, dtype=torch.int64), values.requires_grad_(requires_grad), routes)

    def prefetch(self, users: Sequence[str], exclude: Sequence[str]) -> None:
        """Starts fetching the next step's rows, except those the current step will update.
        Collective in fetch placement (every rank calls it, in step order)."""
        skip = set(exclude)
        users = [u for u in dict.fromkeys(users) if u not in skip]
        if self.exchange is None or self.placement == "owner":
            self._check_local(users)
            local = self.local
            if local.cache is None and local.table.tier != "disk" and local.table.device == local.compute_device:
                return  # rows already sit where they are computed on: nothing to overlap
            self.local_counters.rows_fetched += len(users)
            self._prefetch = _Prefetch(users, future=self._pool.submit(self.local.read, users) if users else None)
            if not users:
                self._prefetch = None
        else:
            self._prefetch = _Prefetch(users, pending=self._request(self.prefetcher, users, async_op=True))

    def _settle_prefetch(self) -> None:
        """Waits for a background read before the optimizer touches the table (or its cache)."""
        pre = self._prefetch
        if pre is not None and pre.future is not None:
            pre.future.result()

    def reduce_grads(self, rows: ShardedRows) -> OwnedStep:
        """The gradients of the step's rows summed at their owners. Collective in fetch placement."""
        grad = rows.values.grad
        if grad is None:
            raise RuntimeError("no gradient on the step's rows; did backward run inside the adapter slot?")
        if self.exchange is None or self.placement == "owner":
            row_ids = self.local.row_ids(rows.user_ids)
            return OwnedStep(rows.user_ids, row_ids, grad)
        served_rows, served_grads = [], []
        for route, pos in rows.routes:
            g = torch.zeros(route.order.numel(), self.row_size, dtype=torch.float32, device=grad.device)
            present = pos >= 0  # prefetched rows of users that this step no longer needs send zeros
            g[present.nonzero().squeeze(1).to(g.device)] = grad[pos[present].to(g.device)]
            served_grads.append(self.exchange.send_grads(route, g))  # grads go back on the synchronous group
            served_rows.append(route.served_rows)
        all_rows = torch.cat(served_rows)
        all_grads = torch.cat(served_grads)
        unique, inverse = torch.unique(all_rows, return_inverse=True)
        summed = torch.zeros(unique.numel(), self.row_size, dtype=torch.float32).index_add_(0, inverse, all_grads.cpu())
        users = [self.local.registry.user(int(r)) for r in unique.tolist()]
        return OwnedStep(users, unique, summed.to(self.local.compute_device))

    def steps(self, user_ids: Sequence[str]) -> torch.Tensor:
        """Step counters of users this rank owns."""
        self._settle_prefetch()  # the counters are about to be updated: no background read in between
        return self.local.steps(user_ids)

    def apply(self, owned: OwnedStep, lr: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        self._settle_prefetch()
        self.local.update(owned.row_ids, owned.grads, lr, keep)

    def read(self, user_ids: Sequence[str]) -> torch.Tensor:
        """Rows of users this rank owns (no communication)."""
        self._check_local(user_ids)
        self._settle_prefetch()
        return self.local.read(user_ids)

    def write(self, user_ids: Sequence[str], values: torch.Tensor) -> None:
        self._check_local(user_ids)
        self._settle_prefetch()
        self.local.write(user_ids, values)

    # -- persistence: one shard file per owner, written in parallel ----------------------------

    def save_shard(self, directory: Path, metadata: dict[str, str], delta: bool = False) -> list[str]:
        """Writes this rank's shard into ``directory`` (shared by all ranks); returns the file names.
        ``delta``: only the users changed since the checkpoint the store was last saved to or
        loaded from (``local.saved_at``), so the bytes follow the rows the steps touched."""
        self._settle_prefetch()
        rows = self.local.changed_rows() if delta else None
        ids = self.local.registry.ids
        users = ids if rows is None else [ids[r] for r in rows.tolist()]
        meta = {"row_size": str(self.row_size), "optimizer": self.hyper.name, "users": str(len(users)),
                "rank": str(self.rank), "world": str(self.world), "delta": str(delta), **metadata}
        store_name = shard_file(self.rank, self.world, "store")
        users_name = shard_file(self.rank, self.world, "users")
        save_file(self.local.state_tensors(rows), str(directory / store_name), metadata=meta)
        (directory / users_name).write_text(json.dumps({"user_ids": users}, ensure_ascii=False))
        return [store_name, users_name]

    def load_shards(self, directory: Path, plan: ShardPlan, fresh: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Takes this rank's users (under ``plan``, which may be for another world size than the
        one that saved) out of every shard of ``directory`` and the checkpoints it builds on (a
        delta's chain, oldest first, later ones overriding); users in ``fresh`` are new and get
        initial rows. Only the rows this rank owns are read (safetensors slices). Nothing changes
        unless every shard reads cleanly."""
        plan.check(self.world, str(directory / "shard_plan.json"))
        wanted = plan.users_of(self.rank)
        mine = set(wanted).difference(fresh)
        ids, parts = read_users(checkpoint_chain(directory), mine)
        missing = mine.difference(ids)
        if missing:
            raise ShardError(f"{directory}: no shard holds user {sorted(missing)[0]!r} (and {len(missing) - 1} more) of shard {self.rank}")
        new = [u for u in wanted if u in fresh]
        if new:  # fresh rows and zero optimizer state, appended after the saved users
            ids.extend(new)
            for key, t in parts.items():
                init = self.row_init(new) if key == "rows" else torch.zeros(len(new), *t[0].shape[1:], dtype=t[0].dtype)
                t.append(init.to(t[0].dtype))
        order = {u: i for i, u in enumerate(ids)}
        # Rows in plan order, which is the order every rank assumes for the owner's row numbers.
        perm = torch.tensor([order[u] for u in wanted], dtype=torch.int64)
        tensors = {k: torch.cat(v)[perm] for k, v in parts.items()}
        self.plan = plan
        self._row_index = None
        self._prefetch = None
        self.local.load_state(wanted, tensors, str(directory))
        # Equal to the checkpoint but for the fresh users: the next delta builds on it.
        self.local.mark_saved(directory.name, [i for i, u in enumerate(wanted) if u in fresh])

    def mark_saved(self, checkpoint: str) -> None:
        self.local.mark_saved(checkpoint)

    @property
    def saved_at(self) -> str | None:
        return self.local.saved_at

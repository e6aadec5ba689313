"""The adapter store across ranks: every rank owns a shard of the users' rows and their optimizer
state (a local ``AdapterStore``), a ``ShardPlan`` says who owns whom, and a placement
(``placement/owner.py`` or ``placement/fetch.py``) says where a step's examples run and moves rows
and gradients accordingly. With one process it is the local store and nothing else.

A step, as the trainer drives it:

1. ``work(pairs)``: this rank's micro-batches of the step's ``(user, example)`` pairs;
2. ``fetch(users)``: the rows of the users whose examples this rank computes, as one leaf tensor;
3. ``prefetch(next_users, exclude=step_users)``: starts getting the next step's rows (rows of the
   current step's users are fetched after their update, never stale);
4. forward/backward;
5. ``reduce_grads(rows)``: gradients go to the owners and are summed there -> ``OwnedStep``;
6. ``apply(owned, lr, keep)``: the owner's row-wise optimizer step on exactly those rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from flora_train import dist as fdist
from flora_train.data.batching import MicroBatching
from flora_train.store.comm import CommCounters
from flora_train.store.placement import OwnedStep, ShardedRows, make_placement
from flora_train.store.saved import iter_copies, newest_copies, shard_file, shard_shapes
from flora_train.store.shard_writer import save_rows
from flora_train.store.sharding import RankWork, ShardError, ShardPlan
from flora_train.store.store import AdapterStore
from flora_train.store.table import saved_key

__all__ = ["OwnedStep", "ShardedAdapterStore", "ShardedRows"]


class ShardedAdapterStore:
    def __init__(self, local: AdapterStore, plan: ShardPlan, placement: str = "owner", group: dist.ProcessGroup | None = None) -> None:
        self.local = local
        self.plan = plan
        self.group = group
        self.rank = dist.get_rank(group) if fdist.is_distributed() else 0
        self.world = dist.get_world_size(group) if fdist.is_distributed() else 1
        plan.check(self.world)
        self.local.add_users(plan.users_of(self.rank))
        self.placement = make_placement(placement, self)
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
        return self.placement.counters()

    def transfers(self) -> dict[str, int]:
        """Bytes this rank moved between host homes and the compute device (store/transfer.py)."""
        return self.local.link.transfers.as_dict()

    def cache_stats(self) -> tuple[int, int]:
        c = self.local.cache
        return (c.hits, c.misses) if c is not None else (0, 0)

    # -- one step: the placement's ---------------------------------------------------------------

    def work(self, pairs: Iterable[tuple[str, int]], batching: MicroBatching | int,
             lengths: np.ndarray | None = None) -> RankWork:
        return self.placement.work(pairs, batching, lengths)

    def fetch(self, users: Sequence[str], requires_grad: bool = True) -> ShardedRows:
        return self.placement.fetch(users, requires_grad)

    def prefetch(self, users: Sequence[str], exclude: Sequence[str]) -> None:
        self.placement.prefetch(users, exclude)

    def reduce_grads(self, rows: ShardedRows) -> OwnedStep:
        """The step's gradients summed at their owners, already on their way to the rows' home
        (the step's loss and finiteness collectives run while they travel)."""
        owned = self.placement.reduce_grads(rows)
        owned.download = self.local.download(owned.grads)
        return owned

    def check_local(self, users: Sequence[str]) -> None:
        """Refuses users whose rows another rank holds (reads without communication)."""
        foreign = [u for u in users if not self.owns(u)]
        if foreign:
            raise ShardError(f"rank {self.rank} holds no row of user {foreign[0]!r} (shard {self.owner(foreign[0])} does)")

    def steps(self, user_ids: Sequence[str]) -> torch.Tensor:
        """Step counters of users this rank owns."""
        self.placement.settle()  # the counters are about to be updated: no background read in between
        return self.local.steps(user_ids)

    def apply(self, owned: OwnedStep, lr: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        self.placement.settle()
        self.local.update(owned.row_ids, owned.download or owned.grads, lr, keep)

    def read(self, user_ids: Sequence[str], served: bool = False) -> torch.Tensor:
        """Rows of users this rank owns (no communication); ``served``: the rows they are served with."""
        self.check_local(user_ids)
        self.placement.settle()
        return self.local.read(user_ids, served)

    def validated(self, losses: dict[str, float], step: int, patience: int | None,
                  users: AbstractSet[str] | None = None) -> None:
        """Records a validation of every user this rank owns (``losses``: every user's; NaN or absent
        where it had none); ``users``: of those only (a phase's: the others' selection stays as it is)."""
        mine = [u for u in self.local.registry.ids if users is None or u in users]
        if mine:
            self.placement.settle()
            self.local.validated(mine, torch.tensor([losses.get(u, float("nan")) for u in mine]), step, patience)

    def restart_selection(self, users: AbstractSet[str]) -> None:
        """``users`` (those this rank owns) choose afresh from their next validation on."""
        mine = [u for u in self.local.registry.ids if u in users]
        if mine:
            self.placement.settle()
            self.local.restart_selection(mine)

    def stop(self, users: Sequence[str], step: int) -> None:
        """``users`` (those this rank owns) leave the plan after ``step``."""
        mine = [u for u in users if u in self.local.registry]
        if mine:
            self.placement.settle()
            self.local.stop(mine, step)

    def selection_losses(self) -> dict[str, float]:
        """Every user's kept row's validation loss, from every rank (collective)."""
        self.placement.settle()
        return {u: v for part in fdist.all_gather_objects(self.local.best_losses()) for u, v in part.items()}

    def stopped(self) -> set[str]:
        """Every rank's users that left the plan (collective)."""
        self.placement.settle()
        return {u for part in fdist.all_gather_objects(self.local.stopped()) for u in part}

    def write(self, user_ids: Sequence[str], values: torch.Tensor) -> None:
        self.check_local(user_ids)
        self.placement.settle()
        self.local.write(user_ids, values)

    # -- persistence: one shard file per owner, written in parallel ----------------------------

    def save_shard(self, directory: Path, metadata: dict[str, str], delta: bool = False) -> list[str]:
        """Writes this rank's shard into ``directory`` (shared by all ranks); returns the file names.
        ``delta``: only the users changed since the checkpoint the store was last saved to or
        loaded from (``local.saved_at``), so the bytes follow the rows the steps touched."""
        self.placement.settle()
        rows = self.local.changed_rows() if delta else None
        ids = self.local.registry.ids
        users = ids if rows is None else [ids[r] for r in rows.tolist()]
        meta = {"row_size": str(self.row_size), "optimizer": self.hyper.name, "users": str(len(users)),
                "rank": str(self.rank), "world": str(self.world), "delta": str(delta), **metadata}
        store_name = shard_file(self.rank, self.world, "store")
        users_name = shard_file(self.rank, self.world, "users")
        # A full shard is written a slice at a time: the columns are never copied whole.
        save_rows(self.local.state_tensors(rows), directory / store_name, meta)
        (directory / users_name).write_text(json.dumps({"user_ids": users}, ensure_ascii=False))
        return [store_name, users_name]

    def load_shards(self, chain: list[Path], plan: ShardPlan, fresh: set[str] = frozenset(), chunk: int = 8192) -> None:  # type: ignore[assignment]
        """Takes this rank's users (under ``plan``, which may be for another world size than the
        one that saved) out of every shard of the folders of ``chain`` (oldest first, each user's
        newest copy winning); users in ``fresh`` are new and get initial rows.
        Only the rows this rank owns are read (safetensors slices), ``chunk`` users at a time, so
        a restore's memory does not grow with the population. User lists and tensor shapes are
        all checked before the store changes."""
        directory = chain[-1]
        plan.check(self.world, str(directory))
        wanted = plan.users_of(self.rank)
        mine = set(wanted).difference(fresh)
        copies = newest_copies(chain, mine)
        found = sum(len(take) for _, take in copies.values())
        if found != len(mine):
            held = {users[i] for users, take in copies.values() for i in take}
            missing = sorted(mine.difference(held))
            raise ShardError(f"{directory}: no shard holds user {missing[0]!r} (and {len(missing) - 1} more) of shard {self.rank}")
        for path, (users, _) in copies.items():
            self.local.check_state(len(users), shard_shapes(path), str(path))
        position = {u: i for i, u in enumerate(wanted)}  # rows in plan order, as the plan lists them
        self.placement.settle()
        self.local.begin_load(wanted, str(directory))
        for _, users, tensors in iter_copies(copies, chunk):
            self.local.load_rows(torch.tensor([position[u] for u in users], dtype=torch.int64), tensors)
        new = [u for u in wanted if u in fresh]
        for k in range(0, len(new), chunk):  # fresh rows and zero optimizer state
            some = new[k : k + chunk]
            state = {saved_key(name): torch.zeros(len(some), *col.shape, dtype=col.dtype)
                     for name, col in self.local.table.columns.items()}
            state["rows"] = self.row_init(some).to(state["rows"].dtype)
            self.local.load_rows(torch.tensor([position[u] for u in some], dtype=torch.int64), state)
        self.plan = plan
        self.placement.reset()
        # Equal to the checkpoint but for the fresh users: the next delta builds on it.
        self.local.mark_saved(directory.name, [position[u] for u in new])

    def mark_saved(self, checkpoint: str) -> None:
        self.local.mark_saved(checkpoint)

    def unchanged_since_saved(self) -> bool:
        """No row of this rank changed since ``saved_at`` (nor was added fresh at its restore)."""
        return len(self.local.changed_rows()) == 0

    @property
    def saved_at(self) -> str | None:
        return self.local.saved_at

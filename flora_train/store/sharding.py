"""Which rank owns which user's row, and which rank computes which of a step's examples.

Ownership is a ``ShardPlan``: a balanced packing of users onto ranks by their token counts
(heaviest first onto the least-loaded rank, the LPT rule), computed once from the data and saved
with every checkpoint, so a user keeps its owner for the life of a run; users that arrive later go
to the least-loaded rank. A restore onto another world size packs again and moves rows.

Which rank computes which examples of a step is the placement's (``placement/``): each gives
every rank a ``RankWork``, the same number of micro-batches on every rank.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field


class ShardError(RuntimeError):
    pass


@dataclass
class ShardPlan:
    world: int
    owners: dict[str, int] = field(default_factory=dict)
    load: list[int] = field(default_factory=list)  # packed tokens per rank

    def __post_init__(self) -> None:
        if self.world < 1:
            raise ShardError(f"a shard plan needs a world of at least 1 rank, got {self.world}")
        if not self.load:
            self.load = [0] * self.world

    @classmethod
    def balanced(cls, user_tokens: Mapping[str, int], world: int) -> "ShardPlan":
        plan = cls(world)
        plan.add_users(user_tokens)
        return plan

    def add_users(self, user_tokens: Mapping[str, int]) -> list[str]:
        """Places users not yet owned, heaviest first, each on the least-loaded rank; returns them."""
        new = sorted((u for u in user_tokens if u not in self.owners), key=lambda u: (-int(user_tokens[u]), u))
        heap = [(load, rank) for rank, load in enumerate(self.load)]
        heapq.heapify(heap)
        for user in new:
            load, rank = heapq.heappop(heap)
            self.owners[user] = rank
            load += max(int(user_tokens[user]), 1)  # users without tokens still count, so they spread
            self.load[rank] = load
            heapq.heappush(heap, (load, rank))
        return new

    def owner(self, user: str) -> int:
        try:
            return self.owners[user]
        except KeyError:
            raise ShardError(f"user {user!r} has no owning rank in the shard plan") from None

    def users_of(self, rank: int) -> list[str]:
        return [u for u, r in self.owners.items() if r == rank]

    def check(self, world: int, source: str = "shard plan") -> None:
        """Every user must map to a live rank of a world of ``world`` ranks."""
        if self.world != world:
            raise ShardError(f"{source}: made for {self.world} ranks, but the job has {world}")
        for user, rank in self.owners.items():
            if not 0 <= rank < world:
                raise ShardError(f"{source}: user {user!r} is owned by shard {rank}, which is not a live rank (0..{world - 1})")

    def to_dict(self) -> dict:
        return {"world": self.world, "load": self.load, "owners": self.owners}

    @classmethod
    def from_dict(cls, data: dict, source: str = "shard plan") -> "ShardPlan":
        try:
            plan = cls(int(data["world"]), {str(u): int(r) for u, r in data["owners"].items()}, [int(x) for x in data["load"]])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ShardError(f"{source}: not a shard plan ({exc})") from None
        plan.check(plan.world, source)
        return plan


@dataclass(frozen=True)
class RankWork:
    """One rank's share of a step: ``micro_batches`` of ``(user, example)`` pairs (some may be empty)."""

    micro_batches: tuple[tuple[tuple[str, int], ...], ...]

    @property
    def pairs(self) -> list[tuple[str, int]]:
        return [p for mb in self.micro_batches for p in mb]

    @property
    def user_ids(self) -> list[str]:
        return list(dict.fromkeys(u for u, _ in self.pairs))

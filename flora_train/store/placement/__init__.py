"""Placements, one module each (TorchRec's one file per sharding strategy): where a step's examples
run and how adapter rows and their gradients move. ``owner.py``: examples go to their rows;
``fetch.py``: rows go to the examples. Both behind ``base.Placement``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from flora_train.data.batching import MicroBatching
from flora_train.store.placement.base import OwnedStep, Placement, ShardedRows, micro_batches
from flora_train.store.placement.fetch import FetchPlacement
from flora_train.store.placement.owner import OwnerPlacement
from flora_train.store.sharding import RankWork

if TYPE_CHECKING:
    from flora_train.store.sharded import ShardedAdapterStore

PLACEMENTS: dict[str, type[Placement]] = {"owner": OwnerPlacement, "fetch": FetchPlacement}

__all__ = ["PLACEMENTS", "OwnedStep", "Placement", "ShardedRows", "make_placement", "partition_step"]


def _strategy(name: str) -> type[Placement]:
    try:
        return PLACEMENTS[name]
    except KeyError:
        raise ValueError(f"store.placement must be one of {tuple(PLACEMENTS)}, got {name!r}") from None


def make_placement(name: str, store: "ShardedAdapterStore") -> Placement:
    """The strategy for ``store``. One process has nothing to move: every placement is local there."""
    strategy = _strategy(name)
    return strategy(store) if store.world > 1 else OwnerPlacement(store)


def partition_step(pairs: Iterable[tuple[str, int]], world: int, placement: str, owner_of: Mapping[str, int],
                   batching: MicroBatching | int, lengths: np.ndarray | None = None) -> list[RankWork]:
    """Every rank's micro-batches of a step's ``(user, example)`` pairs under ``placement`` (a pure
    function: what each rank's ``Placement.work`` computes for itself)."""
    return micro_batches(_strategy(placement).shares(list(pairs), world, owner_of), batching, lengths)

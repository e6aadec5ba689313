"""The store's tiers: where a shard's rows and their optimizer state live (``store.tier``).

One registry, ``TIERS``; the recipe's ``StoreTier`` enum is its keys. A tier makes the table that
holds the columns and says whether that table already sits on the compute device, which decides
the rest of the store's wiring: a hot-row cache and the host link only pay when it does not
(``AdapterStore``), and the owner placement's prefetch asks the table itself (``reads_free_on``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from flora_train.store.disk_table import DiskTable
from flora_train.store.table import Column, RowTable


class Tier(Protocol):
    on_compute_device: bool  # its rows are where the step computes: nothing to cache or link

    def table(self, columns: dict[str, Column], compute_device: torch.device,
              directory: Path | None) -> RowTable | DiskTable: ...


@dataclass(frozen=True)
class MemoryTier:
    on_compute_device: bool

    def table(self, columns: dict[str, Column], compute_device: torch.device,
              directory: Path | None) -> RowTable:
        return RowTable(columns, compute_device if self.on_compute_device else torch.device("cpu"))


@dataclass(frozen=True)
class DiskTier:
    on_compute_device: bool = False

    def table(self, columns: dict[str, Column], compute_device: torch.device,
              directory: Path | None) -> DiskTable:
        if directory is None:
            raise ValueError("the disk tier needs a directory for its records file")
        return DiskTable(columns, directory)


TIERS: dict[str, Tier] = {
    "device": MemoryTier(on_compute_device=True),  # tensors on the compute device
    "host": MemoryTier(on_compute_device=False),  # tensors in host memory; a step's rows cross to the device
    "disk": DiskTier(),  # records in one file, for populations larger than RAM (disk_table.py)
}


def tier_named(name: str) -> Tier:
    try:
        return TIERS[name]
    except KeyError:
        raise ValueError(f"store tier must be one of {tuple(TIERS)}, got {name!r}") from None

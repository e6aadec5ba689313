"""The single-process adapter store: registry + table of rows + row-wise optimizer.

A step fetches the rows of its users as one leaf tensor on the compute device, the model writes
their gradients into it, and ``apply`` runs the optimizer on exactly those rows. Work per step is
proportional to the rows in the step, never to the rows in the table (``index_select`` /
``index_copy_`` on row numbers). A sharded store (other placements) keeps this interface.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flora_train.store.optim import OptimizerHyper, RowwiseOptimizer
from flora_train.store.registry import UserRegistry

RowInit = Callable[[Sequence[str]], torch.Tensor]


@dataclass
class StepRows:
    """The rows of one step's users on the compute device: ``values [users, row_size]`` is a leaf."""

    user_ids: list[str]
    row_ids: torch.Tensor
    values: torch.Tensor

    def position(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.user_ids)}


class AdapterStore:
    def __init__(
        self,
        row_size: int,
        row_init: RowInit,
        hyper: OptimizerHyper,
        storage_device: torch.device | str = "cpu",
        compute_device: torch.device | str = "cpu",
    ) -> None:
        self.row_size = row_size
        self.row_init = row_init
        self.hyper = hyper
        self.storage_device = torch.device(storage_device)
        self.compute_device = torch.device(compute_device)
        self.registry = UserRegistry()
        self._rows = torch.empty(0, row_size, dtype=torch.float32, device=self.storage_device)
        self.optimizer = RowwiseOptimizer(hyper, row_size, 0, self.storage_device)

    def __len__(self) -> int:
        return len(self.registry)

    @property
    def capacity(self) -> int:
        return self._rows.shape[0]

    def _reserve(self, n: int) -> None:
        """Makes room for ``n`` rows, keeping the rows of the users registered so far."""
        if n <= self.capacity:
            return
        capacity = max(n, 2 * self.capacity, 16)  # amortised growth: adding users never rebuilds per user
        grown = torch.empty(capacity, self.row_size, dtype=torch.float32, device=self.storage_device)
        kept = min(len(self), self.capacity)
        grown[:kept] = self._rows[:kept]
        self._rows = grown
        self.optimizer.resize(capacity)

    def add_users(self, user_ids: Sequence[str]) -> list[str]:
        """Registers unknown users with freshly initialised rows; returns the new ids."""
        start = len(self)
        new = [u for u in dict.fromkeys(user_ids) if u not in self.registry]
        if new:
            init = self.row_init(new)
            if init.shape != (len(new), self.row_size):
                raise ValueError(f"row_init returned {tuple(init.shape)}, expected {(len(new), self.row_size)}")
            self._reserve(start + len(new))
            self.registry.add(new)
            self._rows[start : start + len(new)] = init.to(self.storage_device)
        return new

    def _row_ids(self, user_ids: Sequence[str]) -> torch.Tensor:
        return torch.tensor(self.registry.rows(user_ids), dtype=torch.int64, device=self.storage_device)

    def read(self, user_ids: Sequence[str]) -> torch.Tensor:
        """A copy of the users' rows ``[len(user_ids), row_size]`` on the storage device."""
        return self._rows.index_select(0, self._row_ids(user_ids))

    def write(self, user_ids: Sequence[str], values: torch.Tensor) -> None:
        """Overwrites the users' rows (e.g. loading an exported adapter); optimizer state is kept."""
        self._rows.index_copy_(0, self._row_ids(user_ids), values.to(self._rows))

    def steps(self, user_ids: Sequence[str]) -> torch.Tensor:
        """Each user's optimizer step counter (how many steps it has trained)."""
        return self.optimizer.steps(self._row_ids(user_ids))

    def fetch(self, user_ids: Sequence[str], requires_grad: bool = True) -> StepRows:
        if len(set(user_ids)) != len(user_ids):
            raise ValueError("fetch takes each user once")
        row_ids = self._row_ids(user_ids)
        values = self._rows.index_select(0, row_ids).to(self.compute_device)
        return StepRows(list(user_ids), row_ids, values.requires_grad_(requires_grad))

    def apply(self, step: StepRows, lr: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """One optimizer step on the step's rows from ``step.values.grad``.

        ``lr [users]`` is each row's learning rate; ``keep [users]`` (bool) leaves rows out of the
        update entirely (weights, moments and step counter untouched).
        """
        grad = step.values.grad
        if grad is None:
            raise RuntimeError("no gradient on the step's rows; did backward run inside the adapter slot?")
        row_ids, params, lr = step.row_ids, step.values.detach(), lr
        if keep is not None:
            sel = keep.nonzero().squeeze(1)
            row_ids, params, grad, lr = row_ids[sel.to(row_ids.device)], params[sel], grad[sel], lr[sel]
        if row_ids.numel() == 0:
            return
        dev = self.storage_device
        new = self.optimizer.update(params.to(dev), row_ids, grad.to(dev), lr.to(dev))
        self._rows.index_copy_(0, row_ids, new)

    # -- persistence ---------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        n = len(self)
        tensors = {"rows": self._rows[:n]}
        tensors.update({f"optim.{k}": v[:n] for k, v in self.optimizer.state.items()})
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def save(self, directory: Path, metadata: dict[str, str] | None = None) -> None:
        """Writes ``store.safetensors`` and ``users.json`` into ``directory`` (which must exist)."""
        meta = {"row_size": str(self.row_size), "optimizer": self.hyper.name, "users": str(len(self))}
        meta.update(metadata or {})
        save_file(self.state_tensors(), str(directory / "store.safetensors"), metadata=meta)
        self.registry.save(directory / "users.json")

    def load(self, directory: Path) -> None:
        """Replaces this store's users, rows and optimizer state with those saved in ``directory``."""
        path = directory / "store.safetensors"
        tensors = load_file(str(path))
        registry = UserRegistry.load(directory / "users.json")
        n = len(registry)
        rows = tensors.get("rows")
        if rows is None or rows.shape != (n, self.row_size):
            got = None if rows is None else tuple(rows.shape)
            raise ValueError(f"{path}: rows have shape {got}, expected {(n, self.row_size)} for {n} users")
        missing = [k for k in self.optimizer.state if f"optim.{k}" not in tensors]
        if missing:
            raise ValueError(f"{path}: optimizer state {missing} missing (saved with another optimizer?)")
        self.registry = registry
        self._rows = torch.empty(0, self.row_size, dtype=torch.float32, device=self.storage_device)
        self.optimizer = RowwiseOptimizer(self.hyper, self.row_size, 0, self.storage_device)
        self._reserve(n)
        self._rows[:n] = rows.to(self.storage_device)
        for k, v in self.optimizer.state.items():
            v[:n] = tensors[f"optim.{k}"].to(self.storage_device)

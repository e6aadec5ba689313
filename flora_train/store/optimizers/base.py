"""What every row-wise optimizer shares: its hyperparameters and the interface the store calls.

An optimizer's state is columns of the store's row table (so it lives, moves and is saved with
the rows); ``update`` changes only the rows it is given. Each row keeps its own step counter, so
bias correction and a learning-rate schedule advance only when that user trains: a user's
trajectory never depends on how many steps other users took.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from flora_train.store.disk_table import DiskTable
from flora_train.store.table import Column, HotRowCache, RowTable

RowAccess = RowTable | DiskTable | HotRowCache

STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STEP = Column((), torch.int64)  # every optimizer's per-row step counter


@dataclass(frozen=True)
class OptimizerHyper:
    name: str = "adamw"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    state_dtype: str = "float32"  # one of the optimizer's ``state_dtypes``
    # rowwise_adagrad: where each adapted module's numbers start in a row (the accumulators' groups);
    # empty: the whole row is one group.
    segments: tuple[int, ...] = ()

    def state_bytes(self, row_size: int) -> int:
        """Optimizer state per user: the bytes of its columns (the step counter included)."""
        from flora_train.store.optimizers import make_optimizer  # the registry imports this module

        return sum(c.numel * c.dtype.itemsize for c in make_optimizer(self).columns(row_size).values())

    def label(self) -> str:
        """``name``, with the state's dtype where the optimizer has a choice of them: ``adamw/bfloat16``."""
        from flora_train.store.optimizers import OPTIMIZERS

        kind = OPTIMIZERS.get(self.name)
        return f"{self.name}/{self.state_dtype}" if kind is not None and len(kind.state_dtypes) > 1 else self.name


def state_dtype_refusal(name: str, state_dtype: str) -> str:
    """Why optimizer ``name`` cannot keep its state in ``state_dtype``, and which optimizers can."""
    from flora_train.store.optimizers import OPTIMIZERS

    able = [o.name for o in OPTIMIZERS.values() if state_dtype in o.state_dtypes]
    return (f"{name} keeps its state in {', '.join(OPTIMIZERS[name].state_dtypes)}, not {state_dtype!r}"
            + (f" ({state_dtype} state is for {', '.join(able)})" if able else ""))


class RowOptimizer(ABC):
    """One optimizer of the registry (``optimizers/__init__.py``): its columns and its update."""

    name: str
    # The dtypes its state may be kept in (keys of STATE_DTYPES), the first the default.
    state_dtypes: tuple[str, ...] = ("float32",)

    def __init__(self, hyper: OptimizerHyper) -> None:
        if hyper.state_dtype not in self.state_dtypes:
            raise ValueError(state_dtype_refusal(self.name, hyper.state_dtype))
        self.hyper = hyper

    @abstractmethod
    def columns(self, row_size: int) -> dict[str, Column]:
        """The per-row state it keeps beside ``rows``: ``step`` and its moments or accumulators."""

    @abstractmethod
    def update(self, table: RowAccess, rows: torch.Tensor, grads: torch.Tensor, lr: torch.Tensor) -> None:
        """Updates table ``rows [n]`` (weights, state, step counters) from ``grads [n, D]``; ``lr [n]``
        is each row's learning rate for this step."""


class FusedRowOptimizer(RowOptimizer):
    """An optimizer whose state is whole-row moments, updated by one of torch's fused functional
    kernels (``torch.optim.adamw.adamw``, ``torch.optim.adagrad.adagrad``) on the rows where they live."""

    moments: tuple[str, ...]

    def columns(self, row_size: int) -> dict[str, Column]:
        dtype = STATE_DTYPES[self.hyper.state_dtype]
        return {"step": STEP, **{name: Column((row_size,), dtype) for name in self.moments}}

    @abstractmethod
    def fused(self, state: list[list[torch.Tensor]], grads: list[torch.Tensor], steps: list[torch.Tensor],
              lr: float) -> None:
        """One fused kernel call: ``state`` is ``[params, *moments]``, each a list of row tensors."""

    @torch.no_grad()
    def update(self, table: RowAccess, rows: torch.Tensor, grads: torch.Tensor, lr: torch.Tensor) -> None:
        """The store hands the gradients over where the table lives (the host for host rows: the
        moments never cross, ``transfer.py``), so rows of an in-place table are updated where they
        lie: no copy of the weights or moments is made, which at LoRA on every linear layer is tens
        of MiB per step, read and written once by one fused kernel (torch's fused CPU kernel on the
        host). bfloat16 moments and the disk tier gather, update and scatter back, on the same device.
        """
        names = ("rows", *self.moments)
        state_dtype = STATE_DTYPES[self.hyper.state_dtype]
        # bfloat16 moments are widened to float32 copies for the fused kernel; the disk tier
        # appends updated rows instead of writing them where they lie (disk_table.py).
        in_place = table.updates_in_place and state_dtype == torch.float32
        if in_place:
            data, where = table.locate(rows)
            in_place = data["rows"].device == grads.device
        if in_place:
            steps = data["step"].index_select(0, where) + 1
            data["step"].index_copy_(0, where, steps)
            state = {n: [data[n][i] for i in where.tolist()] for n in names}
        else:
            steps = table.gather("step", rows) + 1
            copies = {n: table.gather(n, rows).to(grads.device, torch.float32) for n in names}
            state = {n: list(copies[n].unbind()) for n in names}
        grad_rows = list(grads.to(torch.float32).unbind())
        # torch's functional optimizers count the step themselves: they are handed the step before.
        step_list = list((steps - 1).to(device=grads.device, dtype=torch.float32).unbind())
        lr_values = lr.tolist()
        # The fused kernels take one learning rate; rows at different points of their schedules
        # run as one call per distinct rate (a handful: warm-up and decay are shared by most users).
        for value in sorted(set(lr_values)):
            pick = [i for i, v in enumerate(lr_values) if v == value]
            self.fused([[lst[i] for i in pick] for lst in (state[n] for n in names)], [grad_rows[i] for i in pick],
                       [step_list[i] for i in pick], value)
        if not in_place:
            table.scatter_columns(rows, {"step": steps, **{n: copies[n] if n == "rows" else copies[n].to(state_dtype)
                                                           for n in names}})

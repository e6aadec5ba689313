"""Row-wise sparse optimizers: state per row, updates only the rows they are given.

``rowwise_adagrad`` is TorchRec/FBGEMM's row-wise Adagrad: one accumulator per row and adapted
module (the mean of the squared gradient over the module's numbers), not one per number, so its
state is a few floats per user instead of a copy of the adapter. AdamW's two moments may be kept
in bfloat16 (``state_dtype``), half their bytes; they are read into float32 for the update and
rounded to nearest on the way back.

Each row keeps its own step counter, so bias correction and a learning-rate schedule advance
only when that user trains; a user's trajectory never depends on how many steps other users took.
The update of one row is ``torch.optim.AdamW`` / ``Adagrad`` (``fused=True``) on a dense parameter
holding that row alone: their public functional forms (``torch.optim.adamw.adamw``,
``torch.optim.adagrad.adagrad``) run the same fused kernel on the rows where they live.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim.adagrad import adagrad
from torch.optim.adamw import adamw

from flora_train.store.disk_table import DiskTable
from flora_train.store.table import Column, HotRowCache, RowTable

RowAccess = RowTable | DiskTable | HotRowCache


NAMES = ("adamw", "adagrad", "rowwise_adagrad")
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class OptimizerHyper:
    name: str = "adamw"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    state_dtype: str = "float32"  # adamw's moments: float32 or bfloat16
    # rowwise_adagrad: where each adapted module's numbers start in a row (the accumulators' groups);
    # empty: the whole row is one group.
    segments: tuple[int, ...] = ()

    def state_bytes(self, row_size: int) -> int:
        """Optimizer state per user: the step counter and the moments or accumulators."""
        per = {"adamw": 2 * row_size * STATE_DTYPES[self.state_dtype].itemsize, "adagrad": 4 * row_size,
               "rowwise_adagrad": 4 * max(1, len(self.segments))}[self.name]
        return 8 + per


class RowwiseOptimizer:
    """AdamW or Adagrad whose state is columns of the store's row table (so it lives with the rows)."""

    def __init__(self, hyper: OptimizerHyper) -> None:
        if hyper.name not in NAMES:
            raise ValueError(f"optimizer must be one of {', '.join(NAMES)}, got {hyper.name!r}")
        if hyper.state_dtype not in STATE_DTYPES or (hyper.state_dtype != "float32" and hyper.name != "adamw"):
            raise ValueError(f"state_dtype {hyper.state_dtype!r}: adamw's moments may be float32 or bfloat16; "
                             "the Adagrads keep float32")
        self.hyper = hyper
        self.moments = {"adamw": ("exp_avg", "exp_avg_sq"), "adagrad": ("sum_sq",), "rowwise_adagrad": ("sum_sq",)}[hyper.name]
        self.state_dtype = STATE_DTYPES[hyper.state_dtype]
        self._groups: tuple[torch.Tensor, torch.Tensor] | None = None

    def columns(self, row_size: int) -> dict[str, Column]:
        cols = {"step": Column((), torch.int64)}
        if self.hyper.name == "rowwise_adagrad":
            cols["sum_sq"] = Column((max(1, len(self.hyper.segments)),), torch.float32)
        else:
            cols.update({name: Column((row_size,), self.state_dtype) for name in self.moments})
        return cols

    def _group_index(self, row_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each number's group in a row, and each group's size."""
        if self._groups is None or self._groups[0].numel() != row_size or self._groups[0].device != device:
            starts = list(self.hyper.segments) or [0]
            sizes = [b - a for a, b in zip(starts, [*starts[1:], row_size])]
            group = torch.repeat_interleave(torch.arange(len(starts)), torch.tensor(sizes))
            self._groups = (group.to(device), torch.tensor(sizes, dtype=torch.float32, device=device))
        return self._groups

    @torch.no_grad()
    def update(self, table: RowAccess, rows: torch.Tensor, grads: torch.Tensor, lr: torch.Tensor) -> None:
        """Updates table ``rows [n]`` (weights, moments, step counters) from ``grads [n, D]``.

        ``lr [n]`` is each row's learning rate for this step. The store hands the gradients over
        where the table lives (the host for host rows: the moments never cross, ``transfer.py``),
        so rows of an in-place table are updated where they lie: no copy of the weights or moments
        is made, which at LoRA on every linear layer is tens of MiB per step, read and written once
        by one fused kernel (torch's fused CPU kernel on the host). bfloat16 moments and the disk
        tier gather, update and scatter back, on the same device.
        """
        if self.hyper.name == "rowwise_adagrad":
            return self._rowwise_adagrad(table, rows, grads, lr)
        names = ("rows", *self.moments)
        # bfloat16 moments are widened to float32 copies for the fused kernel; the disk tier
        # appends updated rows instead of writing them where they lie (disk_table.py).
        in_place = table.updates_in_place and self.state_dtype == torch.float32
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
            self._fused([[lst[i] for i in pick] for lst in (state[n] for n in names)], [grad_rows[i] for i in pick],
                        [step_list[i] for i in pick], value)
        if not in_place:
            table.scatter_columns(rows, {"step": steps, **{n: copies[n] if n == "rows" else copies[n].to(self.state_dtype)
                                                           for n in names}})

    def _rowwise_adagrad(self, table: RowAccess, rows: torch.Tensor, grads: torch.Tensor, lr: torch.Tensor) -> None:
        """``acc[g] += mean(grad[g]^2)`` per group ``g`` of a row, then ``w -= lr * grad / (sqrt(acc) + eps)``
        (weight decay as L2 on the gradient, like torch.optim.Adagrad). One vectorised update for all rows."""
        h = self.hyper
        device = grads.device
        w = table.gather("rows", rows).to(device)
        acc = table.gather("sum_sq", rows).to(device)
        g = grads.to(torch.float32)
        if h.weight_decay:
            g = g + h.weight_decay * w
        group, sizes = self._group_index(w.shape[1], device)
        acc = acc + torch.zeros_like(acc).index_add_(1, group, g * g) / sizes
        w = w - lr.to(device, torch.float32).unsqueeze(1) * g / (acc.sqrt() + h.eps).index_select(1, group)
        table.scatter_columns(rows, {"step": table.gather("step", rows) + 1, "sum_sq": acc, "rows": w})

    def _fused(self, state: list[list[torch.Tensor]], grads: list[torch.Tensor], steps: list[torch.Tensor], lr: float) -> None:
        h = self.hyper
        if h.name == "adamw":
            params, exp_avg, exp_avg_sq = state
            adamw(params, grads, exp_avg, exp_avg_sq, [], steps, fused=True, amsgrad=False, beta1=h.beta1, beta2=h.beta2,
                  lr=lr, weight_decay=h.weight_decay, eps=h.eps, maximize=False)
        else:
            params, sum_sq = state
            # Weight decay is L2 on the gradient, as in torch.optim.Adagrad.
            adagrad(params, grads, sum_sq, steps, fused=True, lr=lr, lr_decay=0.0, weight_decay=h.weight_decay,
                    eps=h.eps, maximize=False)

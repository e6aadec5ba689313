"""Row-wise sparse optimizers: state per row, updates only the rows they are given.

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

from flora_train.store.table import Column, HotRowCache, RowTable

RowAccess = RowTable | HotRowCache


@dataclass(frozen=True)
class OptimizerHyper:
    name: str = "adamw"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0


class RowwiseOptimizer:
    """AdamW or Adagrad whose state is columns of the store's row table (so it lives with the rows)."""

    def __init__(self, hyper: OptimizerHyper) -> None:
        if hyper.name not in ("adamw", "adagrad"):
            raise ValueError(f"optimizer must be adamw or adagrad, got {hyper.name!r}")
        self.hyper = hyper
        self.moments = ("exp_avg", "exp_avg_sq") if hyper.name == "adamw" else ("sum_sq",)

    def columns(self, row_size: int) -> dict[str, Column]:
        cols = {"step": Column((), torch.int64)}
        cols.update({name: Column((row_size,), torch.float32) for name in self.moments})
        return cols

    @torch.no_grad()
    def update(self, table: RowAccess, rows: torch.Tensor, grads: torch.Tensor, lr: torch.Tensor) -> None:
        """Updates table ``rows [n]`` (weights, moments, step counters) from ``grads [n, D]``.

        ``lr [n]`` is each row's learning rate for this step. Where the table lives on the
        gradients' device, the rows are updated in place: no copy of the weights or moments is
        made, which at LoRA on every linear layer is tens of MiB per step, read and written once
        by one fused kernel. Elsewhere (host rows, GPU compute, no cache) they are copied over and back.
        """
        names = ("rows", *self.moments)
        data, where = table.locate(rows)
        in_place = data["rows"].device == grads.device
        if in_place:
            steps = data["step"].index_select(0, where) + 1
            data["step"].index_copy_(0, where, steps)
            state = {n: [data[n][i] for i in where.tolist()] for n in names}
        else:
            steps = table.gather("step", rows) + 1
            copies = {n: table.gather(n, rows).to(grads.device) for n in names}
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
            table.scatter("step", rows, steps)
            for n in names:
                table.scatter(n, rows, copies[n])

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

"""Row-wise sparse optimizers: state per row, updates only the rows they are given.

Each row keeps its own step counter, so bias correction and a learning-rate schedule advance
only when that user trains; a user's trajectory never depends on how many steps other users took.
The update of one row is the same arithmetic as ``torch.optim.AdamW`` / ``Adagrad`` on a dense
parameter holding that row alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    def update(
        self, table: RowAccess, params: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor, lr: torch.Tensor
    ) -> torch.Tensor:
        """Returns the updated ``params [n, D]`` of table ``rows [n]`` and writes their state back.

        ``lr [n]`` is each row's learning rate for this step.
        """
        h = self.hyper
        step = table.gather("step", rows).to(params.device) + 1
        lr_col = lr.to(params).unsqueeze(1)
        grads = grads.to(params)
        if h.name == "adamw":
            m = table.gather("exp_avg", rows).to(params.device).lerp_(grads, 1 - h.beta1)
            v = table.gather("exp_avg_sq", rows).to(params.device).mul_(h.beta2).addcmul_(grads, grads, value=1 - h.beta2)
            bc1 = (1 - h.beta1 ** step.to(torch.float64)).to(params.dtype).unsqueeze(1)
            bc2 = (1 - h.beta2 ** step.to(torch.float64)).to(params.dtype).unsqueeze(1)
            # The order of operations of torch.optim.AdamW's single-tensor path, with in-place steps: the step's rows
            # can be tens of MiB (LoRA on every linear layer), and each temporary costs a pass.
            denom = v.sqrt().div_(bc2.sqrt()).add_(h.eps)
            update = m.div(denom).mul_(lr_col / bc1)
            new = params.mul(1 - lr_col * h.weight_decay).sub_(update)
            table.scatter("exp_avg", rows, m)
            table.scatter("exp_avg_sq", rows, v)
        else:
            # torch.optim.Adagrad applies weight decay as L2 on the gradient.
            grads = grads + h.weight_decay * params
            s = table.gather("sum_sq", rows).to(params.device).addcmul_(grads, grads)
            new = params - lr_col * (grads / (s.sqrt() + h.eps))
            table.scatter("sum_sq", rows, s)
        table.scatter("step", rows, step)
        return new

"""Row-wise sparse optimizers: state per row, updates only the rows they are given.

Each row keeps its own step counter, so bias correction and a learning-rate schedule advance
only when that user trains; a user's trajectory never depends on how many steps other users took.
The update of one row is the same arithmetic as ``torch.optim.AdamW`` / ``Adagrad`` on a dense
parameter holding that row alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OptimizerHyper:
    name: str = "adamw"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0


class RowwiseOptimizer:
    """AdamW or Adagrad over a table of rows. State tensors have one row per table row."""

    def __init__(self, hyper: OptimizerHyper, row_size: int, capacity: int, device: torch.device) -> None:
        if hyper.name not in ("adamw", "adagrad"):
            raise ValueError(f"optimizer must be adamw or adagrad, got {hyper.name!r}")
        self.hyper = hyper
        self.state: dict[str, torch.Tensor] = {"step": torch.zeros(capacity, dtype=torch.int64, device=device)}
        names = ("exp_avg", "exp_avg_sq") if hyper.name == "adamw" else ("sum_sq",)
        for name in names:
            self.state[name] = torch.zeros(capacity, row_size, dtype=torch.float32, device=device)

    def resize(self, capacity: int) -> None:
        for name, t in self.state.items():
            grown = t.new_zeros((capacity, *t.shape[1:]))
            grown[: min(capacity, t.shape[0])] = t[:capacity]
            self.state[name] = grown

    def steps(self, rows: torch.Tensor) -> torch.Tensor:
        return self.state["step"].index_select(0, rows)

    @torch.no_grad()
    def update(self, params: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """Returns the updated ``params [n, D]`` of ``rows [n]`` and writes their state back.

        ``lr [n]`` is each row's learning rate for this step.
        """
        h = self.hyper
        step = self.state["step"].index_select(0, rows) + 1
        lr_col = lr.to(params.dtype).unsqueeze(1)
        grads = grads.to(params.dtype)
        if h.name == "adamw":
            m = self.state["exp_avg"].index_select(0, rows).lerp_(grads, 1 - h.beta1)
            v = self.state["exp_avg_sq"].index_select(0, rows).mul_(h.beta2).addcmul_(grads, grads, value=1 - h.beta2)
            bc1 = (1 - h.beta1 ** step.to(torch.float64)).to(params.dtype).unsqueeze(1)
            bc2 = (1 - h.beta2 ** step.to(torch.float64)).to(params.dtype).unsqueeze(1)
            # Same order of operations as torch.optim.AdamW's single-tensor path.
            denom = (v.sqrt() / bc2.sqrt()).add_(h.eps)
            new = params * (1 - lr_col * h.weight_decay) - (lr_col / bc1) * (m / denom)
            self.state["exp_avg"].index_copy_(0, rows, m)
            self.state["exp_avg_sq"].index_copy_(0, rows, v)
        else:
            # torch.optim.Adagrad applies weight decay as L2 on the gradient.
            grads = grads + h.weight_decay * params
            s = self.state["sum_sq"].index_select(0, rows).addcmul_(grads, grads)
            new = params - lr_col * (grads / (s.sqrt() + h.eps))
            self.state["sum_sq"].index_copy_(0, rows, s)
        self.state["step"].index_copy_(0, rows, step)
        return new

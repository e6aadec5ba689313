"""Adagrad per row: one float32 accumulator per number (``torch.optim.Adagrad``'s fused kernel)."""

from __future__ import annotations

import torch
from torch.optim.adagrad import adagrad

from flora_train.store.optimizers.base import FusedRowOptimizer, OptimizerHyper


def check_float32_state(hyper: OptimizerHyper) -> None:
    if hyper.state_dtype != "float32":
        raise ValueError(f"state_dtype {hyper.state_dtype!r}: adamw's moments may be float32 or bfloat16; "
                         "the Adagrads keep float32")


class Adagrad(FusedRowOptimizer):
    name = "adagrad"
    moments = ("sum_sq",)

    def __init__(self, hyper: OptimizerHyper) -> None:
        super().__init__(hyper)
        check_float32_state(hyper)

    def fused(self, state: list[list[torch.Tensor]], grads: list[torch.Tensor], steps: list[torch.Tensor],
              lr: float) -> None:
        h = self.hyper
        params, sum_sq = state
        # Weight decay is L2 on the gradient, as in torch.optim.Adagrad.
        adagrad(params, grads, sum_sq, steps, fused=True, lr=lr, lr_decay=0.0, weight_decay=h.weight_decay,
                eps=h.eps, maximize=False)

"""Adagrad per row: one float32 accumulator per number (``torch.optim.Adagrad``'s fused kernel)."""

from __future__ import annotations

import torch
from torch.optim.adagrad import adagrad

from flora_train.store.optimizers.base import FusedRowOptimizer


class Adagrad(FusedRowOptimizer):
    name = "adagrad"
    moments = ("sum_sq",)

    def fused(self, state: list[list[torch.Tensor]], grads: list[torch.Tensor], steps: list[torch.Tensor],
              lr: float) -> None:
        h = self.hyper
        params, sum_sq = state
        # Weight decay is L2 on the gradient, as in torch.optim.Adagrad.
        adagrad(params, grads, sum_sq, steps, fused=True, lr=lr, lr_decay=0.0, weight_decay=h.weight_decay,
                eps=h.eps, maximize=False)

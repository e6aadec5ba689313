"""AdamW per row: two moments per number, optionally kept in bfloat16 (``state_dtype``), half their
bytes; they are read into float32 for the update and rounded to nearest on the way back."""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw

from flora_train.store.optimizers.base import FusedRowOptimizer


class AdamW(FusedRowOptimizer):
    name = "adamw"
    state_dtypes = ("float32", "bfloat16")
    moments = ("exp_avg", "exp_avg_sq")

    def fused(self, state: list[list[torch.Tensor]], grads: list[torch.Tensor], steps: list[torch.Tensor],
              lr: float) -> None:
        h = self.hyper
        params, exp_avg, exp_avg_sq = state
        adamw(params, grads, exp_avg, exp_avg_sq, [], steps, fused=True, amsgrad=False, beta1=h.beta1, beta2=h.beta2,
              lr=lr, weight_decay=h.weight_decay, eps=h.eps, maximize=False)

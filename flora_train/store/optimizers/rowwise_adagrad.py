"""TorchRec/FBGEMM's row-wise Adagrad: one accumulator per row and adapted module (the mean of the
squared gradient over the module's numbers), not one per number, so its state is a few floats per
user instead of a copy of the adapter."""

from __future__ import annotations

import torch

from flora_train.store.optimizers.base import STEP, OptimizerHyper, RowAccess, RowOptimizer
from flora_train.store.table import Column


class RowwiseAdagrad(RowOptimizer):
    name = "rowwise_adagrad"

    def __init__(self, hyper: OptimizerHyper) -> None:
        super().__init__(hyper)
        self._groups: tuple[torch.Tensor, torch.Tensor] | None = None

    def columns(self, row_size: int) -> dict[str, Column]:
        return {"step": STEP, "sum_sq": Column((max(1, len(self.hyper.segments)),), torch.float32)}

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

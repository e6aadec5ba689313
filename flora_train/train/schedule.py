"""Learning-rate schedules driven by each user's own step counter."""

from __future__ import annotations

import math

import torch


def per_user_lr(
    base_lr: float | torch.Tensor, schedule: str, warmup: int, min_ratio: float, step: torch.Tensor, total: torch.Tensor
) -> torch.Tensor:
    """``lr [users]`` for the step each user is about to take (``step`` counts from 1); ``base_lr``:
    one rate, or each user's own (float64, a sweep's variants).

    Warm-up is linear over a user's first ``warmup`` steps; then the factor stays 1 (constant) or
    decays to ``min_ratio`` at the user's last planned step (``total``), linearly or on a cosine.
    """
    s = step.to(torch.float64)
    factor = torch.ones_like(s)
    if warmup > 0:
        factor = torch.clamp(s / warmup, max=1.0)
    if schedule != "constant":
        span = (total.to(torch.float64) - warmup).clamp_min(1)
        progress = ((s - warmup) / span).clamp(0.0, 1.0)
        decay = 1 - progress if schedule == "linear" else 0.5 * (1 + torch.cos(math.pi * progress))
        decayed = min_ratio + (1 - min_ratio) * decay
        factor = torch.where(s > warmup, decayed, factor)
    return (base_lr * factor).to(torch.float32)

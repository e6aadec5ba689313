"""Per-user loss normalisation.

Each example's token losses are divided by its *user's* number of target tokens in the whole
step (all micro-batches), and users are summed, not averaged. So a user's gradient is the
gradient of that user's own mean token loss, whatever else shared the step; averaging over the
users in the step would scale each user's gradient by how crowded the step was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flora_train.data.tokenize import IGNORE


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy ``[n, L-1]`` in float32 (zero where the label is ignored)."""
    shifted = logits[:, :-1].float()
    target = labels[:, 1:]
    ce = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="none")
    return ce.view(target.shape)


def target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of target tokens per example ``[n]``."""
    return (labels[:, 1:] != IGNORE).sum(dim=1)


def per_user_loss(
    logits: torch.Tensor, labels: torch.Tensor, user_pos: torch.Tensor, user_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (the objective to backpropagate, each step user's loss contribution ``[U]``, detached).

    ``user_pos [n]`` maps examples to the step's users, ``user_tokens [U]`` counts each user's
    target tokens over the whole step.
    """
    per_example = token_losses(logits, labels).sum(dim=1)
    weighted = per_example / user_tokens.to(per_example.device)[user_pos].clamp_min(1)
    per_user = torch.zeros(user_tokens.shape[0], device=weighted.device).index_add_(0, user_pos, weighted.detach())
    return weighted.sum(), per_user

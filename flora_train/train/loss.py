"""The training loss: the output head and cross-entropy at target positions only, and per-user
normalisation.

Memory. A causal LM's forward makes logits ``[batch, tokens, vocab]`` for every position; a
float32 copy of those for the loss (and the log-softmax autograd keeps) is the largest tensor of
a step at real vocabulary sizes (32 x 1024 tokens x 128k vocabulary: 17 GB each). Here the
backbone's last hidden state is taken at the positions that have a target, the head runs on those
rows alone, in the compute dtype, and the cross-entropy runs over them in float32 chunks of
``CHUNK`` rows whose gradient is recomputed chunk by chunk in the backward: no full-size float32
tensor exists at any point.

Normalisation. Each example's token losses are divided by its *user's* number of target tokens in
the whole step (all micro-batches), and users are summed, not averaged. So a user's gradient is
the gradient of that user's own mean token loss, whatever else shared the step; averaging over the
users in the step would scale each user's gradient by how crowded the step was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flora_train.base.zero import forward_through_root
from flora_train.data.batching import Batch
from flora_train.data.tokenize import IGNORE

CHUNK = 1024  # target rows per float32 cross-entropy chunk: CHUNK x vocab x 4 bytes at a time
# Config keys of heads that are more than a linear map of the last hidden state (Gemma 2's
# soft-capping, Cohere's and Granite's logit scales): those models keep their own forward.
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class TargetLogits:
    logits: torch.Tensor  # [T, vocab] at the T target positions, in the compute dtype
    targets: torch.Tensor  # [T] the token each row predicts
    example: torch.Tensor  # [T] the example (row of the batch) each target belongs to
    examples: int  # rows in the batch


def _head_split(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, head) when the LM's logits are ``head(backbone(...).last_hidden_state)``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, "base_model", None)
    config = getattr(model, "config", None)
    if head is None or backbone is None or backbone is model or config is None:
        return None
    if any(getattr(config, k, None) not in (None, 1.0) for k in _HEAD_EXTRAS):
        return None
    return backbone, head


def target_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> TargetLogits:
    """The logits of the target positions only (``labels[:, 1:] != IGNORE``): the backbone runs on
    the whole batch, the head on the target rows. Every call runs the same modules in the same
    order (ZeRO-3 gathers each one collectively), with or without targets."""
    return _target_rows(model, {"input_ids": input_ids, "attention_mask": attention_mask}, labels, None, int(labels.shape[0]))


def batch_target_logits(model: nn.Module, batch: Batch) -> TargetLogits:
    """``target_logits`` of a micro-batch, padded or packed. Packed, the model gets the examples'
    restarting positions and bounds (what flash-attention's varlen path and ``flora_packed`` read,
    ``base/packed_attention.py``), no cache, and a mask of ones: with it transformers builds no
    mask at all (both attentions keep examples apart by the bounds), where without one it would
    build a [tokens, tokens] block-diagonal mask from the positions that neither reads. Each target
    belongs to the example of its token."""
    if not batch.packed:
        assert batch.attention_mask is not None
        return target_logits(model, batch.input_ids, batch.attention_mask, batch.labels)
    assert batch.cu_seqlens is not None and batch.example is not None
    inputs = {"input_ids": batch.input_ids, "attention_mask": torch.ones_like(batch.input_ids),
              "position_ids": batch.position_ids, "use_cache": False,
              "cu_seq_lens_q": batch.cu_seqlens, "cu_seq_lens_k": batch.cu_seqlens,
              "max_length_q": batch.max_seqlen, "max_length_k": batch.max_seqlen}
    return _target_rows(model, inputs, batch.labels, batch.example, batch.examples)


def _target_rows(model: nn.Module, inputs: dict, labels: torch.Tensor, example_of_token: torch.Tensor | None,
                 examples: int) -> TargetLogits:
    target = labels[:, 1:]
    mask = target != IGNORE
    split = _head_split(model)
    if split is None:
        rows = model(**inputs).logits[:, :-1][mask]
    else:
        backbone, head = split
        # Entered through the root module, as DeepSpeed ZeRO-3's hooks expect (base/zero.py).
        rows = forward_through_root(model, lambda: head(backbone(**inputs).last_hidden_state[:, :-1][mask]))
    if example_of_token is None:
        return TargetLogits(rows, target[mask], mask.nonzero()[:, 0], examples)
    # Packed: target t is token t+1, never an example's first token (its label is IGNORE), so it
    # belongs to the example of token t+1.
    example = example_of_token[:, 1:][mask]
    return TargetLogits(rows, target[mask], example, examples)


def _chunked_cross_entropy(device_type: str) -> type[torch.autograd.Function]:
    """Per-row cross-entropy in float32, ``CHUNK`` rows at a time; the backward recomputes each
    chunk's softmax from the (compute-dtype) logits instead of keeping a float32 copy. One class per
    device type: ``custom_fwd``/``custom_bwd`` record and restore that device's autocast state, so
    the backward (run outside autocast) computes as its forward did."""

    class ChunkedCrossEntropy(torch.autograd.Function):
        @staticmethod
        @torch.amp.custom_fwd(device_type=device_type)
        def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:  # type: ignore[override]
            out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
            for s in range(0, logits.shape[0], chunk):
                out[s : s + chunk] = F.cross_entropy(logits[s : s + chunk].float(), targets[s : s + chunk], reduction="none")
            ctx.save_for_backward(logits, targets)
            ctx.chunk = chunk
            return out

        @staticmethod
        @torch.amp.custom_bwd(device_type=device_type)
        def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
            logits, targets = ctx.saved_tensors
            out = torch.empty_like(logits)
            for s in range(0, logits.shape[0], ctx.chunk):
                p = torch.log_softmax(logits[s : s + ctx.chunk].float(), dim=-1).exp_()
                rows = torch.arange(p.shape[0], device=p.device)
                p[rows, targets[s : s + ctx.chunk]] -= 1.0
                out[s : s + ctx.chunk] = p.mul_(grad[s : s + ctx.chunk, None])
            return out, None, None

    return ChunkedCrossEntropy


_CROSS_ENTROPY = {d: _chunked_cross_entropy(d) for d in ("cpu", "cuda")}


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(logits.float(), targets, reduction="none")`` without the full float32 copy."""
    function = _CROSS_ENTROPY.get(logits.device.type, _CROSS_ENTROPY["cpu"])
    return function.apply(logits, targets, chunk or CHUNK)


def example_losses(t: TargetLogits) -> torch.Tensor:
    """Summed target-token loss per example ``[examples]`` (float32)."""
    ce = cross_entropy_rows(t.logits, t.targets)
    return torch.zeros(t.examples, dtype=torch.float32, device=ce.device).index_add(0, t.example, ce)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy ``[n, L-1]`` in float32 from full logits (zero where the label is
    ignored). For baselines that hold full logits anyway (PEFT jobs in the benchmarks)."""
    shifted = logits[:, :-1].float()
    target = labels[:, 1:]
    ce = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="none")
    return ce.view(target.shape)


def target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of target tokens per example ``[n]``."""
    return (labels[:, 1:] != IGNORE).sum(dim=1)


def per_user_loss(
    t: TargetLogits, user_pos: torch.Tensor, user_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (the objective to backpropagate, each step user's loss contribution ``[U]``, detached).

    ``user_pos [n]`` maps examples to the step's users, ``user_tokens [U]`` counts each user's
    target tokens over the whole step.
    """
    per_example = example_losses(t)
    weighted = per_example / user_tokens.to(per_example.device)[user_pos].clamp_min(1)
    per_user = torch.zeros(user_tokens.shape[0], device=weighted.device).index_add_(0, user_pos, weighted.detach())
    return weighted.sum(), per_user

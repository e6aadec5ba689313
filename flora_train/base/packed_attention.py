"""Attention that keeps packed examples apart, without computing across them.

A packed row holds several examples back to back (``data/batching.py``); each may attend only to
itself, causally. Transformers can do this two ways: flash-attention's varlen kernel (CUDA, with
the ``flash_attn`` package), which reads the examples' bounds (``cu_seq_lens_*``) and computes
each example's own triangle; or SDPA with a block-diagonal mask built from restarting
``position_ids``, which is exact but computes every token against every other token of the row:
on this project's CPU a 2,000-token row of 31 examples took 2.1 s forward and backward against
1.1 s example by example (a tiny Llama 256x4; the mask's work grows with the row's square).

``flora_packed`` is the second way done as the first: it reads the same ``cu_seq_lens_q`` and
runs SDPA causally on each example's own slice of the row (views, no copies), so no token attends
outside its example and nothing is computed across examples or on padding. One call per example
beat batching examples of similar length (padded, gathered and scattered back): 133 ms against
292 ms forward and backward over six 4,096-token rows of real-text lengths (4 heads of 64), where
16 padded examples of the mean length (1,392 tokens) take 5.8 ms. Without bounds (an unpacked
forward: evaluation, generation, an idle rank's padding batch) it is transformers' SDPA with the
usual mask.

On CUDA in bf16 or fp16 without ``flash_attn``, ``flora_varlen`` hands the row and its bounds to
PyTorch's own varlen flash-attention (``torch.nn.attention.varlen.varlen_attn``): the first way
again, with no package to build. It has no dropout, so a model with attention dropout keeps
``flora_packed``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "flora_packed"
VARLEN = "flora_varlen"


def example_lengths(bounds: torch.Tensor) -> list[int]:
    """Each example's token count from a row's bounds (cu_seqlens), empty examples included."""
    starts = bounds.tolist()
    return [end - start for start, end in zip(starts, starts[1:])]


def flora_packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``query [1, heads, tokens, dim]`` (keys and values may have fewer heads: grouped-query
    attention) -> ``[1, tokens, heads, dim]``, each example of the row attending to itself only."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"{NAME}: a packed batch is one row, got {query.shape[0]}")
    if attention_mask is not None:  # built for nothing: the bounds keep examples apart (train/loss.py passes ones)
        raise ValueError(f"{NAME}: a packed row takes its examples' bounds, not a mask")
    lengths = example_lengths(bounds)
    if sum(lengths) != query.shape[2]:
        raise ValueError(f"{NAME}: the bounds hold {sum(lengths)} tokens, the row {query.shape[2]}")
    # Grouped-query attention: the CPU kernel reads each key head for its group of query heads
    # (SmolLM2's 9 over 3, per-example calls over 8 real lengths: 11.5 against 13.0 ms forward and
    # backward, and no copied keys and values kept for the backward). On CUDA the float32 kernel
    # has no grouped heads (SDPA would take its math path): the keys are repeated there.
    gqa = key.shape[1] != query.shape[1]
    if gqa and query.device.type != "cpu":
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        gqa = False
    p = dropout if module.training else 0.0
    outputs = [F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, dropout_p=p, enable_gqa=gqa)
               for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2)) if q.shape[2]]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def torch_varlen() -> Callable[..., torch.Tensor] | None:
    """PyTorch's varlen flash-attention (CUDA, half precision), where this PyTorch has it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def flora_varlen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``flora_packed_attention``'s contract on ``varlen_attn``: the row's tokens ``[tokens, heads,
    dim]`` and its bounds in one call, causal inside each example."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"{VARLEN}: a packed batch is one row, got {query.shape[0]}")
    if attention_mask is not None:
        raise ValueError(f"{VARLEN}: a packed row takes its examples' bounds, not a mask")
    varlen_attn = torch_varlen()
    assert varlen_attn is not None, "use_packed_attention chose flora_varlen where PyTorch has no varlen_attn"
    longest = kwargs.get("max_length_q") or int((bounds[1:] - bounds[:-1]).max())
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # [tokens, heads, dim]
    if torch.is_autocast_enabled(q.device.type):  # a custom op: autocast does not cast its inputs
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = varlen_attn(q, k, v, bounds, bounds, longest, longest, scale=scaling, window_size=(-1, 0),
                      enable_gqa=k.shape[1] != q.shape[1])
    return out.unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, attention in ((NAME, flora_packed_attention), (VARLEN, flora_varlen_attention)):
        AttentionInterface.register(name, attention)
        # Unpacked forwards get SDPA's mask. (A packed forward's mask, built from the restarting
        # position ids, is ignored: the bounds say the same.)
        AttentionMaskInterface.register(name, sdpa_mask)


def use_packed_attention(model: nn.Module, device: torch.device, half_precision: bool) -> str:
    """Switches ``model`` to attention that keeps packed examples apart; returns its name.
    Flash-attention's varlen kernel where it runs (CUDA, computing in bf16 or fp16: it has no
    float32 kernel): the ``flash_attn`` package's through transformers where installed, else
    PyTorch's (``flora_varlen``) unless the model has attention dropout; else ``flora_packed``."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise ValueError("train.packing needs a transformers model (its attention is switched to a packed one)")
    flash = device.type == "cuda" and half_precision
    if flash and importlib.util.find_spec("flash_attn") is not None:
        name = "flash_attention_2"
    else:
        _register()
        dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0)
        name = VARLEN if flash and dropout == 0.0 and torch_varlen() is not None else NAME
    model.set_attn_implementation(name)
    return name

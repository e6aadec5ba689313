"""Attention that keeps packed examples apart, without computing across them.

A packed row holds several examples back to back (``data/batching.py``); each may attend only to
itself, causally. Transformers can do this two ways: flash-attention's varlen kernel (CUDA, with
the ``flash_attn`` package), which reads the examples' bounds (``cu_seq_lens_*``) and computes
each example's own triangle; or SDPA with a block-diagonal mask built from restarting
``position_ids``, which is exact but computes every token against every other token of the row:
on this project's CPU a 2,000-token row of 31 examples took 2.1 s forward and backward against
1.1 s example by example (a tiny Llama 256x4; the mask's work grows with the row's square).

``flora_packed`` is the second way done as the first: it reads the same ``cu_seq_lens_q`` and
runs SDPA on the examples themselves, examples of similar length batched together (each padded
to its group's longest by repeating its last token, which causal attention never lets a real
query see), so no token attends outside its example and nothing is computed across examples.
Without bounds (an unpacked forward: evaluation, generation, an idle rank's padding batch) it is
transformers' SDPA with the usual mask.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "flora_packed"
# Examples of length >= GROUP_RATIO x the group's longest share one SDPA call: their padding costs at
# most 1/GROUP_RATIO^2 of the group's attention (1.8x); groups stay few (a handful a row).
GROUP_RATIO = 0.75


def packed_groups(bounds: list[int]) -> list[tuple[int, list[tuple[int, int]]]]:
    """The examples ``(start, length)`` of a row with ``bounds`` (cu_seqlens), grouped: each group
    is ``(longest, members)`` with every member at least ``GROUP_RATIO`` of the longest."""
    spans = sorted(((bounds[k + 1] - bounds[k], bounds[k]) for k in range(len(bounds) - 1) if bounds[k + 1] > bounds[k]),
                   reverse=True)
    groups: list[tuple[int, list[tuple[int, int]]]] = []
    for length, start in spans:
        if groups and length >= GROUP_RATIO * groups[-1][0]:
            groups[-1][1].append((start, length))
        else:
            groups.append((length, [(start, length)]))
    return groups


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
    if key.shape[1] != query.shape[1]:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    q, k, v = query[0], key[0], value[0]  # [heads, tokens, dim]
    heads, dim = q.shape[0], q.shape[2]
    outputs, places = [], []
    for longest, members in packed_groups([int(b) for b in bounds.tolist()]):
        offsets = torch.arange(longest, device=q.device)
        # [G, longest]: each member's positions, its last one repeated to the group's length.
        index = torch.stack([start + offsets.clamp(max=length - 1) for start, length in members])
        flat = index.reshape(-1)
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(1, flat).view(heads, len(members), longest, dim).transpose(0, 1)
        out = F.scaled_dot_product_attention(pick(q), pick(k), pick(v), is_causal=True, scale=scaling,
                                             dropout_p=dropout if module.training else 0.0)
        real = (offsets[None, :] < torch.tensor([m[1] for m in members], device=q.device)[:, None]).reshape(-1)
        outputs.append(out.transpose(0, 1).reshape(heads, -1, dim)[:, real])
        places.append(flat[real])
    # Every token of the row is in exactly one group: put them back in the row's order.
    order = torch.argsort(torch.cat(places))
    return torch.cat(outputs, dim=1).index_select(1, order).transpose(0, 1)[None], None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, flora_packed_attention)
    # Unpacked forwards get SDPA's mask. (A packed forward's mask, built from the restarting
    # position ids, is ignored: the bounds say the same.)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_packed_attention(model: nn.Module, device: torch.device, half_precision: bool) -> str:
    """Switches ``model`` to attention that keeps packed examples apart; returns its name.
    Flash-attention's varlen kernel where it runs (CUDA with ``flash_attn`` installed, computing in
    bf16 or fp16: it has no float32 kernel), else ``flora_packed``."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise ValueError("train.packing needs a transformers model (its attention is switched to a packed one)")
    if device.type == "cuda" and half_precision and importlib.util.find_spec("flash_attn") is not None:
        name = "flash_attention_2"
    else:
        _register()
        name = NAME
    model.set_attn_implementation(name)
    return name

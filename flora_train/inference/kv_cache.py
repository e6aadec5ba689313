"""The one place that knows the server's KV cache: a batch of sequences at different lengths.

Every sequence is one row of a transformers ``DynamicCache``. Rows are left-padded to a common
length and carry a mask (1 real, 0 padding), so the model's ordinary batched forward serves them
all: each step appends one column, positions come from the mask, and the causal mask hides the
padding. A group of newcomers is prefilled in a cache of its own (``SlotKV.empty``) and then
joins the running batch (``join``): the shorter side is left-padded to the longer one's length.
A sequence leaving (``keep``) takes its row with it, and columns that are padding in every row
left are trimmed, so the batch never stays wider than its longest member.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class UnsupportedCache(RuntimeError):
    """The model's cache is not a plain per-layer key/value cache (sliding windows, recurrent state)."""


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword the model's forward takes its cache by. transformers 5.25 renamed
    ``past_key_values`` to ``cache`` (the old name warns on every request and goes in 5.40); the
    pinned 5.23 knows only the old one."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class SlotKV:
    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask  # [rows, length] long

    @classmethod
    def empty(cls, rows: int, device: torch.device) -> SlotKV:
        return cls(DynamicCache(), torch.zeros(rows, 0, dtype=torch.long, device=device))

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def step_inputs(self, new_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention mask and position ids of a forward that appends ``new_mask [rows, n]``
        columns; the mask is extended in place (call once per forward)."""
        seen = self.mask.sum(dim=1, keepdim=True)
        positions = (seen + new_mask.cumsum(dim=1) - 1).clamp(min=0)
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        return self.mask, positions

    def _layers(self) -> list[DynamicLayer]:
        layers = list(self.cache.layers)
        for layer in layers:
            if type(layer) is not DynamicLayer:
                raise UnsupportedCache(f"the server batches plain key/value caches; this model uses {type(layer).__name__}")
        return layers

    def keep(self, rows: list[int]) -> None:
        """Keeps only ``rows`` (in that order), then drops the all-padding columns on the left."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        layers = self._layers()
        for layer in layers:
            if layer.is_initialized:
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
        if not rows:
            return
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else self.length
        if first:
            self.mask = self.mask[:, first:]
            for layer in layers:
                if layer.is_initialized:
                    layer.keys = layer.keys[:, :, first:]
                    layer.values = layer.values[:, :, first:]

    def join(self, other: SlotKV) -> None:
        """Appends ``other``'s rows after this cache's rows."""
        if self.rows == 0:
            self.cache, self.mask = other.cache, other.mask
            return
        width = max(self.length, other.length)
        mine, theirs = self._layers(), other._layers()
        if len(mine) != len(theirs):
            raise UnsupportedCache(f"caches of {len(mine)} and {len(theirs)} layers cannot be joined")
        for a, b in zip(mine, theirs):
            a.keys = torch.cat([_left_pad(a.keys, width), _left_pad(b.keys, width)], dim=0)
            a.values = torch.cat([_left_pad(a.values, width), _left_pad(b.values, width)], dim=0)
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)], dim=0)


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pads a cache tensor's sequence dimension (the last but one of keys, the last of the mask)."""
    dim = -1 if t.dim() == 2 else -2
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


__all__ = ["SlotKV", "UnsupportedCache"]

"""The population adapter: one adapter that every example goes through, under each user's own.

It is a single row of its own layout (any method, rank and targets), replicated on every rank and
never row-sharded. Being the same for every example, it folds into the layer's weight: the layer
computes ``W' = shared.dense_weight(W)`` (and ``b' = shared.dense_bias(b)``) and the personal
method then runs on ``W'`` exactly as it runs on ``W``. So user i's layer is
``W_i = personal_i(shared(W))`` for every pair of methods, with no kernel per pair, and the shared
tensors' gradient reaches them through autograd (summed over every example of the micro-batch).

Cost: one weight-sized op per layer and micro-batch (plus a rank-r product for LoRA), and the
folded weight is kept from forward to backward like any weight a kernel saves. A frozen shared
adapter (``train.shared_phase: first`` after its phase) is folded without building a graph.
"""

from __future__ import annotations

import torch

from flora_train.adapters.layout import AdapterLayout

SHARED_USER = "__shared__"  # the seed name of the shared row's initial values


class SharedAdapter:
    """The shared adapter's layout and its one row ``[row_size]`` (float32; a leaf when trained)."""

    def __init__(self, layout: AdapterLayout, row: torch.Tensor) -> None:
        if row.shape != (layout.row_size,):
            raise ValueError(f"shared adapter row must be [{layout.row_size}], got {tuple(row.shape)}")
        self.layout = layout
        self.row = row

    @classmethod
    def initial(cls, layout: AdapterLayout, seed: int) -> "SharedAdapter":
        """The identity adapter (each method's own init), seeded like a user named ``__shared__``."""
        from flora_train.adapters.seeding import user_seed

        return cls(layout, layout.init_rows(torch.tensor([user_seed(seed, SHARED_USER)], dtype=torch.int64))[0])

    @property
    def modules(self) -> set[str]:
        return set(self.layout.slices)

    def split(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every module's tensors (no user dim), from one ``split`` of the row (one autograd node)."""
        return {m: {k: v[0] for k, v in views.items()} for m, views in self.layout.split(self.row.unsqueeze(0)).items()}

    def fold(self, tensors: dict[str, torch.Tensor], weight: torch.Tensor,
             bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W', b')`` of one layer: the base weight ``[out, in]`` and bias with this adapter folded in,
        in the weight's dtype (computed in float32 at least, so a bf16 base rounds once)."""
        impl, scaling = self.layout.spec.impl, self.layout.spec.scaling
        compute = torch.promote_types(weight.dtype, torch.float32)
        tensors = {k: v.to(compute) for k, v in tensors.items()}
        folded = impl.dense_weight(weight.to(compute), tensors, scaling)
        new_bias = impl.dense_bias(None if bias is None else bias.to(compute), tensors)
        return folded.to(weight.dtype), (None if new_bias is None else new_bias.to(bias.dtype if bias is not None else weight.dtype))

"""The protocol every adapter method implements, and the helpers their kernels share.

A method is one file (``flora.py``, ``lora.py``, ``ia3.py``), as PEFT gives each tuner its folder:
the per-user tensor shapes of one adapted linear layer, their initial values, the batched kernels,
the dense per-example weight the tests compare against (which is also the merged weight), and the
PEFT export. Nothing outside this folder branches on a method's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

import torch


class AdapterMethod(ABC):
    name: ClassVar[str]
    kernels: ClassVar[tuple[str, ...]]
    # PEFT's name for the method in adapter_config.json, or None when PEFT cannot load it.
    peft_type: ClassVar[str | None] = None
    # Whether feed-forward output layers get other tensors (then the architecture must name them).
    uses_feedforward: ClassVar[bool] = False
    # Whether the output reads ``alpha`` (LoRA's ``alpha / r``): then rows trained under another alpha
    # compute something else, and layouts that differ in it are not interchangeable.
    uses_alpha: ClassVar[bool] = False

    def kernels_for(self, rank: int) -> tuple[str, ...]:
        """The kernels worth choosing between at this rank (all compute the same function)."""
        return self.kernels

    def block_kernel(self, kernel: str) -> str:
        """The kernel for a batch packed as one sequence per user (``AdapterSlot.block``)."""
        return kernel

    @abstractmethod
    def param_shapes(self, in_features: int, out_features: int, rank: int, feedforward: bool) -> dict[str, tuple[int, ...]]:
        """Per-user tensor shapes of one adapted ``Linear(in, out)``. ``feedforward`` marks a
        feed-forward output layer (``down_proj``, ``fc2``): only IA3 treats those differently."""

    @abstractmethod
    def init_param(self, name: str, shape: tuple[int, ...], seeds: torch.Tensor, offset: int) -> torch.Tensor:
        """Initial values ``[users, prod(shape)]`` (float32) of tensor ``name`` for users with
        ``seeds``; ``offset`` (the tensor's place in the row) keeps every tensor's stream apart.
        An untrained adapter must leave the base's output unchanged."""

    @abstractmethod
    def forward(self, kernel: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                params: dict[str, torch.Tensor], index: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """The adapted layer's output for a batch in which every example has its own adapter."""

    @abstractmethod
    def dense_weight(self, weight: torch.Tensor, tensors: dict[str, torch.Tensor], scaling: float) -> torch.Tensor:
        """The explicit weight ``W_i`` of one example's adapter ``tensors`` (no user dim): the
        reference the tests compare the kernels with, and the merged weight of an export."""

    def dense_bias(self, bias: torch.Tensor | None, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The bias of one example's adapted layer (most methods leave it alone)."""
        return bias

    @abstractmethod
    def synthetic_params(self, users: int, rank: int, n_in: int, n_out: int, dtype: torch.dtype,
                         device: torch.device, requires_grad: bool) -> dict[str, torch.Tensor]:
        """Near-identity tensors of one layer for ``users`` users (kernel timing, benchmarks)."""

    def peft_keys(self, module: str, params: Iterable[str]) -> dict[str, str]:
        """PEFT's key of each of one module's tensors -> the tensor's name here (``params``: the
        module's tensor names). Writing and reading a PEFT folder both go through it."""
        raise NotImplementedError(f"PEFT has no {self.name} adapter")

    def peft_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape PEFT keeps tensor ``name`` (of ``shape`` here) in."""
        return shape

    def peft_tensors(self, module: str, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One module's tensors under PEFT's key names and shapes (``views``: one user's tensors)."""
        return {key: views[name].reshape(self.peft_shape(name, tuple(views[name].shape))).contiguous()
                for key, name in self.peft_keys(module, views).items()}

    def peft_config(self, rank: int, alpha: float, target_modules: list[str], feedforward_modules: list[str],
                    base_model: str, fan_in_fan_out: bool) -> dict[str, Any]:
        """PEFT's ``adapter_config.json``; ``fan_in_fan_out``: the layers keep their weights as
        ``[in, out]`` (GPT-2's ``Conv1D``)."""
        raise NotImplementedError(f"PEFT has no {self.name} adapter")


def near_one(*shape: int, dtype: torch.dtype, device: torch.device, requires_grad: bool) -> torch.Tensor:
    return (1 + 0.01 * torch.randn(*shape, device=device, dtype=dtype)).requires_grad_(requires_grad)


def per_example(t: torch.Tensor, index: torch.Tensor | None, batch: int, name: str) -> torch.Tensor:
    """Expands per-user tensors to per-example ones (a cheap gather of small adapter tensors).

    Callers cast to the compute dtype after the gather, so the backward's scatter-add sums a user's
    examples in the rows' float32, never in a bf16 compute dtype."""
    if index is None:
        if t.shape[0] != batch:
            raise ValueError(f"{name} has leading dim {t.shape[0]} but the batch has {batch} examples; pass index")
        return t
    if index.shape != (batch,):
        raise ValueError(f"index must have shape ({batch},), got {tuple(index.shape)}")
    return t.index_select(0, index)


def as_3d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """Views ``x [batch, *, in]`` as ``[batch, tokens, in]``; returns the original shape to restore."""
    if x.dim() < 2:
        raise ValueError(f"x must be [batch, ..., in], got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1, x.shape[-1]), x.shape

"""Per-example adapter math over a frozen linear map, by method name.

Every op takes the activations ``x [batch, seq, in]`` of a frozen ``nn.Linear`` (``weight [out, in]``,
``bias [out] | None``) and per-example adapter tensors. Adapter tensors are either one per example
(leading dim ``batch``) or one per *user* (leading dim ``users``) together with ``index [batch]``
mapping each example to its user, so a user with many examples in the batch is stored once and
its gradient is summed over its examples by autograd.

All ops are plain torch: autograd gives the exact backward, and the frozen weight never receives
a gradient because it does not require one. The math of each method lives in its own file under
``methods/``; this module is the name-based entry the layer, the tuner and the tests share.
"""

from __future__ import annotations

import torch

from flora_train.adapters.methods import METHODS, flora_linear, get_method, ia3_linear, lora_linear

# Every kernel that computes each method; all of a method's kernels compute the same function.
KERNELS: dict[str, tuple[str, ...]] = {name: m.kernels for name, m in METHODS.items()}

__all__ = ["KERNELS", "adapted_linear", "dense_adapted_bias", "dense_adapted_weight", "flora_linear", "ia3_linear",
           "kernel_error", "kernels_for", "lora_linear"]


def kernels_for(method: str, rank: int) -> tuple[str, ...]:
    """The kernels worth choosing between (e.g. at rank 1 FLoRA's two kernels are one GEMM)."""
    return get_method(method).kernels_for(rank)


def kernel_error(method: str, kernel: str) -> str | None:
    """Why ``kernel`` cannot compute ``method`` (None when it can, or for ``auto``)."""
    kernels = get_method(method).kernels
    if kernel == "auto" or kernel in kernels:
        return None
    return f"{kernel} does not compute {method}; use auto or one of {', '.join(kernels)}"


def adapted_linear(
    method: str,
    kernel: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    params: dict[str, torch.Tensor],
    index: torch.Tensor | None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """One dispatch point for every method and kernel (the layer and the kernel tuner both call it)."""
    return get_method(method).forward(kernel, x, weight, bias, params, index, scaling)


def dense_adapted_weight(
    method: str, weight: torch.Tensor, tensors: dict[str, torch.Tensor], scaling: float = 1.0
) -> torch.Tensor:
    """The explicit per-example weight ``W_i`` of one example's adapter (the reference the tests
    use, and the merged weight): FLoRA ``a [r, out]``, ``b [r, in]``; IA3 ``a [1, out]`` or
    ``b [1, in]``; LoRA ``lora_a [r, in]``, ``lora_b [out, r]``."""
    return get_method(method).dense_weight(weight, tensors, scaling)


def dense_adapted_bias(method: str, bias: torch.Tensor | None, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The bias of one example's adapted layer (IA3 scales an output layer's bias with its output)."""
    return get_method(method).dense_bias(bias, tensors)

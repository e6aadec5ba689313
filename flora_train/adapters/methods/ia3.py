"""IA3 (Liu et al. 2022) as PEFT defines it: one learned vector per adapted layer.

On attention and ordinary layers it scales the layer's *output* (bias included, as PEFT's
``result * ia3_l``): ``y = a ∘ (x Wᵀ + bias)``, ``a [1, out]``. On feed-forward output layers
(``down_proj``, ``fc2``, GPT-2's ``mlp.c_proj``: PEFT's per-architecture list, or the recipe's
``adapter.feedforward_modules``) it scales the layer's *input*: ``y = (x ∘ b) Wᵀ + bias``,
``b [1, in]``. Both start at 1 (the identity). The tensor's name says which it is, so a row's
layout alone tells how to apply, merge and export it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from flora_train.adapters.methods.base import AdapterMethod, as_3d, near_one, per_example
from flora_train.adapters.methods.runs import run_scale, token_runs


def ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    kernel: str = "fused",
) -> torch.Tensor:
    """``a * (x @ W^T + bias)`` (``a [batch|users, 1, out]``) or, for a feed-forward layer,
    ``(x * b) @ W^T + bias`` (``b [batch|users, 1, in]``). ``fused`` gathers each row's vector;
    ``segment`` scales each run of one user's adjacent one-token rows (a packed row's tokens) by
    its vector (``runs.py``), and computes rows of several tokens as ``fused`` does."""
    if (a is None) == (b is None):
        raise ValueError("IA3 takes exactly one of a (output scale) or b (input scale)")
    x3, shape = as_3d(x)
    runs = token_runs(index, x3.shape[1]) if kernel == "segment" else None
    if runs is not None:
        flat = x3.reshape(-1, x3.shape[-1])
        if b is not None:
            y = F.linear(run_scale(flat, b[:, 0], runs), weight, bias)
        else:
            assert a is not None
            y = run_scale(F.linear(flat, weight, bias), a[:, 0], runs)
    elif b is not None:
        b = per_example(b, index, x3.shape[0], "b").to(x3.dtype)
        y = F.linear(x3 * b, weight, bias)
    else:
        assert a is not None
        a = per_example(a, index, x3.shape[0], "a").to(x3.dtype)
        y = a * F.linear(x3, weight, bias)
    return y.reshape(*shape[:-1], weight.shape[0])


class IA3(AdapterMethod):
    name = "ia3"
    kernels = ("fused", "segment")
    peft_type = "IA3"
    uses_feedforward = True

    def param_shapes(self, in_features: int, out_features: int, rank: int, feedforward: bool) -> dict[str, tuple[int, ...]]:
        return {"b": (1, in_features)} if feedforward else {"a": (1, out_features)}

    def init_param(self, name: str, shape: tuple[int, ...], seeds: torch.Tensor, offset: int) -> torch.Tensor:
        return torch.ones(seeds.shape[0], shape[0] * shape[1], dtype=torch.float32)

    def forward(self, kernel, x, weight, bias, params, index, scaling):
        return ia3_linear(x, weight, bias, params.get("a"), index, params.get("b"), kernel)

    def dense_weight(self, weight, tensors, scaling):
        if "b" in tensors:
            return weight * tensors["b"][0].unsqueeze(0)
        return weight * tensors["a"][0].unsqueeze(1)

    def dense_bias(self, bias, tensors):
        if bias is None or "b" in tensors:
            return bias
        return bias * tensors["a"][0]

    def synthetic_params(self, users, rank, n_in, n_out, dtype, device, requires_grad):
        return {"a": near_one(users, 1, n_out, dtype=dtype, device=device, requires_grad=requires_grad)}

    def peft_keys(self, module: str, params: Iterable[str]) -> dict[str, str]:
        return {f"base_model.model.{module}.ia3_l": "b" if "b" in params else "a"}

    def peft_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        # PEFT keeps a feed-forward layer's vector as [1, in] and the others' as [out, 1].
        return (shape[-1], 1) if name == "a" else shape

    def peft_config(self, rank: int, alpha: float, target_modules: list[str], feedforward_modules: list[str],
                    base_model: str, fan_in_fan_out: bool) -> dict[str, Any]:
        return {
            "peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "target_modules": target_modules, "feedforward_modules": feedforward_modules,
            "fan_in_fan_out": fan_in_fan_out, "init_ia3_weights": True, "inference_mode": True,
        }


IA3_METHOD = IA3()

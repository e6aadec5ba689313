"""FLoRA (Wen & Chaudhuri, ICLR 2024, eq. 5/6): a multiplicative per-example adapter.

``W_i = W ∘ (a_iᵀ b_i) / r`` with ``a [r, out]`` scaling output features and ``b [r, in]`` input
features, i.e. ``y = mean_j a_j ∘ ((x ∘ b_j) Wᵀ) + bias``. The rank components are *averaged*
(the paper's ``torch.mean`` reduction), so the mask's scale does not grow with r: an update that
moves every component by δ moves the mask by about δ at any rank, and one learning rate serves
every rank (the paper used ~50× LoRA's). The bias is not adapted.

Initialisation: the identity (``mean_j a_jᵀ b_j = 1`` exactly) with components that differ.
With every ``a_j = b_j = 1`` each component gets the same gradient, and Adam the same update,
forever: rank r would cost r GEMMs and learn a rank-1 mask. So ``a_j = 1`` and
``b_j = 1 + ε_j`` with ``Σ_j ε_j = 0`` per input feature, drawn per user: components come in
mirrored pairs ``1 + d, 1 - d`` (an odd last one is 1), and d is a multiple of 2⁻⁸, so every
``b`` value and their sum are exact in float32 and the untrained mask is exactly 1.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from flora_train.adapters.methods.base import AdapterMethod, as_3d, near_one, per_example
from flora_train.adapters.methods.runs import run_scale, token_runs
from flora_train.adapters.seeding import counter_uniform

FloraKernel = Literal["stacked", "rankwise", "segment"]
# Half-width of the symmetric perturbation of b at init, in units of the identity.
INIT_SPREAD = 0.25
_QUANTUM = 2.0**-8


def flora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    index: torch.Tensor | None = None,
    kernel: FloraKernel = "stacked",
) -> torch.Tensor:
    """``mean_j a_j * ((x * b_j) @ W^T) + bias`` per example.

    ``a [batch|users, r, out]``, ``b [batch|users, r, in]`` (per user with ``index [batch]``).
    Rank 1 costs one GEMM of the base's shape. At rank r, ``stacked`` puts the r scaled copies of
    x into one GEMM (fewer, larger kernels; r copies of the activations live at once) and
    ``rankwise`` runs r GEMMs of the base's shape, accumulating. ``segment`` scales each run of
    one user's adjacent one-token rows (a packed row's tokens) by its vectors (``runs.py``)
    instead of gathering them token by token, a copy as large as x itself; rows of several tokens
    it computes as ``stacked`` does.
    """
    x3, shape = as_3d(x)
    batch, rank = x3.shape[0], a.shape[1]
    if b.shape[1] != rank:
        raise ValueError(f"a has rank {rank} but b has rank {b.shape[1]}")
    runs = token_runs(index, x3.shape[1]) if kernel == "segment" else None
    if runs is not None:
        flat = x3.reshape(-1, x3.shape[-1])
        y = run_scale(F.linear(run_scale(flat, b[:, 0], runs), weight), a[:, 0], runs)
        for j in range(1, rank):
            y = y + run_scale(F.linear(run_scale(flat, b[:, j], runs), weight), a[:, j], runs)
        y = y if rank == 1 else y / rank
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], weight.shape[0])
    if kernel == "segment":  # rows of several tokens, or users in too many pieces: the gather's way
        kernel = "stacked"
    a = per_example(a, index, batch, "a").to(x3.dtype)
    b = per_example(b, index, batch, "b").to(x3.dtype)
    if rank == 1:
        y = a * F.linear(x3 * b, weight)
    elif kernel == "stacked":
        # [batch, r, tokens, in] -> one GEMM -> [batch, r, tokens, out]
        stacked = F.linear(x3.unsqueeze(1) * b.unsqueeze(2), weight)
        y = (stacked * a.unsqueeze(2)).mean(dim=1)
    elif kernel == "rankwise":
        y = a[:, :1] * F.linear(x3 * b[:, :1], weight)
        for j in range(1, rank):
            y = y + a[:, j : j + 1] * F.linear(x3 * b[:, j : j + 1], weight)
        y = y / rank
    else:
        raise ValueError(f"unknown FLoRA kernel {kernel!r}; expected stacked, rankwise or segment")
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], weight.shape[0])


def mirrored_perturbation(seeds: torch.Tensor, offset: int, rank: int, width: int) -> torch.Tensor:
    """``ε [users, rank, width]`` with ``Σ_j ε_j = 0`` exactly: pairs ``(d, -d)``, an odd last row
    0, ``d`` uniform in ``[-INIT_SPREAD, INIT_SPREAD]`` on a 2⁻⁸ grid."""
    users = seeds.shape[0]
    eps = torch.zeros(users, rank, width, dtype=torch.float32)
    pairs = rank // 2
    if pairs:
        u = counter_uniform(seeds, offset, pairs * width).view(users, pairs, width)
        d = torch.round((u * 2.0 - 1.0) * (INIT_SPREAD / _QUANTUM)) * _QUANTUM
        eps[:, 0 : 2 * pairs : 2] = d
        eps[:, 1 : 2 * pairs : 2] = -d
    return eps


class Flora(AdapterMethod):
    name = "flora"
    kernels = ("stacked", "rankwise", "segment")

    def kernels_for(self, rank: int) -> tuple[str, ...]:
        return ("stacked", "segment") if rank == 1 else self.kernels  # at rank 1 stacked is rankwise

    def param_shapes(self, in_features: int, out_features: int, rank: int, feedforward: bool) -> dict[str, tuple[int, ...]]:
        return {"a": (rank, out_features), "b": (rank, in_features)}

    def init_param(self, name: str, shape: tuple[int, ...], seeds: torch.Tensor, offset: int) -> torch.Tensor:
        ones = torch.ones(seeds.shape[0], shape[0] * shape[1], dtype=torch.float32)
        if name == "a":
            return ones
        return ones + mirrored_perturbation(seeds, offset, shape[0], shape[1]).view(seeds.shape[0], -1)

    def forward(self, kernel, x, weight, bias, params, index, scaling):
        return flora_linear(x, weight, bias, params["a"], params["b"], index=index, kernel=kernel)

    def dense_weight(self, weight, tensors, scaling):
        a, b = tensors["a"], tensors["b"]
        return weight * (a.transpose(0, 1) @ b) / a.shape[0]

    def synthetic_params(self, users, rank, n_in, n_out, dtype, device, requires_grad):
        return {"a": near_one(users, rank, n_out, dtype=dtype, device=device, requires_grad=requires_grad),
                "b": near_one(users, rank, n_in, dtype=dtype, device=device, requires_grad=requires_grad)}


FLORA = Flora()

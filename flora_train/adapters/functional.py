"""Per-example adapter math over a frozen linear map.

Every op takes the activations ``x [batch, seq, in]`` of a frozen ``nn.Linear`` (``weight [out, in]``,
``bias [out] | None``) and per-example adapter tensors. Adapter tensors are either one per example
(leading dim ``batch``) or one per *user* (leading dim ``users``) together with ``index [batch]``
mapping each example to its user, so a user with many examples in the batch is stored once and
its gradient is summed over its examples by autograd.

All ops are plain torch: autograd gives the exact backward, and the frozen weight never receives
a gradient because it does not require one.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LoraKernel = Literal["bmm", "segment", "loop"]
FloraKernel = Literal["stacked", "rankwise"]

# Every kernel that computes each method; all of a method's kernels compute the same function.
KERNELS: dict[str, tuple[str, ...]] = {"flora": ("stacked", "rankwise"), "lora": ("bmm", "segment", "loop"), "ia3": ("fused",)}


def kernels_for(method: str, rank: int) -> tuple[str, ...]:
    """The kernels worth choosing between: at rank 1 FLoRA's two kernels are the same single GEMM."""
    if method not in KERNELS:
        raise ValueError(f"unknown adapter method {method!r}")
    if method == "flora" and rank == 1:
        return ("stacked",)
    return KERNELS[method]


def kernel_error(method: str, kernel: str) -> str | None:
    """Why ``kernel`` cannot compute ``method`` (None when it can, or for ``auto``)."""
    if kernel == "auto" or kernel in KERNELS[method]:
        return None
    return f"{kernel} does not compute {method}; use auto or one of {', '.join(KERNELS[method])}"


def _per_example(t: torch.Tensor, index: torch.Tensor | None, batch: int, name: str) -> torch.Tensor:
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


def _as_3d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """Views ``x [batch, *, in]`` as ``[batch, tokens, in]``; returns the original shape to restore."""
    if x.dim() < 2:
        raise ValueError(f"x must be [batch, ..., in], got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1, x.shape[-1]), x.shape


def flora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    index: torch.Tensor | None = None,
    kernel: FloraKernel = "stacked",
) -> torch.Tensor:
    """FLoRA (Wen & Chaudhuri 2024, eq. 6): ``mean_j a_j * ((x * b_j) @ W^T) + bias`` per example.

    ``a [batch|users, r, out]`` scales output features, ``b [batch|users, r, in]`` input features;
    equivalently ``W_i = W * (a_i^T b_i) / r``. Rank 1 costs one GEMM of the base's shape. At rank r,
    ``stacked`` puts the r scaled copies of x into one GEMM (fewer, larger kernels; r copies of the
    activations live at once) and ``rankwise`` runs r GEMMs of the base's shape, accumulating.
    """
    x3, shape = _as_3d(x)
    batch, rank = x3.shape[0], a.shape[1]
    if b.shape[1] != rank:
        raise ValueError(f"a has rank {rank} but b has rank {b.shape[1]}")
    a = _per_example(a, index, batch, "a").to(x3.dtype)
    b = _per_example(b, index, batch, "b").to(x3.dtype)
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
        raise ValueError(f"unknown FLoRA kernel {kernel!r}; expected stacked or rankwise")
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], weight.shape[0])


def ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """IA3 ("rank 0.5" FLoRA): ``a * (x @ W^T) + bias`` with ``a [batch|users, 1, out]``; bias not adapted."""
    x3, shape = _as_3d(x)
    a = _per_example(a, index, x3.shape[0], "a").to(x3.dtype)
    y = a * F.linear(x3, weight)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], weight.shape[0])


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    index: torch.Tensor | None = None,
    kernel: LoraKernel = "bmm",
) -> torch.Tensor:
    """LoRA (PEFT convention): ``x @ W^T + bias + scaling * (x @ A^T) @ B^T`` per example.

    ``lora_a [batch|users, r, in]``, ``lora_b [batch|users, out, r]``. Kernels: ``bmm`` gathers
    each example's A and B and runs two batched matmuls; ``segment`` sorts examples by user and runs
    one pair of GEMMs per distinct user over all of that user's tokens (Punica SGMV / mLoRA style,
    no per-example copies of A and B); ``loop`` is the same per-user loop without sorting (a
    reference). All three compute the same function.
    """
    x3, shape = _as_3d(x)
    batch = x3.shape[0]
    if lora_a.shape[1] != lora_b.shape[2]:
        raise ValueError(f"lora_a has rank {lora_a.shape[1]} but lora_b has rank {lora_b.shape[2]}")
    out = F.linear(x3, weight, bias)
    # The base GEMM's output dtype is the compute dtype (bf16 under autocast even for float32 x).
    # The update is added into it in place, which autocast does not cast for: every operand is
    # brought to that dtype here. (The GEMM's backward needs x and W, never its output, so writing
    # into the output is safe.)
    dtype = out.dtype
    if kernel == "bmm" or index is None:
        a = _per_example(lora_a, index, batch, "lora_a").to(dtype)
        b = _per_example(lora_b, index, batch, "lora_b").to(dtype)
        # out += scaling * (h @ B^T) as one op: no second full-size output, no separate scale or
        # sum, and the backward scales only the small [batch, tokens, r] gradients.
        h = torch.bmm(x3.to(dtype), a.transpose(1, 2))
        out.baddbmm_(h, b.transpose(1, 2), alpha=scaling)
        return out.reshape(*shape[:-1], weight.shape[0])
    if kernel == "segment":
        delta = _lora_delta_segmented(x3.to(dtype), lora_a, lora_b, index)
    elif kernel == "loop":
        delta = _lora_delta_loop(x3.to(dtype), lora_a, lora_b, index)
    else:
        raise ValueError(f"unknown LoRA kernel {kernel!r}; expected bmm, segment or loop")
    return out.add_(delta.to(dtype), alpha=scaling).reshape(*shape[:-1], weight.shape[0])


def _lora_delta_segmented(x3: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(index, stable=True)
    users, counts = torch.unique_consecutive(index[order], return_counts=True)
    xs = x3.index_select(0, order)
    tokens, width = xs.shape[1], xs.shape[2]
    pieces = []
    for user, seg in zip(users.tolist(), torch.split(xs, counts.tolist())):
        a, b = lora_a[user].to(xs.dtype), lora_b[user].to(xs.dtype)
        flat = seg.reshape(-1, width)
        pieces.append(F.linear(F.linear(flat, a), b).reshape(seg.shape[0], tokens, -1))
    sorted_delta = torch.cat(pieces, dim=0)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return sorted_delta.index_select(0, inverse)


def _lora_delta_loop(x3: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    rows, outs = [], []
    for user in torch.unique(index).tolist():
        mine = (index == user).nonzero().squeeze(1)
        a, b = lora_a[user].to(x3.dtype), lora_b[user].to(x3.dtype)
        rows.append(mine)
        outs.append(F.linear(F.linear(x3.index_select(0, mine), a), b))
    # One scatter of every user's rows (a scatter per user would copy the whole output each time).
    delta = x3.new_zeros(x3.shape[0], x3.shape[1], lora_b.shape[1])
    return delta.index_put((torch.cat(rows),), torch.cat(outs))


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
    if method == "flora":
        return flora_linear(x, weight, bias, params["a"], params["b"], index=index, kernel=kernel)  # type: ignore[arg-type]
    if method == "ia3":
        return ia3_linear(x, weight, bias, params["a"], index=index)
    if method == "lora":
        return lora_linear(x, weight, bias, params["lora_a"], params["lora_b"], scaling, index=index, kernel=kernel)  # type: ignore[arg-type]
    raise ValueError(f"unknown adapter method {method!r}")


def dense_adapted_weight(
    method: str, weight: torch.Tensor, tensors: dict[str, torch.Tensor], scaling: float = 1.0
) -> torch.Tensor:
    """The explicit per-example weight ``W_i`` of one example's adapter (the reference the tests use).

    ``tensors`` holds one example's adapter: FLoRA ``a [r, out]``, ``b [r, in]``; IA3 ``a [1, out]``;
    LoRA ``lora_a [r, in]``, ``lora_b [out, r]``.
    """
    if method == "flora":
        a, b = tensors["a"], tensors["b"]
        return weight * (a.transpose(0, 1) @ b) / a.shape[0]
    if method == "ia3":
        return weight * tensors["a"][0].unsqueeze(1)
    if method == "lora":
        return weight + scaling * tensors["lora_b"] @ tensors["lora_a"]
    raise ValueError(f"unknown adapter method {method!r}")

"""LoRA (PEFT's convention), batched over examples that each carry their own user's adapter.

``y = x Wᵀ + bias + s · (x Aᵀ) Bᵀ`` with ``lora_A [r, in]``, ``lora_B [out, r]``, ``s = alpha / r``;
A starts kaiming-uniform (as PEFT's ``kaiming_uniform_(a=sqrt(5))``), B at zero. Exported to
PEFT exactly (``lora_A.weight`` / ``lora_B.weight``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F

from flora_train.adapters.methods.base import AdapterMethod, as_3d, near_one, per_example
from flora_train.adapters.methods.runs import user_runs
from flora_train.adapters.seeding import counter_uniform

LoraKernel = Literal["bmm", "segment", "loop"]


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
    """``x @ W^T + bias + scaling * (x @ A^T) @ B^T`` per example.

    ``lora_a [batch|users, r, in]``, ``lora_b [batch|users, out, r]``. Kernels: ``bmm`` gathers
    each example's A and B and runs two batched matmuls; ``segment`` runs one pair of GEMMs per run
    of one user's adjacent examples, or per user after sorting a scattered batch (Punica SGMV /
    mLoRA style, no per-example copies of A and B), in place into the base output; ``loop`` is a
    per-user loop through autograd (a reference). All three compute the same function.
    """
    x3, shape = as_3d(x)
    batch = x3.shape[0]
    if lora_a.shape[1] != lora_b.shape[2]:
        raise ValueError(f"lora_a has rank {lora_a.shape[1]} but lora_b has rank {lora_b.shape[2]}")
    if kernel == "segment" and index is not None:
        return _segmented(x3, weight, bias, lora_a, lora_b, index, scaling).reshape(*shape[:-1], weight.shape[0])
    out = F.linear(x3, weight, bias)
    # The base GEMM's output dtype is the compute dtype (bf16 under autocast even for float32 x).
    # The update is added into it in place, which autocast does not cast for: every operand is
    # brought to that dtype here. (The GEMM's backward needs x and W, never its output, so writing
    # into the output is safe.)
    dtype = out.dtype
    if kernel == "bmm" or index is None:
        a = per_example(lora_a, index, batch, "lora_a").to(dtype)
        b = per_example(lora_b, index, batch, "lora_b").to(dtype)
        # out += scaling * (h @ B^T) as one op: no second full-size output, no separate scale or
        # sum, and the backward scales only the small [batch, tokens, r] gradients.
        h = torch.bmm(x3.to(dtype), a.transpose(1, 2))
        out.baddbmm_(h, b.transpose(1, 2), alpha=scaling)
        return out.reshape(*shape[:-1], weight.shape[0])
    if kernel == "loop":
        delta = _delta_loop(x3.to(dtype), lora_a, lora_b, index)
    else:
        raise ValueError(f"unknown LoRA kernel {kernel!r}; expected bmm, segment or loop")
    return out.add_(delta.to(dtype), alpha=scaling).reshape(*shape[:-1], weight.shape[0])


class _SegmentLora(torch.autograd.Function):
    """``out[s:e] += scaling * (x[s:e] A_u^T) B_u^T`` for each run ``(u, s, e)`` of rows of one user,
    written into the base GEMM's output in place, with a hand-written backward that writes each
    run's input gradient into its slice. On a CPU the rank-r GEMMs are bound by memory, not
    arithmetic: autograd's version of the same loop (a GEMM pair per run, ``cat``, add) made about
    ten passes over the activations and cost 70% of the base layer at r8 (256x256, 4,096 packed
    tokens); this makes four. A user may own several runs: its gradients add up."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,  # type: ignore[override]
                scaling: float, runs: list[tuple[int, int, int]]) -> torch.Tensor:
        # Every operand is in the compute dtype already; autocast has nothing to cast (and refuses out=).
        with torch.autocast(x.device.type, enabled=False):
            h = x.new_empty(x.shape[0], lora_a.shape[1])
            for u, s, e in runs:
                torch.mm(x[s:e], lora_a[u].t(), out=h[s:e])
                out[s:e].addmm_(h[s:e], lora_b[u].t(), alpha=scaling)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, lora_a, lora_b, h)
        ctx.scaling, ctx.runs = scaling, runs
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, lora_a, lora_b, h = ctx.saved_tensors
        # The runs cover every row once (the index's own runs), so each slice is written, not added.
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[1] else None
        grad_a, grad_b = torch.zeros_like(lora_a), torch.zeros_like(lora_b)
        for u, s, e in ctx.runs:
            g = grad[s:e]
            gh = torch.mm(g, lora_b[u]).mul_(ctx.scaling)
            grad_b[u].addmm_(g.t(), h[s:e], alpha=ctx.scaling)
            grad_a[u].addmm_(gh.t(), x[s:e])
            if grad_x is not None:
                torch.mm(gh, lora_a[u], out=grad_x[s:e])
        return grad, grad_x, grad_a, grad_b, None, None


def _segmented(x3: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
               lora_b: torch.Tensor, index: torch.Tensor, scaling: float) -> torch.Tensor:
    """The base layer plus each example's update, one GEMM pair per run of one user's examples (the
    planner's order and a packed row's tokens come in such runs). A scattered batch is computed
    sorted by user and put back in its order after. Rows are ``x3`` flattened to
    ``[batch * tokens, in]``, so the base GEMM's output is the tensor the runs write into (not a
    view of one)."""
    batch, tokens, width = x3.shape
    runs = user_runs(index, tokens)
    order = None
    if runs is None:
        order = torch.argsort(index, stable=True)
        x3 = x3.index_select(0, order)
        runs = user_runs(index[order], tokens)
        assert runs is not None  # sorted: one run per user
    flat = x3.reshape(batch * tokens, width)
    out = F.linear(flat, weight, bias)
    dtype = out.dtype  # the compute dtype (bf16 under autocast)
    y = _SegmentLora.apply(out, flat.to(dtype), lora_a.to(dtype), lora_b.to(dtype), scaling, runs).view(batch, tokens, -1)
    return y if order is None else y.index_select(0, torch.argsort(order))  # argsort of a permutation: its inverse


def _delta_loop(x3: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    rows, outs = [], []
    for user in torch.unique(index).tolist():
        mine = (index == user).nonzero().squeeze(1)
        a, b = lora_a[user].to(x3.dtype), lora_b[user].to(x3.dtype)
        rows.append(mine)
        outs.append(F.linear(F.linear(x3.index_select(0, mine), a), b))
    # One scatter of every user's rows (a scatter per user would copy the whole output each time).
    delta = x3.new_zeros(x3.shape[0], x3.shape[1], lora_b.shape[1])
    return delta.index_put((torch.cat(rows),), torch.cat(outs))


class Lora(AdapterMethod):
    name = "lora"
    kernels = ("bmm", "segment", "loop")
    peft_type = "LORA"
    uses_alpha = True

    def block_kernel(self, kernel: str) -> str:
        return "bmm"  # one row per packed sequence: nothing left to group by

    def param_shapes(self, in_features: int, out_features: int, rank: int, feedforward: bool) -> dict[str, tuple[int, ...]]:
        return {"lora_a": (rank, in_features), "lora_b": (out_features, rank)}

    def init_param(self, name: str, shape: tuple[int, ...], seeds: torch.Tensor, offset: int) -> torch.Tensor:
        numel = shape[0] * shape[1]
        if name == "lora_b":
            return torch.zeros(seeds.shape[0], numel, dtype=torch.float32)
        # kaiming_uniform_(a=sqrt(5)) as PEFT does: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(shape[1])
        return (counter_uniform(seeds, offset, numel) * 2.0 - 1.0) * bound

    def forward(self, kernel, x, weight, bias, params, index, scaling):
        return lora_linear(x, weight, bias, params["lora_a"], params["lora_b"], scaling, index=index, kernel=kernel)

    def dense_weight(self, weight, tensors, scaling):
        return weight + scaling * tensors["lora_b"] @ tensors["lora_a"]

    def synthetic_params(self, users, rank, n_in, n_out, dtype, device, requires_grad):
        return {"lora_a": near_one(users, rank, n_in, dtype=dtype, device=device, requires_grad=requires_grad),
                "lora_b": near_one(users, n_out, rank, dtype=dtype, device=device, requires_grad=requires_grad)}

    def peft_keys(self, module: str, params: Iterable[str]) -> dict[str, str]:
        return {f"base_model.model.{module}.lora_A.weight": "lora_a",
                f"base_model.model.{module}.lora_B.weight": "lora_b"}

    def peft_config(self, rank: int, alpha: float, target_modules: list[str], feedforward_modules: list[str],
                    base_model: str, fan_in_fan_out: bool) -> dict[str, Any]:
        # Module-name suffixes, as vLLM and LoRAX expect (they match target modules by the last
        # name component). Where the run adapted only some of the layers a suffix names, PEFT
        # gives the others a zero B: the identity, so the logits are unchanged.
        suffixes = sorted({m.rsplit(".", 1)[-1] for m in target_modules})
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "target_modules": suffixes,
            "modules_to_save": None, "fan_in_fan_out": fan_in_fan_out,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        }


LORA = Lora()

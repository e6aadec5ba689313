"""Runs of one user's rows: what the segment kernels of every method compute on.

The planner puts a user's examples next to each other, and a packed row's tokens come in runs of
one user's examples (``data/batching.py``), so a batch's rows are a few runs ``(user, first row,
end row)``. A kernel that works run by run reads each user's tensors once per run, where the
per-row gather writes a copy of them for every row (every token, in a packed row) and its
backward sums them back with a scatter.
"""

from __future__ import annotations

import torch


def token_runs(index: torch.Tensor | None, tokens_per_row: int) -> list[tuple[int, int, int]] | None:
    """The runs a per-feature scale (FLoRA, IA3) works on: only where each row is one token (a
    packed row's tokens, a decoding step), the rows whose gather copies as much as ``x`` itself.
    Rows of several tokens gather a vector per row, ``1/tokens`` of ``x``, and a broadcast product:
    there, run by run was no faster alone and 8-10% slower in a training run (padded
    micro-batches of 16 examples of 87 tokens, FLoRA r1 on a Llama 256x4), so they keep the gather."""
    return user_runs(index, 1) if index is not None and tokens_per_row == 1 else None


def user_runs(index: torch.Tensor, rows_per_example: int) -> list[tuple[int, int, int]] | None:
    """``(user, first row, end row)`` of each run of adjacent examples of one user, in rows of
    ``rows_per_example``; None when users come in too many pieces (more runs than twice the users)
    for a kernel call per run to pay."""
    users, counts = torch.unique_consecutive(index, return_counts=True)
    run_users, run_counts = users.tolist(), counts.tolist()  # the one device sync
    if len(run_users) > 2 * len(set(run_users)):
        return None
    runs, start = [], 0
    for u, n in zip(run_users, run_counts):
        runs.append((u, start, start + n * rows_per_example))
        start += n * rows_per_example
    return runs


class _RunScale(torch.autograd.Function):
    """``y[s:e] = x[s:e] * v[u]`` for each run ``(u, s, e)``: a per-user scale of the features
    (FLoRA's and IA3's vectors) with no per-row copy of ``v``. Against the gather (``v[index]``,
    then a full-size product, and a scatter-add in the backward), over 4,096 packed tokens of 8 or
    16 users on this project's CPU, FLoRA r1's layer forward and backward took 5.9-6.3 ms against
    7.7-9.1 ms at 256x256 and 13.6-14.8 ms against 15.7-16.7 ms at 256x688 and 688x256 (the base
    layer alone 3.5 and 9.3-10.2 ms). ``v``'s gradient is summed in its own dtype (float32 rows
    under bf16 autocast), as the gather's scatter-add sums it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, v: torch.Tensor, runs: list[tuple[int, int, int]]) -> torch.Tensor:  # type: ignore[override]
        out = torch.empty_like(x)
        with torch.autocast(x.device.type, enabled=False):
            for u, s, e in runs:
                torch.mul(x[s:e], v[u].to(x.dtype), out=out[s:e])
        ctx.save_for_backward(x, v)
        ctx.runs = runs
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, v = ctx.saved_tensors
        # The runs cover every row once, so each slice of the input's gradient is written, not added.
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_v = torch.zeros_like(v) if ctx.needs_input_grad[1] else None
        for u, s, e in ctx.runs:
            g = grad[s:e]
            if grad_x is not None:
                torch.mul(g, v[u].to(g.dtype), out=grad_x[s:e])
            if grad_v is not None:
                grad_v[u] += (g * x[s:e]).sum(0, dtype=v.dtype)
        return grad_x, grad_v, None


def run_scale(x: torch.Tensor, v: torch.Tensor, runs: list[tuple[int, int, int]]) -> torch.Tensor:
    """``x [rows, width]`` with each run's rows scaled by its user's ``v [users, width]``."""
    return _RunScale.apply(x, v, runs)

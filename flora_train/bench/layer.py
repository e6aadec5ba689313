"""`flora-train bench layer`: every adapter kernel over the plain frozen ``nn.Linear`` it wraps.

For each width, rank and user mix, one micro-batch goes forward and backward (into the activations
and the adapters; the base weight is frozen) through: the base layer alone, FLoRA's two kernels,
LoRA's three (gather+bmm, segmented, a loop over users), IA3, and, for inference, PEFT's mixed-batch
LoRA forward (``adapter_names``). Times are medians after a warm-up, all in one process, and each
is printed as a ratio to the base layer at the same shape.

The crossover is the smallest rank at which the fastest LoRA kernel beats the fastest FLoRA kernel
(the paper's eq. 7 made empirical): advice for choosing a method, never a swap the framework makes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flora_train.adapters.functional import kernels_for
from flora_train.adapters.tuning import KernelTuner
from flora_train.adapters.tuning import grouped_index, median_seconds, time_kernel
from flora_train.bench.common import bench_device, bench_dtype, machine, new_figure, quiet_peft, save_figure, write_json


def _base_seconds(weight: torch.Tensor, batch: int, tokens: int, backward: bool, repeats: int) -> float:
    x = torch.randn(batch, tokens, weight.shape[1], device=weight.device, dtype=weight.dtype).requires_grad_(backward)

    def step() -> None:
        if backward:
            y = F.linear(x, weight)
            y.backward(torch.ones_like(y))
        else:
            with torch.no_grad():
                F.linear(x, weight)

    return median_seconds(step, weight.device, repeats)


class _OneLinear(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _peft_mixed_forward_seconds(weight: torch.Tensor, rank: int, batch: int, users: int, tokens: int,
                                repeats: int) -> float:
    """PEFT's mixed-adapter batch (``adapter_names``, one name per example): inference only."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"], init_lora_weights=False)
    with quiet_peft():
        model = get_peft_model(_OneLinear(weight), config, adapter_name="user-0")
    for u in range(1, users):
        model.add_adapter(f"user-{u}", config)
    model.to(device=weight.device, dtype=weight.dtype).eval()
    names = [f"user-{u}" for u in grouped_index(batch, users, torch.device("cpu")).tolist()]
    x = torch.randn(batch, tokens, weight.shape[1], device=weight.device, dtype=weight.dtype)

    def step() -> None:
        with torch.no_grad():
            model(x, adapter_names=names)

    return median_seconds(step, weight.device, repeats)


def measure_point(weight: torch.Tensor, rank: int, batch: int, users: int, tokens: int, repeats: int,
                  peft: bool = True) -> dict[str, Any]:
    """Milliseconds of every kernel at one (width, rank, users) point, and the fastest of each method."""
    ms: dict[str, float] = {}
    base_before = _base_seconds(weight, batch, tokens, True, repeats)
    fwd_before = _base_seconds(weight, batch, tokens, False, repeats)
    for method in ("flora", "lora", "ia3"):
        for kernel in kernels_for(method, rank):
            ms[f"{method}_{kernel}"] = 1e3 * time_kernel(method, kernel, weight, None, rank, batch, users, tokens,
                                                         True, repeats, scaling=2.0)
    ms["lora_bmm_fwd"] = 1e3 * time_kernel("lora", "bmm", weight, None, rank, batch, users, tokens, False, repeats, 2.0)
    if peft:
        ms["peft_mixed_fwd"] = 1e3 * _peft_mixed_forward_seconds(weight, rank, batch, users, tokens, repeats)
    # The base is timed before and after the kernels and the faster median kept: one slow spell of
    # the machine while the base was timed would otherwise make every kernel look faster than it.
    ms["base"] = 1e3 * min(base_before, _base_seconds(weight, batch, tokens, True, repeats))
    ms["base_fwd"] = 1e3 * min(fwd_before, _base_seconds(weight, batch, tokens, False, repeats))
    best = {m: min((k for k in ms if k.startswith(m + "_") and not k.endswith("_fwd")), key=ms.__getitem__)
            for m in ("flora", "lora")}
    # What adapter.kernel=auto really runs at this shape: a fresh tuner's own measurement and choice
    # (it may differ from this table's fastest where two kernels are within noise).
    tuner, shape = KernelTuner(), torch.Size([batch, tokens, weight.shape[1]])
    auto = {m: tuner.choose(m, rank, weight, None, shape, users, 2.0) for m in ("flora", "lora")}
    return {"width": int(weight.shape[0]), "rank": rank, "batch": batch, "users": users, "tokens": tokens, "ms": ms,
            "fastest": {m: k.split("_", 1)[1] for m, k in best.items()}, "auto": auto,
            "ratio": {k: v / ms["base_fwd" if k.endswith("_fwd") else "base"] for k, v in ms.items()}}


MARGIN = 0.05  # differences below this are within run-to-run noise and count as a tie


def crossovers(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per width and user mix: the smallest rank where the fastest LoRA kernel beats the fastest FLoRA
    one by more than ``MARGIN``, and FLoRA's time over LoRA's at every rank."""
    out = []
    for width, users in sorted({(p["width"], p["users"]) for p in points}):
        series = sorted((p for p in points if p["width"] == width and p["users"] == users), key=lambda p: p["rank"])
        ratio = {p["rank"]: p["ms"]["flora_" + p["fastest"]["flora"]] / p["ms"]["lora_" + p["fastest"]["lora"]]
                 for p in series}
        rank = next((r for r, v in ratio.items() if v > 1 + MARGIN), None)
        out.append({"width": width, "users": users, "lora_faster_from_rank": rank, "flora_over_lora": ratio,
                    "ranks_tried": list(ratio)})
    return out


def _print(result: dict[str, Any]) -> None:
    print(f"bench layer: forward+backward of one micro-batch ({result['batch']} examples x {result['tokens']} tokens, "
          f"{result['dtype']}, {result['device']}) over the frozen nn.Linear at the same shape; {result['machine']}")
    print("ratios to the base layer (forward+backward); PEFT and 'ours fwd' are forward-only, over the base forward; "
          "'auto picks' is the kernel tuner's own choice at this shape")
    head = (f"{'width':>5s} {'rank':>4s} {'users':>5s} {'base ms':>8s} {'flora stk':>9s} {'flora rkw':>9s} "
            f"{'flora seg':>9s} {'lora bmm':>8s} {'lora seg':>8s} {'lora loop':>9s} {'ia3':>6s} {'ia3 seg':>7s} "
            f"{'PEFT fwd':>8s} {'ours fwd':>8s}  auto picks")
    print(head)
    for p in result["points"]:
        r = p["ratio"]

        def cell(key: str, width: int) -> str:
            return f"{r[key]:>{width}.2f}" if key in r else f"{'-':>{width}s}"

        print(f"{p['width']:>5d} {p['rank']:>4d} {p['users']:>5d} {p['ms']['base']:>8.2f} {cell('flora_stacked', 9)} "
              f"{cell('flora_rankwise', 9)} {cell('flora_segment', 9)} {cell('lora_bmm', 8)} {cell('lora_segment', 8)} "
              f"{cell('lora_loop', 9)} {cell('ia3_fused', 6)} {cell('ia3_segment', 7)} {cell('peft_mixed_fwd', 8)} "
              f"{cell('lora_bmm_fwd', 8)}  "
              f"flora:{p['auto']['flora']} lora:{p['auto']['lora']}")
    print(f"crossover: the smallest rank where the fastest LoRA kernel beats the fastest FLoRA kernel by more than "
          f"{MARGIN:.0%} (FLoRA time / LoRA time per rank in brackets)")
    for c in result["crossover"]:
        where = (f"LoRA is faster from rank {c['lora_faster_from_rank']}" if c["lora_faster_from_rank"] is not None
                 else "FLoRA is as fast or faster at every rank tried")
        ratios = ", ".join(f"r{r} {v:.2f}" for r, v in c["flora_over_lora"].items())
        print(f"crossover, width {c['width']}, {c['users']} user(s) per batch: {where} ({ratios})")


def _plot(result: dict[str, Any], out: Path) -> Path:
    widths = sorted({p["width"] for p in result["points"]})
    fig, axes = new_figure(len(widths))
    for ax, width in zip(axes, widths):
        mixes = sorted({p["users"] for p in result["points"] if p["width"] == width})
        for users, style in zip((mixes[0], mixes[-1]), ("--", "-")):
            pts = sorted((p for p in result["points"] if p["width"] == width and p["users"] == users), key=lambda p: p["rank"])
            ranks = [p["rank"] for p in pts]
            for method, color in (("flora", "tab:blue"), ("lora", "tab:orange")):
                ax.plot(ranks, [p["ratio"][f"{method}_{p['fastest'][method]}"] for p in pts], style, color=color,
                        marker="o", label=f"{method} (fastest kernel), {users} user(s)")
            ax.plot(ranks, [p["ratio"]["ia3_fused"] for p in pts], style, color="tab:green", label=f"ia3, {users} user(s)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank")
        ax.set_ylabel("time / frozen nn.Linear (fwd+bwd)")
        ax.set_title(f"width {width}, {result['batch']}x{result['tokens']} tokens")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.legend(fontsize=7)
    return save_figure(fig, out, "layer")


def bench_layer(widths: Sequence[int] = (1024, 4096), ranks: Sequence[int] = (1, 2, 4, 8, 16),
                users: Sequence[int] | None = None, batch: int | None = None, tokens: int | None = None,
                repeats: int = 3, device: str = "auto", out: Path = Path("runs/bench"), peft: bool = True) -> dict[str, Any]:
    dev = bench_device(device)
    dtype = bench_dtype(dev)
    batch = batch or (128 if dev.type == "cuda" else 64)
    tokens = tokens or (256 if dev.type == "cuda" else 8)
    mixes = sorted({min(u, batch) for u in (users or (1, 8, 64, batch))})
    from flora_train.progress import progress_bar

    g = torch.Generator(device="cpu").manual_seed(0)
    points = []
    bar = progress_bar(total=len(widths) * len(ranks) * len(mixes), desc="bench layer", unit="point")
    for width in widths:
        weight = (torch.randn(width, width, generator=g) / width**0.5).to(dev, dtype)
        for rank in ranks:
            for u in mixes:
                bar.set_postfix(width=width, rank=rank, users=u, refresh=False)
                points.append(measure_point(weight, rank, batch, u, tokens, repeats, peft))
                bar.update(1)
    bar.close()
    result = {"suite": "layer", "machine": machine(dev), "device": dev.type, "dtype": str(dtype).removeprefix("torch."),
              "batch": batch, "tokens": tokens, "repeats": repeats, "points": points, "crossover": crossovers(points)}
    write_json(out, "layer", result)
    result["plot"] = str(_plot(result, out))
    _print(result)
    return result

"""`flora-train bench store`: a step's cost against the population size, measured side by side.

Two stores that differ only in how many users they hold run the same step (fetch the step's
rows, a gradient, the row-wise AdamW update) on the same number of users. The ratio of their
median step times and of the bytes a step allocates shows that step cost follows the batch,
not the table.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from flora_train.bench.common import machine, new_figure, save_figure, write_json
from flora_train.store import AdapterStore, OptimizerHyper


def _store(users: int, row_size: int) -> AdapterStore:
    def init(ids):
        return torch.ones(len(ids), row_size)

    store = AdapterStore(row_size, init, OptimizerHyper())
    store.add_users([f"user-{i}" for i in range(users)])
    return store


def _step(store: AdapterStore, ids: list[str], grad: torch.Tensor) -> None:
    rows = store.fetch(ids)
    rows.values.grad = grad
    store.apply(rows, torch.full((len(ids),), 1e-3))


def _step_bytes(store: AdapterStore, ids: list[str], grad: torch.Tensor) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(store, ids, grad)
    return sum(max(e.cpu_memory_usage, 0) for e in prof.events())


def measure(users: int, row_size: int, step_users: int, repeats: int, seed: int = 0) -> dict[str, float]:
    t0 = time.perf_counter()
    store = _store(users, row_size)
    build = time.perf_counter() - t0
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(step_users, row_size, generator=g)
    times = []
    for r in range(repeats + 5):
        # Different users every step, spread over the whole table (no cache-friendly locality).
        picks = torch.randperm(users, generator=g)[:step_users].tolist()
        ids = [f"user-{i}" for i in picks]
        t = time.perf_counter()
        _step(store, ids, grad)
        if r >= 5:  # warm-up
            times.append(time.perf_counter() - t)
    table_bytes = store.table.nbytes
    return {
        "users": users,
        "median_step_ms": statistics.median(times) * 1e3,
        "p90_step_ms": sorted(times)[int(0.9 * (len(times) - 1))] * 1e3,
        "step_alloc_bytes": _step_bytes(store, ids, grad),
        "table_bytes": table_bytes,
        "build_s": build,
    }


def _tiny_model_step(users: int, step_users: int, examples_per_user: int, repeats: int) -> dict[str, float]:
    """Median time of a full training step (tiny Llama forward/backward + store) at this table size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from flora_train.adapters import AdapterSpec, inject_adapters

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    slot, layout = inject_adapters(model, AdapterSpec("flora", 1), ["q_proj", "v_proj"])
    store = AdapterStore(layout.row_size, lambda ids: torch.ones(len(ids), layout.row_size), OptimizerHyper())
    store.add_users([f"user-{i}" for i in range(users)])
    g = torch.Generator().manual_seed(1)
    batch = step_users * examples_per_user
    ids = torch.randint(0, 512, (batch, 32), generator=g)
    index = torch.arange(step_users).repeat_interleave(examples_per_user)
    times = []
    for r in range(repeats + 3):
        picks = [f"user-{i}" for i in torch.randperm(users, generator=g)[:step_users].tolist()]
        t = time.perf_counter()
        rows = store.fetch(picks)
        with slot.activate(rows.values, index):
            model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
        store.apply(rows, torch.full((step_users,), 1e-3))
        if r >= 3:
            times.append(time.perf_counter() - t)
    return {"users": users, "row_size": layout.row_size, "median_step_ms": statistics.median(times) * 1e3}


def bench_store(small: int, large: int, row_size: int, step_users: int, repeats: int, out: Path | None = None) -> dict:
    torch.manual_seed(0)
    a = measure(small, row_size, step_users, repeats)
    b = measure(large, row_size, step_users, repeats)
    result = {
        "suite": "store",
        "machine": machine(),
        "row_size": row_size,
        "step_users": step_users,
        "small": a,
        "large": b,
        "step_time_ratio": b["median_step_ms"] / a["median_step_ms"],
        "step_alloc_ratio": b["step_alloc_bytes"] / max(a["step_alloc_bytes"], 1),
    }
    print(f"store step: {step_users} users x {row_size} floats, row-wise AdamW, {repeats} repeats ({result['machine']})")
    print(f"{'users in table':>16s} {'table MiB':>10s} {'median ms':>10s} {'p90 ms':>8s} {'step alloc KiB':>15s}")
    for r in (a, b):
        print(f"{r['users']:>16,d} {r['table_bytes'] / 2**20:>10.1f} {r['median_step_ms']:>10.3f} {r['p90_step_ms']:>8.3f} {r['step_alloc_bytes'] / 1024:>15.1f}")
    print(f"ratio large/small: step time {result['step_time_ratio']:.3f}x (target <= 1.1), step allocation {result['step_alloc_ratio']:.3f}x")
    ma = _tiny_model_step(small, step_users, 4, max(repeats // 5, 5))
    mb = _tiny_model_step(large, step_users, 4, max(repeats // 5, 5))
    result["model_step"] = {"small": ma, "large": mb, "ratio": mb["median_step_ms"] / ma["median_step_ms"]}
    print(f"full training step (tiny Llama, FLoRA r1 on q/v, {step_users} users x 4 examples x 32 tokens, row {ma['row_size']} floats):")
    print(f"{'users in table':>16s} {'median ms':>10s}")
    for r in (ma, mb):
        print(f"{r['users']:>16,d} {r['median_step_ms']:>10.2f}")
    print(f"ratio large/small: training step time {result['model_step']['ratio']:.3f}x (target <= 1.1)")
    from flora_train.bench.wire import gather_scatter_vs_memcpy, wire_bytes

    result["gather_scatter"] = gather_scatter_vs_memcpy(large, row_size, step_users, repeats)
    result["wire"] = wire_bytes(world=2, users=small * 10, row_size=row_size, step_users=step_users)
    if out is not None:
        write_json(out, "store", result)
        fig, axes = new_figure(2)
        labels = [f"{small:,} users", f"{large:,} users"]
        axes[0].bar(labels, [a["median_step_ms"], b["median_step_ms"]], color=["tab:blue", "tab:orange"])
        axes[0].set_ylabel("store step, median ms")
        axes[1].bar(labels, [ma["median_step_ms"], mb["median_step_ms"]], color=["tab:blue", "tab:orange"])
        axes[1].set_ylabel("full training step, median ms")
        for ax in axes:
            ax.set_title(f"{step_users} users per step")
        result["plot"] = str(save_figure(fig, out, "store"))
    return result

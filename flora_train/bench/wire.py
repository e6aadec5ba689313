"""Row movement benchmarks: gather + scatter of a step's rows against a plain memcpy of the same
bytes, and the bytes a step puts on the wire in owner and fetch placement (measured by the store's
counters in a real 2-process gloo group) against a dense all-reduce of the same table."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flora_train.store import AdapterStore, OptimizerHyper
from flora_train.store.sharded import ShardedAdapterStore
from flora_train.store.sharding import ShardPlan


def gather_scatter_vs_memcpy(users: int, row_size: int, step_users: int, repeats: int) -> dict[str, float]:
    table = torch.randn(users, row_size)
    g = torch.Generator().manual_seed(0)
    src = torch.empty(step_users, row_size)
    dst = torch.empty(step_users, row_size)
    gs, mc = [], []
    for r in range(repeats + 5):
        idx = torch.randperm(users, generator=g)[:step_users]
        t = time.perf_counter()
        rows = table.index_select(0, idx)
        table.index_copy_(0, idx, rows)
        t1 = time.perf_counter()
        dst.copy_(src)  # the same bytes, contiguous: once out, once back
        src.copy_(dst)
        t2 = time.perf_counter()
        if r >= 5:
            gs.append(t1 - t)
            mc.append(t2 - t1)
    nbytes = 2 * step_users * row_size * 4
    out = {
        "bytes_per_step": nbytes,
        "gather_scatter_GBps": nbytes / statistics.median(gs) / 1e9,
        "memcpy_GBps": nbytes / statistics.median(mc) / 1e9,
    }
    out["ratio"] = out["gather_scatter_GBps"] / out["memcpy_GBps"]
    print(f"gather+scatter of {step_users} random rows of {row_size} floats from {users:,} rows: "
          f"{out['gather_scatter_GBps']:.2f} GB/s vs memcpy of the same bytes {out['memcpy_GBps']:.2f} GB/s "
          f"(ratio {out['ratio']:.2f})")
    return out


def _wire_worker(rank: int, world: int, init_file: str, users: int, row_size: int, step_users: int, steps: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    tokens = {f"user-{i}": 4 for i in range(users)}
    for placement in ("owner", "fetch"):
        plan = ShardPlan.balanced(tokens, world)
        local = AdapterStore(row_size, lambda ids: torch.ones(len(ids), row_size), OptimizerHyper())
        store = ShardedAdapterStore(local, plan, placement)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            picks = torch.randperm(users, generator=g)[:step_users].tolist()
            pairs = [(f"user-{i}", k) for i in picks for k in range(4)]
            work = store.work(pairs, 1 << 30)
            rows = store.fetch(work.user_ids)
            rows.values.grad = torch.ones_like(rows.values)
            owned = store.reduce_grads(rows)
            store.apply(owned, torch.full((len(owned.user_ids),), 1e-3))
        c = store.counters
        totals = torch.tensor([c.bytes_sent, c.rows_remote], dtype=torch.float64)
        dist.all_reduce(totals)
        results[placement] = {"bytes_per_step": float(totals[0]) / steps, "remote_rows_per_step": float(totals[1]) / steps}
    if rank == 0:
        Path(out).write_text(repr(results))
    dist.destroy_process_group()


def wire_bytes(world: int, users: int, row_size: int, step_users: int, steps: int = 20) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "wire.txt")
        mp.spawn(_wire_worker, args=(world, str(Path(tmp) / "init"), users, row_size, step_users, steps, out), nprocs=world)
        import ast

        results = ast.literal_eval(Path(out).read_text())
    table = users * row_size * 4
    # A ring all-reduce of the table's gradient sends 2 (w - 1) / w of it from every rank.
    results["dense_allreduce"] = {"bytes_per_step": 2 * (world - 1) / world * table * world}
    print(f"bytes on the wire per step, {world} ranks, {step_users} users x 4 examples, table {users:,} x {row_size} floats:")
    for name in ("owner", "fetch", "dense_allreduce"):
        print(f"{name:>16s} {results[name]['bytes_per_step'] / 2**20:12.3f} MiB")
    fetch = results["fetch"]["bytes_per_step"]
    print(f"dense all-reduce / fetch: {results['dense_allreduce']['bytes_per_step'] / max(fetch, 1):.0f}x; "
          f"owner moves {results['owner']['bytes_per_step']:.0f} bytes of adapter rows "
          "(dense all-reduce figure: ring formula, not measured)")
    return results

"""`flora-train bench scale`: what a whole run costs as the population grows, with the same work a step.

One real training run per population (``--populations``, default 10^3, 10^5, 10^6 users, one
example each), each in a fresh process: the tiny Llama, FLoRA r1 on q/v, AdamW, the disk tier,
``--users-per-step`` users a step. Per run:

- step time, side by side: the real ``Trainer`` step (rows from the store, forward/backward,
  row-wise update) on the population's store, alternating step by step with the same step on a
  store of the smallest population's first users, in the same process: the ratio of their medians
  is what the population costs a step, whatever the machine's speed does meanwhile;
- memory: the peak of private memory (``RssAnon``, sampled every 20 ms by the parent process) and the high-water RSS
  (``VmHWM``, which also counts the store's and the checkpoints' mapped file pages, shared with
  the page cache and dropped under pressure);
- checkpoints: a full one, then ``--steps`` more steps, then an incremental one: seconds and bytes,
  against the share of the population those steps touched;
- restore (the newest checkpoint, its chain included, into a fresh store on its own disk tier) and
  a packed export: seconds;
- the side-by-side step again with one compute thread, a core left to the store's prefetch thread.

Then the per-user state of each optimizer, measured from a store's columns, and the projection to
10^8 users over 64 GPUs from those bytes (per-user bytes are what the population multiplies).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from flora_train.bench.common import machine, write_json
from flora_train.run_dir import RunDir
from flora_train.run_dir.checkpoints import read_manifest

BASE = dict(architecture="llama", hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
            vocab_size=512, max_position_embeddings=64, seed=0, pretrain_steps=0)
OPTIMIZERS = (("adamw", "float32"), ("adamw", "bfloat16"), ("rowwise_adagrad", "float32"))
# Real bases for the projection (their shapes only: built on the meta device, nothing is downloaded).
PROJECTED = {
    "Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status(path: Path = Path("/proc/self/status")) -> dict[str, float]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024  # MiB
    return out


def _private_peak(proc: subprocess.Popen, every_s: float = 0.02) -> float:
    """The highest ``RssAnon`` (MiB) of ``proc`` until it exits, sampled from this process: a
    thread inside it would need the GIL, which a long copy in C holds for seconds."""
    peak = 0.0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            peak = max(peak, _status(status)["RssAnon"])
        except (OSError, KeyError):
            pass
        time.sleep(every_s)
    return peak


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _write_data(path: Path, users: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(300)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for u in range(users):
            f.write(json.dumps({"user_id": f"user-{u:07d}", "text": " ".join(rng.choice(words) for _ in range(6))}) + "\n")


def measure_population(users: int, work: Path, model_dir: Path, users_per_step: int, steps: int, warmup: int,
                       reference_users: int) -> dict[str, Any]:
    """One population's run, in this process (the bench starts a fresh process for each)."""
    import torch

    from flora_train.config import load_recipe
    from flora_train.export import export_adapters
    from flora_train.run_dir.checkpoints import load_checkpoint
    from flora_train.tracking import Tracker
    from flora_train.train.loop import TrainLoop
    from flora_train.train.session import make_store, prepare_session, train_settings
    from flora_train.train.trainer import Trainer

    data = work / f"data-{users}.jsonl"
    if not data.is_file():
        _write_data(data, users)
    run_dir = work / f"run-{users}"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        f"base.name_or_path={model_dir}", f"data.train_path={data}", "data.text_column=text", "data.max_length=32",
        "data.eval_examples_per_user=0", f"train.users_per_step={users_per_step}", "train.examples_per_user=1",
        f"train.micro_batch_size={users_per_step}", "train.epochs=1000", f"train.max_steps={2 * warmup + 3 * steps}",
        "train.full_checkpoint_every=8", "train.keep_checkpoints=4", "train.progress=false", "tracking.enabled=false",
        "eval.at_end=false", "adapter.method=flora", "adapter.rank=1", "adapter.target_modules=[q_proj,v_proj]",
        "store.tier=disk", f"run_dir={run_dir}",
    ]
    memory = {}
    started = time.perf_counter()
    session = prepare_session(load_recipe(None, overrides))
    # The store's initial rows are written at set-up (to the disk tier's files); flushing them here
    # keeps the kernel's writeback of set-up out of the timed steps.
    os.sync()
    setup_s = time.perf_counter() - started
    memory["setup"] = _status()
    try:
        loop = TrainLoop(session, Tracker(False, "", "", run_dir))
        total = 2 * warmup + 3 * steps
        plans = list(session.planner.steps(epochs=1000, max_steps=total))
        store = session.store
        # The reference: the same steps' shape on a store of the smallest population's first users.
        ref_users = session.train.users()[:reference_users]
        ref_cfg = session.cfg.copy()
        ref_cfg.store.disk_dir = str(work / f"reference-tier-{users}")
        shutil.rmtree(ref_cfg.store.disk_dir, ignore_errors=True)
        ref_store = make_store(ref_cfg, session.layout, session.device, {u: session.user_tokens[u] for u in ref_users})
        ref_planner = session.planner.restricted(ref_users)
        ref_plans = list(ref_planner.steps(epochs=1000, max_steps=total))
        ref = Trainer(session.model, session.slot, ref_store, session.step_examples, train_settings(session),
                      dict(Counter(u for plan in ref_plans for u in plan.user_ids)), session.pad_id, session.device)
        os.sync()

        def train(first: int, last: int) -> tuple[list[float], list[float]]:
            ours, theirs = [], []
            for i in range(first, last):
                for trainer, some, times in ((loop.trainer, plans, ours), (ref, ref_plans, theirs)):
                    t0 = time.perf_counter()
                    trainer.train_step(some[i], some[i + 1] if i + 1 < last else None)
                    times.append(time.perf_counter() - t0)
            return ours, theirs

        step_s, ref_s = (t[warmup:] for t in train(0, warmup + steps))
        memory["trained"] = _status()
        t0 = time.perf_counter()
        full = loop.checkpoint(warmup + steps)
        full_s, full_bytes = time.perf_counter() - t0, _bytes(full)
        # The kernel writes a full checkpoint's gigabytes back for many seconds after it returns;
        # on 2 cores that writeback would land in the next timed steps. Waited for, and reported.
        t0 = time.perf_counter()
        os.sync()
        full_sync_s = time.perf_counter() - t0
        more, ref_more = train(warmup + steps, warmup + 2 * steps)
        step_s, ref_s = step_s + more, ref_s + ref_more
        touched = len(store.local.changed_rows())
        t0 = time.perf_counter()
        delta = loop.checkpoint(warmup + 2 * steps)
        delta_s, delta_bytes = time.perf_counter() - t0, _bytes(delta)
        assert read_manifest(delta).get("chain"), "the second checkpoint must be a delta"
        memory["checkpointed"] = _status()

        cfg = session.cfg.copy()
        cfg.store.disk_dir = str(work / f"restore-tier-{users}")
        shutil.rmtree(cfg.store.disk_dir, ignore_errors=True)
        fresh = make_store(cfg, session.layout, session.device, session.user_tokens)
        t0 = time.perf_counter()
        load_checkpoint(delta, fresh, session.layout, session.user_tokens, verified=True)
        restore_s = time.perf_counter() - t0
        sample = sorted({u for p in plans[: warmup + 2 * steps] for u in p.user_ids})[:64]
        assert torch.equal(fresh.read(sample), store.read(sample)), "the restored store must hold the trained rows"
        memory["restored"] = _status()
        t0 = time.perf_counter()
        manifest = export_adapters(run_dir, "packed", None, work / f"export-{users}", checkpoint=delta, just_written=True)
        export_s = time.perf_counter() - t0
        memory["exported"] = _status()
        # The same side by side with one compute thread: on this machine's 2 cores the store's
        # prefetch thread (and the kernel's page work it causes) then has a core of its own, as it
        # has on a GPU node, where the step computes on the device.
        del fresh
        shutil.rmtree(cfg.store.disk_dir, ignore_errors=True)
        os.sync()  # the restored copy's gigabytes, written back before the next timed steps
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one_s, one_ref_s = (t[warmup:] for t in train(warmup + 2 * steps, total))
        finally:
            torch.set_num_threads(threads)
        return {
            "users": users, "row_floats": session.layout.row_size, "setup_s": setup_s,
            "step_ms": [1e3 * s for s in step_s], "step_ms_p50": 1e3 * statistics.median(step_s),
            "reference_users": len(ref_users), "reference_step_ms": [1e3 * s for s in ref_s],
            "reference_step_ms_p50": 1e3 * statistics.median(ref_s),
            "step_ratio": statistics.median(step_s) / statistics.median(ref_s), "compute_threads": threads,
            "one_thread_step_ms_p50": 1e3 * statistics.median(one_s),
            "one_thread_step_ratio": statistics.median(one_s) / statistics.median(one_ref_s),
            "full_checkpoint_s": full_s, "full_checkpoint_sync_s": full_sync_s, "full_checkpoint_bytes": full_bytes,
            "delta_checkpoint_s": delta_s, "delta_checkpoint_bytes": delta_bytes, "rows_touched": touched,
            "restore_s": restore_s, "export_s": export_s, "exported_users": manifest["num_users"],
            "peak_rss_mib": max(m["VmHWM"] for m in memory.values()),
            "memory": memory,
        }
    finally:
        session.close()
        shutil.rmtree(RunDir(run_dir).store_tier, ignore_errors=True)
        shutil.rmtree(work / f"restore-tier-{users}", ignore_errors=True)
        shutil.rmtree(work / f"reference-tier-{users}", ignore_errors=True)


def state_bytes_per_user(row_floats: int, segments: list[int], users: int = 1000) -> dict[str, dict[str, int]]:
    """Each optimizer's bytes per user, measured from a store's saved columns after one update."""
    import torch

    from flora_train.store import AdapterStore, OptimizerHyper

    out = {}
    for name, dtype in OPTIMIZERS:
        hyper = OptimizerHyper(name=name, state_dtype=dtype, segments=segments)
        store = AdapterStore(row_floats, lambda ids: torch.zeros(len(ids), row_floats), hyper)
        ids = [f"u{i}" for i in range(users)]
        store.add_users(ids)
        rows = store.row_ids(ids)
        store.update(rows, torch.ones(users, row_floats), torch.full((users,), 1e-3))
        tensors = store.state_tensors()
        state = sum(t.numel() * t.element_size() for k, t in tensors.items() if k != "rows") // users
        adapter = tensors["rows"].numel() * tensors["rows"].element_size() // users
        out[hyper.label()] = {"adapter": adapter, "state": state, "total": adapter + state}
    return out


def projected_bytes(name: str, shape: dict[str, int], targets: list[str]) -> dict[str, Any]:
    """FLoRA r1 on ``targets`` of a real base: per-user bytes of each optimizer (the formula the
    measured table checks), and a GPU's share of 10^8 users over 64 GPUs."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from flora_train.adapters import AdapterSpec, inject_adapters

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape))
    _, layout = inject_adapters(model, AdapterSpec("flora", 1, 1.0), targets)
    per_user = _formula_bytes(layout.row_size, layout.module_starts())
    return {"base": name, "targets": "all linear" if targets == ALL_LINEAR else ",".join(targets),
            "row_floats": layout.row_size, "per_user": per_user,
            "per_gpu_gib_1e8_users_64_gpus": {k: v * 10**8 / 64 / 2**30 for k, v in per_user.items()}}


def _child(spec: str) -> None:
    args = json.loads(spec)
    result = measure_population(args["users"], Path(args["work"]), Path(args["model_dir"]), args["users_per_step"],
                                args["steps"], args["warmup"], args["reference_users"])
    Path(args["result"]).write_text(json.dumps(result))


def bench_scale(populations: list[int], users_per_step: int = 64, steps: int = 16, warmup: int = 8,
                out: Path = Path("runs/bench")) -> dict[str, Any]:
    from flora_train.base import build_tiny_model

    work = out / "scale"
    work.mkdir(parents=True, exist_ok=True)
    texts = [" ".join(f"w{(i * 7 + j) % 300}" for j in range(6)) for i in range(2000)]
    model_dir = build_tiny_model(work / "base", BASE, texts)
    order = sorted(populations)
    runs = []
    for k, users in enumerate(order):
        result_path = work / f"result-{k}.json"
        spec = json.dumps({"users": users, "work": str(work), "model_dir": str(model_dir), "users_per_step": users_per_step,
                           "steps": steps, "warmup": warmup, "reference_users": order[0],
                           "result": str(result_path)})
        print(f"bench scale: {users:,} users ...", flush=True)
        proc = subprocess.Popen([sys.executable, "-c", f"from flora_train.bench.scale import _child; _child({spec!r})"])
        peak = _private_peak(proc)
        if proc.returncode:
            raise RuntimeError(f"bench scale: the run with {users:,} users failed (exit code {proc.returncode})")
        runs.append({**json.loads(result_path.read_text()), "peak_private_mib": peak})
    for r in runs:
        r["delta_to_full_bytes"] = r["delta_checkpoint_bytes"] / r["full_checkpoint_bytes"]
        r["touched_share"] = r["rows_touched"] / r["users"]
    row_floats = runs[0]["row_floats"]
    segments = _bench_segments(model_dir)
    measured = state_bytes_per_user(row_floats, segments)
    formula = _formula_bytes(row_floats, segments)
    if {k: v["total"] for k, v in measured.items()} != formula:
        raise AssertionError(f"per-user bytes measured {measured} differ from the formula the projection uses {formula}")
    projection = [projected_bytes(name, shape, targets) for name, shape in PROJECTED.items()
                  for targets in (["q_proj", "v_proj"], ALL_LINEAR)]
    result = {"suite": "scale", "machine": machine(), "base": BASE, "users_per_step": users_per_step, "steps": steps,
              "runs": runs, "state_bytes_per_user": measured, "projection": projection}
    write_json(out, "scale", result)
    _print(result, order[0])
    return result


def _formula_bytes(row_floats: int, segments: list[int]) -> dict[str, int]:
    from flora_train.store import OptimizerHyper

    hypers = [OptimizerHyper(name=o, state_dtype=d, segments=segments) for o, d in OPTIMIZERS]
    return {h.label(): 4 * row_floats + h.state_bytes(row_floats) for h in hypers}


def _bench_segments(model_dir: Path) -> list[int]:
    from flora_train.adapters import AdapterSpec, inject_adapters
    from flora_train.base import load_frozen_model

    _, layout = inject_adapters(load_frozen_model(str(model_dir), "float32"), AdapterSpec("flora", 1, 1.0), ["q_proj", "v_proj"])
    return layout.module_starts()


def _print(result: dict[str, Any], smallest: int) -> None:
    runs = result["runs"]
    print(f"\nbench scale: tiny Llama 64x2, FLoRA r1 on q/v ({runs[0]['row_floats']} floats a user), AdamW, disk tier, "
          f"{result['users_per_step']} users a step, {result['steps']} timed steps; {result['machine']}")
    print(f"step ms: this population's store, and a {smallest:,}-user store alternating with it in the same process")
    print(f"{'users':>10s} {'set-up':>7s} {'step ms':>8s} {'vs ' + format(smallest, ','):>9s} {'ratio':>6s} {'1 thread':>8s} {'private':>8s} "
          f"{'peak RSS':>9s} {'full ckpt':>16s} {'delta ckpt':>16s} {'delta/full':>10s} {'touched':>8s} {'restore':>8s} {'export':>8s}")
    for r in runs:
        print(f"{r['users']:>10,} {r['setup_s']:>5.1f} s {r['step_ms_p50']:>8.1f} {r['reference_step_ms_p50']:>9.1f} "
              f"{r['step_ratio']:>5.2f}x {r['one_thread_step_ratio']:>7.2f}x {r['peak_private_mib']:>4.0f} MiB {r['peak_rss_mib']:>5.0f} MiB "
              f"{r['full_checkpoint_s']:>5.1f} s {r['full_checkpoint_bytes'] / 2**20:>6.0f} MiB "
              f"{r['delta_checkpoint_s']:>5.2f} s {r['delta_checkpoint_bytes'] / 2**20:>6.1f} MiB "
              f"{r['delta_to_full_bytes']:>10.4f} {r['touched_share']:>8.4f} {r['restore_s']:>6.1f} s {r['export_s']:>6.1f} s")
    largest = max(runs, key=lambda r: r["users"])
    print(f"step time {largest['users']:,} / {smallest:,} users, side by side: {largest['step_ratio']:.3f}x with "
          f"{largest['compute_threads']} compute threads, {largest['one_thread_step_ratio']:.3f}x with 1 (a core left to "
          f"the store's prefetch thread; {largest['one_thread_step_ms_p50']:.1f} ms a step) (target <= 1.1)")
    print("\nper-user bytes, measured from the store's columns (adapter + optimizer state):")
    for name, b in result["state_bytes_per_user"].items():
        print(f"  {name:18s} {b['adapter']:>6,} + {b['state']:>6,} = {b['total']:>6,} B")
    print("\nprojection, FLoRA r1, 10^8 users on 64 GPUs: each GPU's shard of adapters + optimizer state")
    for p in result["projection"]:
        per = ", ".join(f"{k} {v / 1024:,.2f} TiB" for k, v in p["per_gpu_gib_1e8_users_64_gpus"].items())
        print(f"  {p['base']:13s} {p['targets']:14s} {p['row_floats']:>9,} floats a user: {per}")

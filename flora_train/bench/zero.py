"""`flora-train bench zero`: the same recipe with the base whole on every rank (stage 0) and
partitioned by ZeRO-3, side by side: step time, base bytes each rank holds, peak memory per rank.

Each stage runs as its own torchrun job (so one's peak memory cannot leak into the other's) of
``python -m flora_train.bench.zero --worker SPEC``; the parent builds the base once, starts both
jobs and prints their figures next to each other.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from flora_train.bench.common import machine, new_figure, reset_peak_rss, rss_mib, save_figure, write_json

# Big enough that the base dominates a rank's memory next to torch's own few hundred MiB on CPU.
DEFAULT_BASE = dict(architecture="llama", hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=8,
                    num_kv_heads=8, vocab_size=4000, max_position_embeddings=128, seed=0, pretrain_steps=0)


def _trim_heap() -> None:
    """Hands freed heap pages back to the OS (glibc keeps them), so RSS shows what is in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _worker(spec_path: Path) -> None:
    from flora_train import dist as fdist
    from flora_train.base.zero import resident_base_bytes
    from flora_train.config import load_recipe
    from flora_train.train.session import train_settings
    from flora_train.train.session import prepare_session
    from flora_train.train.trainer import Trainer

    spec = json.loads(spec_path.read_text())
    reset_peak_rss()
    session = prepare_session(load_recipe(None, spec["overrides"]))
    try:
        load_peak = rss_mib("VmHWM")
        _trim_heap()
        loaded = rss_mib("VmRSS")
        held, whole = resident_base_bytes(session.model)
        trainer = Trainer(session.model, session.slot, session.store, session.train, train_settings(session),
                          session.user_total_steps(), session.pad_id, session.device)
        plans = list(session.planner.steps(epochs=100, max_steps=spec["warmup"] + spec["steps"]))
        cuda = session.device.type == "cuda"
        for plan in plans[: spec["warmup"]]:
            trainer.train_step(plan)
        _trim_heap()
        reset_peak_rss()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(session.device)
        times = []
        for plan in plans[spec["warmup"]:]:
            fdist.barrier()
            start = time.perf_counter()
            trainer.train_step(plan)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out: dict[str, Any] = {
            "rank": fdist.rank(), "world": fdist.world_size(), "base_held_bytes": held, "base_bytes": whole,
            "step_ms": [t * 1000 for t in times], "load_peak_rss_mib": load_peak, "rss_after_load_mib": loaded, "train_peak_rss_mib": rss_mib("VmHWM"),
        }
        if cuda:
            out["train_peak_gpu_mib"] = torch.cuda.max_memory_allocated(session.device) / 2**20
        Path(spec["out"]).with_name(f"{Path(spec['out']).stem}-rank{fdist.rank()}.json").write_text(json.dumps(out))
    finally:
        session.close()


def _launch(world: int, spec: dict[str, Any], spec_path: Path) -> list[dict[str, Any]]:
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "-m", "flora_train.bench.zero", "--worker", str(spec_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench zero worker failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(spec_path.with_name(f"{Path(spec['out']).stem}-rank{r}.json").read_text()) for r in range(world)]


def bench_zero(world: int = 2, steps: int = 6, warmup: int = 2, users_per_step: int = 8, out: Path = Path("runs/bench"),
               base: dict[str, Any] | None = None, device: str = "auto", overrides: list[str] | None = None) -> dict[str, Any]:
    from flora_train.base import build_tiny_model
    from flora_train.data import SyntheticTask

    out.mkdir(parents=True, exist_ok=True)
    work = out / "zero"
    task = SyntheticTask(num_users=max(4 * users_per_step, world), train_examples_per_user=8, eval_examples_per_user=0)
    train_path, _ = task.write(work / "data")
    texts = task.texts()
    model_dir = build_tiny_model(work / "base", dict(base or DEFAULT_BASE), texts)
    common = [
        f"base.name_or_path={model_dir}", f"data.train_path={train_path}", "data.max_length=32",
        f"train.users_per_step={users_per_step}", "train.examples_per_user=4", f"train.micro_batch_size={users_per_step * 4}",
        f"train.device={device}", "train.progress=false", "tracking.enabled=false", "eval.at_end=false",
        *(overrides or []),
    ]
    runs = {}
    for stage in (0, 3):
        spec = {"overrides": [*common, f"run_dir={work / f'stage{stage}'}", f"base.zero_stage={stage}"],
                "steps": steps, "warmup": warmup, "out": str(work / f"stage{stage}.json")}
        runs[stage] = _launch(world, spec, work / f"stage{stage}-spec.json")

    def summary(ranks: list[dict[str, Any]]) -> dict[str, float]:
        s = {
            "step_ms_p50": statistics.median(statistics.median(r["step_ms"]) for r in ranks),
            "base_held_mib_per_rank": max(r["base_held_bytes"] for r in ranks) / 2**20,
            "load_peak_rss_mib_per_rank": max(r["load_peak_rss_mib"] for r in ranks),
            "rss_after_load_mib_per_rank": max(r["rss_after_load_mib"] for r in ranks),
            "train_peak_rss_mib_per_rank": max(r["train_peak_rss_mib"] for r in ranks),
        }
        if "train_peak_gpu_mib" in ranks[0]:
            s["train_peak_gpu_mib_per_rank"] = max(r["train_peak_gpu_mib"] for r in ranks)
        return s

    s0, s3 = summary(runs[0]), summary(runs[3])
    result = {
        "machine": machine(torch.device("cuda") if torch.cuda.is_available() else None),
        "world": world, "steps": steps, "users_per_step": users_per_step,
        "base_mib": runs[0][0]["base_bytes"] / 2**20, "stage0": s0, "stage3": s3,
        "ratio": {k: s3[k] / s0[k] for k in s0 if s0[k]},
    }
    write_json(out, "zero", result)
    keys = [k for k in ("step_ms_p50", "base_held_mib_per_rank", "train_peak_rss_mib_per_rank", "train_peak_gpu_mib_per_rank")
            if k in s0]
    fig, (ax,) = new_figure(1)
    ax.bar(keys, [result["ratio"][k] for k in keys], color="tab:blue")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("ZeRO-3 / stage 0, per rank")
    ax.tick_params(axis="x", labelsize=7)
    result["plot"] = str(save_figure(fig, out, "zero"))
    print(f"bench zero: {world} ranks, base {result['base_mib']:.1f} MiB, {steps} steps x {users_per_step} users "
          f"x 4 examples ({result['machine']})")
    print(f"{'per rank':28s} {'stage 0':>10s} {'ZeRO-3':>10s} {'ZeRO-3 / 0':>11s}")
    labels = {"step_ms_p50": "step time p50 (ms)", "base_held_mib_per_rank": "base held (MiB)",
              "load_peak_rss_mib_per_rank": "peak RSS while loading (MiB)",
              "rss_after_load_mib_per_rank": "RSS after loading (MiB)", "train_peak_rss_mib_per_rank": "peak RSS while training (MiB)",
              "train_peak_gpu_mib_per_rank": "peak GPU memory, training (MiB)"}
    for key, label in labels.items():
        if key in s0:
            print(f"{label:28s} {s0[key]:>10.1f} {s3[key]:>10.1f} {result['ratio'].get(key, float('nan')):>10.2f}x")
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        from flora_train import dist as fdist

        _worker(Path(sys.argv[2]))
        fdist.shutdown(clean=True)
    else:
        sys.exit("usage: python -m flora_train.bench.zero --worker SPEC (use `flora-train bench zero`)")

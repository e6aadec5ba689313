"""`flora-train doctor`: a self-check of this machine's accelerator path, in a few minutes.

On one GPU it runs, each in its own process (as users run them): a short training run of every
method (FLoRA r1 and r4, LoRA r8, IA3) under bf16 autocast, a ZeRO-3 run with the base offloaded to
the host on one rank (its root hooks must run every forward), LoRA on the device tier, the process
group a multi-GPU job makes (``cpu:gloo,cuda:nccl``, one rank) with every collective the trainer
uses, that a float16 recipe is refused naming bf16, and then the benchmark tables (layer, train
with bytes host<->device per tier, loss, lengths, serve) on the device. Host-tier runs must move
equal bytes up (rows) and down (gradients): the moments stay on the host. Each check must finish with finite held-out figures; the summary and ``doctor.json`` hold
what it measured (eval loss and accuracy, steps, seconds, and the bench tables). ``--jobs N`` runs
N checks at once (their seconds then share the machine). ``--device cpu`` runs the same checks on the CPU (the test
suite does, at small sizes) so the script itself is known to work before it meets a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from flora_train.run_dir import RunDir

# The quickstart recipe of this checkout, wherever doctor is started from.
RUN = [str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"), "data.synthetic.num_users=64", "data.synthetic.train_examples_per_user=8",
       "data.synthetic.eval_examples_per_user=2", "train.epochs=4", "train.users_per_step=32",
       "train.examples_per_user=4", "train.micro_batch_size=128", "train.progress=false",
       "train.compare_shared_baseline=false", "tracking.enabled=false", "export.format=none"]
CHECKS: dict[str, list[str]] = {
    "flora r1, bf16": ["adapter.method=flora", "train.precision=bf16"],
    "flora r4, bf16": ["adapter.method=flora", "adapter.rank=4", "train.precision=bf16"],
    "lora r8, bf16": ["adapter.method=lora", "adapter.rank=8", "store.optimizer.lr=0.005", "train.precision=bf16"],
    "ia3, bf16": ["adapter.method=ia3", "train.precision=bf16"],
    "zero-3 + offload, 1 rank": ["base.zero_stage=3", "base.offload_params=cpu", "train.precision=bf16"],
    "lora r8, device tier": ["adapter.method=lora", "adapter.rank=8", "store.optimizer.lr=0.005", "train.precision=bf16",
                             "store.tier=device"],
}


def _expectations(name: str, result: dict[str, Any]) -> str | None:
    """What a check's run must show beyond finite figures (None: it does)."""
    store = result.get("store", {})
    up, down = store.get("store/bytes_h2d", 0.0), store.get("store/bytes_d2h", 0.0)
    if "device tier" in name:
        if up or down:
            return f"the device tier moved {up:.0f} bytes up and {down:.0f} down; it should move none"
    elif not (up > 0 and down == up):  # host tier: rows up, their gradients down, the moments never
        return f"the host tier moved {up:.0f} bytes up and {down:.0f} down; rows up and gradients down should be equal"
    if "zero-3" in name:
        hooks = result.get("base", {}).get("zero_hooks", {})
        if not (hooks.get("forward_starts", 0) >= result["steps"] and hooks.get("trace_complete")):
            return f"ZeRO-3's start-of-forward hook did not run every step: {hooks}"
    return None
COLLECTIVES = """
import torch, torch.distributed as dist
from flora_train import dist as fdist
from flora_train.store.comm import RowExchange
device = torch.device(__import__("sys").argv[1])
dist.init_process_group(fdist.backend_for(device.type), store=dist.HashStore(), rank=0, world_size=1)
fdist.check_collectives_if_asked()
fdist.all_reduce(torch.ones(3)); fdist.all_reduce(torch.ones(3, device=device), "max")
fdist.all_gather_objects({"ok": 1}); fdist.broadcast_object("x")
ex = RowExchange(fdist.new_group(), 8, device)
route = ex.route(torch.zeros(2, dtype=torch.int64), torch.tensor([0, 1]))
rows = ex.send_rows(route, lambda r: torch.ones(len(r), 8, device=device)).wait()
assert rows.device.type == ex.wire_device.type and float(rows.sum()) == 16.0
ex.send_grads(route, torch.ones(2, 8, device=device))
dist.destroy_process_group()
print("collectives ok on", fdist.backend_for(device.type))
"""


def _run(name: str, extra: list[str], device: str, out: Path, small: bool) -> dict[str, Any]:
    run_dir = out / name.replace(" ", "_").replace(",", "").replace("+", "plus")
    size = ["base.tiny.hidden_size=32", "base.tiny.intermediate_size=64", "base.tiny.pretrain_steps=20",
            "data.synthetic.num_users=16", "train.epochs=2"] if small else []
    cmd = [sys.executable, "-m", "flora_train.cli", "run", *RUN, *size, *extra, f"train.device={device}",
           f"run_dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"ok": False, "seconds": seconds, "error": (proc.stderr or proc.stdout)[-1500:]}
    result = json.loads(RunDir(run_dir).result.read_text())
    loss = result.get("eval", {}).get("eval/loss_mean", float("nan"))
    problem = None if loss == loss and result["steps"] > 0 else f"eval loss {loss} after {result['steps']} steps"
    problem = problem or _expectations(name, result)
    store = result.get("store", {})
    return {"ok": problem is None, "seconds": seconds, "steps": result["steps"], "eval_loss": loss,
            "eval_accuracy": result.get("eval", {}).get("eval/accuracy_mean"), "train_seconds": result["train_seconds"],
            "bytes_h2d_per_step": store.get("store/bytes_h2d", 0.0) / result["steps"],
            "bytes_d2h_per_step": store.get("store/bytes_d2h", 0.0) / result["steps"],
            "zero_hooks": result.get("base", {}).get("zero_hooks"), **({"error": problem} if problem else {})}


def _float16_refused() -> dict[str, Any]:
    """float16 has no loss scaling here: a recipe asking for it must stop at validation, naming bf16."""
    proc = subprocess.run([sys.executable, "-m", "flora_train.cli", "validate", *RUN[:1], "base.dtype=float16"],
                          capture_output=True, text=True)
    ok = proc.returncode == 2 and "bfloat16" in proc.stderr and "Traceback" not in proc.stderr
    return {"ok": ok, "detail": proc.stderr.strip()[-500:], **({} if ok else {"error": proc.stderr[-1500:] or proc.stdout[-1500:]})}


def doctor(device: str = "auto", out: Path = Path("runs/doctor"), small: bool = False, bench: bool = True,
           jobs: int = 1) -> int:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": str(dev), "torch": torch.__version__, "checks": {}}
    if dev.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(dev)
        report["bf16"] = torch.cuda.is_bf16_supported()
    print(f"flora-train doctor on {report.get('gpu', 'cpu')} (torch {torch.__version__})", flush=True)
    env = {**os.environ, "FLORA_TRAIN_CHECK_COLLECTIVES": "cuda"}
    proc = subprocess.run([sys.executable, "-c", COLLECTIVES, str(dev)], capture_output=True, text=True, env=env)
    report["checks"]["collectives"] = {"ok": proc.returncode == 0, "detail": (proc.stdout or proc.stderr).strip()[-1500:]}
    print(f"  {'collectives':28s} {'ok' if proc.returncode == 0 else 'FAILED'}", flush=True)
    fp16 = _float16_refused()
    report["checks"]["float16 refused"] = fp16
    print(f"  {'float16 refused':28s} {'ok' if fp16['ok'] else 'FAILED'}", flush=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # each check is its own process; threads only wait
        results = pool.map(lambda item: _run(item[0], item[1], str(dev), out, small), CHECKS.items())
        for name, r in zip(CHECKS, results):
            report["checks"][name] = r
            detail = (f"eval loss {r['eval_loss']:.4f}, {r['steps']} steps in {r['train_seconds']:.1f}s, "
                      f"{r['bytes_h2d_per_step'] / 2**20:.2f}/{r['bytes_d2h_per_step'] / 2**20:.2f} MiB up/down a step"
                      if r["ok"] else r["error"])
            print(f"  {name:28s} {'ok' if r['ok'] else 'FAILED'}  {detail}", flush=True)
    if bench:
        from flora_train.bench.layer import bench_layer
        from flora_train.bench.lengths import bench_lengths
        from flora_train.bench.loss import bench_loss
        from flora_train.bench.serve import bench_serve
        from flora_train.bench.train import bench_train

        widths = (256,) if small else (1024, 4096)
        report["bench"] = {
            "layer": bench_layer(widths, (1, 4, 16), (1, 64), device=str(dev), out=out / "bench", peft=not small),
            "train": bench_train(steps=3, device=str(dev), out=out / "bench"),
            "loss": bench_loss(str(dev), out / "bench"),
            "lengths": bench_lengths(out / "bench", users=16 if small else 32, tiny=small, repeats=1, timed_epochs=1,
                                 device=str(dev)),
            "serve": bench_serve(16, 32, 32.0, 32, str(dev), out / "bench", population=0),
        }
    failed = [k for k, v in report["checks"].items() if not v["ok"]]
    report["failed"] = failed
    (out / "doctor.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"doctor: {len(report['checks']) - len(failed)} of {len(report['checks'])} checks passed; report {out / 'doctor.json'}")
    return 1 if failed else 0

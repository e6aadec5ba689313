"""`flora-train bench e2e`: train N users' adapters with flora_train, and the way it is done today.

Today: one PEFT LoRA job per user over the same base (``flora_train.bench.peft_job``): a process
that starts Python, imports the libraries, tokenises that user's examples, loads the base, wraps it
with ``get_peft_model``, trains with AdamW and saves the adapter. The bench runs such jobs one after
another for a sample of the users and extrapolates their mean wall time to all N users: the report
says so. The same jobs also run back to back inside this one warm process (no start-up, no
imports, tokenised once): a lower bound on a per-user job, reported as a second speed-up.

flora_train trains all N users in one job (``flora-train run`` on the same data, same LoRA rank,
alpha, learning rate, examples per step and epochs; the base loaded once, PEFT export at the end).
Both are timed from start to saved adapters. Quality is each user's held-out loss (completion
tokens, the same examples and the same loss for both), reported side by side on the sampled users;
the per-process jobs' loss is read back from the adapters they saved.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from flora_train.bench.common import bench_device, machine, new_figure, quiet_peft, save_figure, write_json
from flora_train.bench.peft_job import TARGETS, tokenised, train_adapter
from flora_train.run_dir import RunDir

DEFAULT_BASE = dict(architecture="llama", hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4,
                    num_kv_heads=4, vocab_size=512, max_position_embeddings=128, seed=0, pretrain_steps=300)


def _by_user(examples: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for ex in examples:
        out.setdefault(ex["user_id"], []).append(ex)
    return out


def _user_loss(model: torch.nn.Module, examples: list[dict[str, Any]], pad_id: int, device: torch.device) -> float:
    """Held-out loss of one user: summed completion-token cross-entropy over its target tokens."""
    from flora_train.data.tokenize import collate
    from flora_train.train.loss import target_tokens, token_losses

    batch = {k: v.to(device) for k, v in collate(examples, pad_id).items()}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(token_losses(logits, batch["labels"]).sum() / target_tokens(batch["labels"]).sum())


def _job_process(job: dict[str, Any], folder: Path) -> float:
    """Wall seconds of one per-user PEFT job run as its own process."""
    spec = folder / "job.json"
    spec.write_text(json.dumps(job))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flora_train.bench.peft_job", str(spec)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"PEFT job {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def _saved_adapter_loss(model_dir: Path, folder: Path, examples: list[dict[str, Any]], pad_id: int,
                        device: torch.device) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    with quiet_peft():
        model = PeftModel.from_pretrained(base, folder).eval()
    return _user_loss(model, examples, pad_id, device)


def _flora_run(recipe: list[str], run_dir: Path) -> tuple[float, dict[str, float]]:
    """Wall seconds of `flora-train run` (base load to exported adapters), then the per-user eval."""
    from flora_train.config import load_recipe
    from flora_train.train.run import run_training
    from flora_train.train.scoring import run_eval

    start = time.perf_counter()
    run_training(load_recipe(None, [*recipe, f"run_dir={run_dir}"]))
    seconds = time.perf_counter() - start
    run_eval(run_dir)
    (per_user_file,) = RunDir(run_dir).per_user_evals()[-1:]
    losses = {}
    for line in per_user_file.read_text().splitlines():
        row = json.loads(line)
        losses[row["user_id"]] = row["loss"]
    return seconds, losses


def bench_e2e(users: int = 1000, examples: int = 8, sample: int = 20, process_sample: int = 5, rank: int = 8, lr: float = 3e-3,
              flora_lr: float = 0.05, examples_per_step: int = 4, users_per_step: int = 250, epochs: int = 1,
              base: dict[str, Any] | None = None, device: str = "auto", out: Path = Path("runs/bench")) -> dict[str, Any]:
    from flora_train.base import build_tiny_model, load_tokenizer
    from flora_train.data import SyntheticTask
    from flora_train.export import safe_folder_name

    dev = bench_device(device)
    work = out / "e2e"
    task = SyntheticTask(num_users=users, train_examples_per_user=examples, eval_examples_per_user=4)
    train_path, eval_path = task.write(work / "data")
    texts = task.texts()
    base_cfg = dict(base or DEFAULT_BASE)
    model_dir = build_tiny_model(work / "base", base_cfg, texts)
    max_length = 32
    common = [
        f"base.name_or_path={model_dir}", f"data.train_path={train_path}", f"data.eval_path={eval_path}",
        f"data.max_length={max_length}", f"train.epochs={epochs}", f"train.users_per_step={users_per_step}",
        f"train.examples_per_user={examples_per_step}", f"train.micro_batch_size={users_per_step * examples_per_step}",
        f"train.device={dev.type}", f"train.precision={'bf16' if dev.type == 'cuda' else 'fp32'}", "train.progress=false", "tracking.enabled=false",
        "eval.at_end=false", f"adapter.target_modules=[{','.join(TARGETS)}]",
    ]
    ours = {}
    for method, r, method_lr, export in (("lora", rank, lr, "peft"), ("flora", 1, flora_lr, "flora")):
        seconds, losses = _flora_run([*common, f"adapter.method={method}", f"adapter.rank={r}",
                                      f"adapter.alpha={2 * r}", f"store.optimizer.lr={method_lr}",
                                      f"export.format={export}"], work / f"flora_train-{method}")
        ours[method] = {"rank": r, "lr": method_lr, "seconds": seconds, "losses": losses}

    # The baseline on a sample of users: each user's own examples in its own file, one job per user.
    rows_by_user: dict[str, list[str]] = {}
    for line in train_path.read_text().splitlines():
        rows_by_user.setdefault(json.loads(line)["user_id"], []).append(line)
    picked = sorted(random.Random(0).sample(sorted(rows_by_user), min(sample, len(rows_by_user))))
    tokenizer = load_tokenizer(str(model_dir))
    pad_id = int(tokenizer.pad_token_id)
    train_by_user = _by_user(tokenised(train_path, tokenizer, max_length))
    eval_by_user = _by_user(tokenised(eval_path, tokenizer, max_length))
    # Timing needs few jobs (they vary little), quality many users: the first `process_sample` of
    # the sampled users also run as separate processes, whose adapters must match the warm ones.
    process_seconds, process_losses = [], {}
    for i, user in enumerate(picked[:process_sample]):
        folder = work / "peft" / safe_folder_name(user)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "data.jsonl").write_text("\n".join(rows_by_user[user]) + "\n")
        job = {"model_dir": str(model_dir), "data": str(folder / "data.jsonl"), "max_length": max_length, "rank": rank,
               "alpha": 2 * rank, "lr": lr, "batch_size": examples_per_step, "epochs": epochs,
               "out": str(folder / "adapter"), "device": dev.type, "seed": i}
        process_seconds.append(_job_process(job, folder))
        process_losses[user] = _saved_adapter_loss(model_dir, folder / "adapter", eval_by_user[user], pad_id, dev)
    in_process_seconds, in_process_losses, base_losses = [], {}, {}
    for i, user in enumerate(picked):
        seconds, model = train_adapter(model_dir, train_by_user[user], rank, 2 * rank, lr, examples_per_step, epochs,
                                       pad_id, work / "peft-in-process" / safe_folder_name(user), dev, seed=i)
        in_process_seconds.append(seconds)
        in_process_losses[user] = _user_loss(model, eval_by_user[user], pad_id, dev)
        with model.disable_adapter():
            base_losses[user] = _user_loss(model, eval_by_user[user], pad_id, dev)
    per_job, per_job_warm = statistics.mean(process_seconds), statistics.mean(in_process_seconds)
    extrapolated, extrapolated_warm = per_job * users, per_job_warm * users

    def mean_over(losses: dict[str, float]) -> float:
        return statistics.mean(losses[u] for u in picked)

    result = {
        "suite": "e2e", "machine": machine(dev), "device": dev.type, "users": users, "examples_per_user": examples,
        "epochs": epochs, "base": base_cfg, "sampled_users": picked,
        "peft": {"rank": rank, "lr": lr, "process_seconds": process_seconds, "mean_process_seconds": per_job,
                 "extrapolated_seconds": extrapolated, "in_process_seconds": in_process_seconds,
                 "mean_in_process_seconds": per_job_warm, "extrapolated_in_process_seconds": extrapolated_warm,
                 "process_users": list(process_losses), "loss_process_jobs": process_losses,
                 "loss_in_process_jobs": in_process_losses, "loss_mean_sampled": mean_over(in_process_losses)},
        "base_loss_mean_sampled": mean_over(base_losses),
        "flora_train": {m: {"rank": o["rank"], "lr": o["lr"], "seconds": o["seconds"],
                            "speedup": extrapolated / o["seconds"], "speedup_in_process": extrapolated_warm / o["seconds"],
                            "loss_mean_sampled": mean_over(o["losses"]),
                            "loss_mean_all": statistics.mean(o["losses"].values())} for m, o in ours.items()},
    }
    write_json(out, "e2e", result)
    fig, (ax,) = new_figure(1)
    names = ["PEFT, one job per user\n(extrapolated)", f"flora_train LoRA r{rank}", "flora_train FLoRA r1"]
    secs = [extrapolated, ours["lora"]["seconds"], ours["flora"]["seconds"]]
    ax.bar(names, secs, color=["gray", "tab:orange", "tab:blue"])
    ax.set_yscale("log")
    ax.set_ylabel(f"seconds to train {users} users")
    result["plot"] = str(save_figure(fig, out, "e2e"))
    f = result["flora_train"]
    print(f"bench e2e: {users} users x {examples} examples, {epochs} epoch(s), {examples_per_step} examples per user "
          f"per step; Llama {base_cfg['hidden_size']}x{base_cfg['num_layers']} layers on {dev.type}; {result['machine']}")
    print(f"PEFT: {len(process_seconds)} sampled users, one job each run as its own process: {per_job:.2f} s/user mean; "
          f"x {users} users = {extrapolated:.0f} s (extrapolated)")
    print(f"{len(picked)} sampled users' jobs back to back in one warm process (no start-up, imports or tokenising): "
          f"{per_job_warm:.3f} s/user, {extrapolated_warm:.0f} s for {users} users (extrapolated); "
          f"held-out losses below are these users'")
    print(f"{'':26s} {'seconds':>9s} {'speed-up':>9s} {'vs warm jobs':>13s} {'held-out loss (sampled users)':>30s}")
    print(f"{'base, no adapter':26s} {'':>9s} {'':>9s} {'':>13s} {result['base_loss_mean_sampled']:>30.4f}")
    print(f"{'PEFT LoRA r%d, job per user' % rank:26s} {extrapolated:>9.1f} {1.0:>8.1f}x {'':>13s} "
          f"{result['peft']['loss_mean_sampled']:>30.4f}")
    for m, label in (("lora", f"flora_train LoRA r{rank}"), ("flora", "flora_train FLoRA r1")):
        print(f"{label:26s} {f[m]['seconds']:>9.1f} {f[m]['speedup']:>8.1f}x {f[m]['speedup_in_process']:>12.1f}x "
              f"{f[m]['loss_mean_sampled']:>30.4f}")
    return result

"""`flora-train bench e2e`: train N users' adapters with flora_train, and the way it is done today.

Today: one PEFT LoRA job per user over the same base: load the base, wrap it with ``get_peft_model``,
train on that user's examples with AdamW, save the adapter. Those jobs run one after another in
this process on a sample of the users, and their mean time is extrapolated to all N users: the
report says so. A real per-user job is also its own process; the start-up of an interpreter that
imports torch, transformers and peft is measured separately and reported as a second figure.

flora_train trains all N users in one job (``flora-train run`` on the same data, same LoRA rank,
alpha, learning rate, examples per step and epochs; the base loaded once, PEFT export at the end).
Both are timed from start to saved adapters. Quality is each user's held-out loss (completion
tokens, the same examples and the same loss for both), reported side by side on the sampled users.
"""

from __future__ import annotations

import contextlib
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from flora_train.bench.common import bench_device, machine, new_figure, save_figure, write_json

DEFAULT_BASE = dict(architecture="llama", hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4,
                    num_kv_heads=4, vocab_size=512, max_position_embeddings=128, seed=0, pretrain_steps=300)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _by_user(examples: dict[str, list]) -> dict[str, list[dict[str, list[int]]]]:
    out: dict[str, list[dict[str, list[int]]]] = {}
    for u, ids, labels in zip(examples["user_id"], examples["input_ids"], examples["labels"]):
        out.setdefault(u, []).append({"input_ids": ids, "labels": labels})
    return out


def _user_loss(model: torch.nn.Module, examples: list[dict[str, list[int]]], pad_id: int, device: torch.device) -> float:
    """Held-out loss of one user: summed completion-token cross-entropy over its target tokens."""
    from flora_train.data.tokenize import collate
    from flora_train.train.loss import target_tokens, token_losses

    batch = {k: v.to(device) for k, v in collate(examples, pad_id).items()}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(token_losses(logits, batch["labels"]).sum() / target_tokens(batch["labels"]).sum())


def peft_job(model_dir: Path, train: list[dict[str, list[int]]], rank: int, alpha: float, lr: float, batch_size: int,
             epochs: int, pad_id: int, out: Path, device: torch.device, seed: int) -> tuple[float, torch.nn.Module]:
    """One user's job as users write it today; returns (seconds from base load to saved adapter, model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from flora_train.data.tokenize import collate
    from flora_train.train.loss import target_tokens, token_losses

    start = time.perf_counter()
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = list(range(len(train)))
    rng = random.Random(seed)
    # bf16 autocast on a GPU, as flora_train's train.precision=bf16 there; float32 on CPU.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    for _ in range(epochs):
        rng.shuffle(order)
        for s in range(0, len(order), batch_size):
            batch = {k: v.to(device) for k, v in collate([train[i] for i in order[s : s + batch_size]], pad_id).items()}
            with autocast:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = token_losses(logits, batch["labels"]).sum() / target_tokens(batch["labels"]).sum()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    model.save_pretrained(out)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, model.eval()


def _process_startup_seconds(repeats: int = 3) -> float:
    """Median time for a fresh interpreter to import what a PEFT training script imports."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, transformers, peft"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _flora_run(recipe: list[str], run_dir: Path) -> tuple[float, dict[str, float]]:
    """Wall seconds of `flora-train run` (base load to exported adapters), then the per-user eval."""
    from flora_train.config import load_recipe
    from flora_train.train.run import run_eval, run_training

    start = time.perf_counter()
    run_training(load_recipe(None, [*recipe, f"run_dir={run_dir}"]))
    seconds = time.perf_counter() - start
    run_eval(run_dir)
    (per_user_file,) = sorted((run_dir / "eval").glob("per_user-step*.jsonl"))[-1:]
    losses = {}
    for line in per_user_file.read_text().splitlines():
        row = json.loads(line)
        losses[row["user_id"]] = row["loss"]
    return seconds, losses


def bench_e2e(users: int = 1000, examples: int = 8, sample: int = 20, rank: int = 8, lr: float = 3e-3,
              flora_lr: float = 0.05, examples_per_step: int = 4, users_per_step: int = 250, epochs: int = 1,
              base: dict[str, Any] | None = None, device: str = "auto", out: Path = Path("runs/bench")) -> dict[str, Any]:
    from flora_train.base import build_tiny_model, load_tokenizer
    from flora_train.data import BadRows, Columns, SyntheticTask, load_examples, tokenize_examples
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

    # The baseline: the same tokenised examples, one PEFT job per sampled user.
    tokenizer = load_tokenizer(str(model_dir))
    pad_id = int(tokenizer.pad_token_id)
    tok = {name: tokenize_examples(load_examples(p, "auto", Columns(), BadRows()), tokenizer, max_length, True, BadRows())
           for name, p in (("train", train_path), ("eval", eval_path))}
    train_by_user = _by_user(tok["train"].to_dict())
    eval_by_user = _by_user(tok["eval"].to_dict())
    picked = sorted(random.Random(0).sample(sorted(train_by_user), min(sample, len(train_by_user))))
    job_seconds, peft_losses, base_losses = [], {}, {}
    for i, user in enumerate(picked):
        seconds, model = peft_job(model_dir, train_by_user[user], rank, 2 * rank, lr, examples_per_step, epochs, pad_id,
                                  work / "peft" / safe_folder_name(user), dev, seed=i)
        job_seconds.append(seconds)
        peft_losses[user] = _user_loss(model, eval_by_user[user], pad_id, dev)
        with model.disable_adapter():
            base_losses[user] = _user_loss(model, eval_by_user[user], pad_id, dev)
    per_job = statistics.mean(job_seconds)
    extrapolated = per_job * users
    startup = _process_startup_seconds()
    with_startup = (per_job + startup) * users

    def mean_over(losses: dict[str, float]) -> float:
        return statistics.mean(losses[u] for u in picked)

    result = {
        "suite": "e2e", "machine": machine(dev), "device": dev.type, "users": users, "examples_per_user": examples,
        "epochs": epochs, "base": base_cfg, "sampled_users": picked,
        "peft": {"rank": rank, "lr": lr, "job_seconds": job_seconds, "mean_job_seconds": per_job,
                 "extrapolated_seconds": extrapolated, "process_startup_seconds": startup,
                 "extrapolated_with_startup_seconds": with_startup, "loss_mean_sampled": mean_over(peft_losses)},
        "base_loss_mean_sampled": mean_over(base_losses),
        "flora_train": {m: {"rank": o["rank"], "lr": o["lr"], "seconds": o["seconds"],
                            "speedup": extrapolated / o["seconds"], "speedup_with_startup": with_startup / o["seconds"],
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
    print(f"PEFT: {len(picked)} sampled users, one job each, {per_job:.2f} s/user mean; x {users} users = "
          f"{extrapolated:.0f} s (extrapolated; process start-up not counted)")
    print(f"a PEFT job in its own process also starts Python and imports torch, transformers and peft: "
          f"{startup:.2f} s measured, {with_startup:.0f} s for {users} jobs")
    print(f"{'':26s} {'seconds':>9s} {'speed-up':>9s} {'with start-up':>14s} {'held-out loss (sampled users)':>30s}")
    print(f"{'base, no adapter':26s} {'':>9s} {'':>9s} {'':>14s} {result['base_loss_mean_sampled']:>30.4f}")
    print(f"{'PEFT LoRA r%d per user' % rank:26s} {extrapolated:>9.1f} {1.0:>8.1f}x {with_startup / extrapolated:>13.1f}x "
          f"{result['peft']['loss_mean_sampled']:>30.4f}")
    for m, label in (("lora", f"flora_train LoRA r{rank}"), ("flora", "flora_train FLoRA r1")):
        print(f"{label:26s} {f[m]['seconds']:>9.1f} {f[m]['speedup']:>8.1f}x {f[m]['speedup_with_startup']:>13.1f}x "
              f"{f[m]['loss_mean_sampled']:>30.4f}")
    return result

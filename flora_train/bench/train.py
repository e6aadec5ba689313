"""`flora-train bench train`: a full training step with a distinct user per example, over the limit.

The limit is the same step on the same batch with the base frozen and no adapters at all: forward,
the language-model loss, and backward into the activations (what any adapter needs at least).
The flora_train step is the real one: fetch the users' rows from the store, forward and backward
with every example under its own adapter, reduce, and the row-wise optimizer update. Steps of the
two kinds alternate, so drift in the machine's speed hits both alike. Then, for each tier the
rows can live on, the bytes a step moves between the host and the compute device.
"""

from __future__ import annotations

import contextlib
import json
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flora_train.bench.common import bench_device, bench_precision, machine, new_figure, save_figure, write_json

DEFAULT_BASE = dict(architecture="llama", hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8,
                    num_kv_heads=8, vocab_size=2048, max_position_embeddings=256, seed=0, pretrain_steps=0)
# (method, rank, target on CPU float32): the targets for a step over the limit.
CONFIGS: tuple[tuple[str, int, float], ...] = (("flora", 1, 1.15), ("lora", 8, 1.25))


def _write_data(path: Path, users: int, examples: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(600)]
    rows, texts = [], []
    for u in range(users):
        for _ in range(examples):
            text = " ".join(rng.choice(vocab) for _ in range(words))
            rows.append(json.dumps({"user_id": f"user-{u:05d}", "text": text}))
            texts.append(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return texts


def _limit_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """Forward, LM loss and backward into the activations of the frozen base, with no adapter."""
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    loss.backward()


def _measure(method: str, rank: int, common: list[str], run_dir: Path, steps: int, warmup: int) -> dict[str, Any]:
    from flora_train.config import load_recipe
    from flora_train.data.tokenize import collate
    from flora_train.train.session import train_settings
    from flora_train.train.session import prepare_session
    from flora_train.train.trainer import Trainer

    session = prepare_session(load_recipe(None, [*common, f"run_dir={run_dir}", f"adapter.method={method}",
                                                 f"adapter.rank={rank}"]))
    try:
        trainer = Trainer(session.model, session.slot, session.store, session.train, train_settings(session),
                          session.user_total_steps(), session.pad_id, session.device)
        plans = list(session.planner.steps(epochs=1000, max_steps=warmup + steps))
        sync = torch.cuda.synchronize if session.device.type == "cuda" else (lambda: None)
        dtype = session.autocast_dtype
        autocast = (torch.autocast(session.device.type, dtype=dtype) if dtype is not None
                    else contextlib.nullcontext())
        ours, limit = [], []
        for i, plan in enumerate(plans):
            ids = [e for _, ex in plan.groups for e in ex]
            examples = [{"input_ids": session.train.input_ids(e), "labels": session.train.labels(e)} for e in ids]
            batch = {k: v.to(session.device) for k, v in collate(examples, session.pad_id).items()}
            sync()
            start = time.perf_counter()
            with autocast, session.slot.base_only():
                _limit_step(session.model, batch)
            sync()
            middle = time.perf_counter()
            trainer.train_step(plan)
            sync()
            if i >= warmup:
                limit.append(middle - start)
                ours.append(time.perf_counter() - middle)
        return {"method": method, "rank": rank, "users_per_step": len(plans[0].groups), "examples": len(ids), "tokens": int(batch["attention_mask"].sum()),
                "ours_ms": [t * 1e3 for t in ours], "limit_ms": [t * 1e3 for t in limit],
                "ours_ms_p50": 1e3 * statistics.median(ours), "limit_ms_p50": 1e3 * statistics.median(limit),
                "ratio": statistics.median(ours) / statistics.median(limit), "row_floats": session.layout.row_size}
    finally:
        session.close()


# Where the rows and their optimizer state live (store.tier, store.cache_rows): the bytes each
# moves between the host and the compute device per step (counted the same on any device).
TIERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("host", ("store.tier=host",)), ("device", ("store.tier=device",)), ("disk", ("store.tier=disk",)),
    ("host + cache", ("store.tier=host", "store.cache_rows=4096")))


def _bytes_per_step(method: str, rank: int, common: list[str], run_dir: Path, tier: Sequence[str], steps: int) -> dict[str, Any]:
    """One tier's bytes host->device and device->host per step over ``steps`` training steps (after one
    to warm a cache), through the store's own counters (``store/bytes_h2d``, ``store/bytes_d2h``)."""
    from flora_train.config import load_recipe
    from flora_train.train.session import prepare_session, train_settings
    from flora_train.train.trainer import Trainer

    session = prepare_session(load_recipe(None, [*common, f"run_dir={run_dir}", f"adapter.method={method}",
                                                 f"adapter.rank={rank}", *tier]))
    try:
        trainer = Trainer(session.model, session.slot, session.store, session.train, train_settings(session),
                          session.user_total_steps(), session.pad_id, session.device)
        plans = list(session.planner.steps(epochs=1000, max_steps=1 + steps))
        trainer.train_step(plans[0])
        before = session.store.transfers()
        for plan in plans[1:]:
            trainer.train_step(plan)
        after = session.store.transfers()
        return {k: (after[k] - before[k]) / steps for k in after}
    finally:
        session.close()


def bench_train(users: int = 64, tokens: int = 64, steps: int = 5, warmup: int = 2,
                configs: Sequence[tuple[str, int, float]] = CONFIGS, base: dict[str, Any] | None = None,
                device: str = "auto", out: Path = Path("runs/bench"), overrides: Sequence[str] = ()) -> dict[str, Any]:
    from flora_train.base import build_tiny_model

    dev = bench_device(device)
    work = out / "train"
    # A word like "w123" is about two tokens with the locally trained tokenizer; the printed table
    # gives the tokens per example actually measured (data.max_length leaves room for the spread).
    texts = _write_data(work / "data.jsonl", users, 2, max(2, (tokens - 1) // 2))
    base_cfg = dict(base or DEFAULT_BASE)
    model_dir = build_tiny_model(work / "base", base_cfg, texts)
    precision = bench_precision(dev)
    common = [
        f"base.name_or_path={model_dir}", f"data.train_path={work / 'data.jsonl'}", "data.text_column=text",
        f"data.max_length={2 * tokens}", "data.eval_examples_per_user=0", f"train.users_per_step={users}",
        "train.examples_per_user=1", f"train.micro_batch_size={users}", f"train.device={dev.type}",
        f"train.precision={precision}", "train.progress=false", "tracking.enabled=false", "eval.at_end=false",
        "adapter.target_modules=all-linear", *overrides,
    ]
    runs = []
    for method, rank, target in configs:
        run = _measure(method, rank, common, work / f"{method}-r{rank}", steps, warmup)
        run["target"] = target
        run["bytes_per_step"] = {name: _bytes_per_step(method, rank, common, work / f"{method}-r{rank}-{name.replace(' + ', '-')}",
                                                       tier, 2) for name, tier in TIERS}
        # Before the host tier's optimizer moved to the host (issue 26): the step's rows up for the
        # compute, then rows and both AdamW moments up for the update and back after it.
        row_bytes = 4 * run["row_floats"] * run["users_per_step"]
        run["bytes_per_step_before"] = {"bytes_h2d": 4 * row_bytes, "bytes_d2h": 3 * row_bytes}
        runs.append(run)
    result = {"suite": "train", "machine": machine(dev), "device": dev.type, "precision": precision,
              "base": base_cfg, "tokens_per_example": tokens, "steps": steps, "runs": runs}
    write_json(out, "train", result)
    fig, (ax,) = new_figure(1)
    labels = [f"{r['method']} r{r['rank']}" for r in runs]
    ax.bar(labels, [r["ratio"] for r in runs], color=["tab:blue", "tab:orange", "tab:green"][: len(runs)])
    for i, r in enumerate(runs):
        ax.hlines(r["target"], i - 0.4, i + 0.4, colors="red", linestyles="--")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("training step / frozen base, no adapters")
    ax.set_title(f"{users} distinct users per batch, {tokens} tokens")
    result["plot"] = str(save_figure(fig, out, "train"))
    h = base_cfg
    print(f"bench train: {users} distinct users x 1 example x {runs[0]['tokens'] // max(1, runs[0]['examples'])} tokens "
          f"per step, Llama {h['hidden_size']}x{h['num_layers']} layers ({precision}, all linear layers adapted); "
          f"{steps} timed steps; {result['machine']}")
    print(f"{'adapter':12s} {'step ms p50':>12s} {'limit ms p50':>13s} {'ratio':>7s} {'target':>7s}")
    for r in runs:
        ok = "ok" if r["ratio"] <= r["target"] else "MISSED"
        print(f"{r['method'] + ' r' + str(r['rank']):12s} {r['ours_ms_p50']:>12.1f} {r['limit_ms_p50']:>13.1f} "
              f"{r['ratio']:>6.3f}x {r['target']:>6.2f}x  {ok}")
    print("bytes between host and compute device per step (store/bytes_h2d, store/bytes_d2h; AdamW, "
          f"{users} users a step; the same on any device):")
    print(f"{'adapter':12s} {'tier':14s} {'h2d MiB':>9s} {'d2h MiB':>9s} {'vs before':>10s}")
    for r in runs:
        before = sum(r["bytes_per_step_before"].values())
        print(f"{r['method'] + ' r' + str(r['rank']):12s} {'host (before)':14s} {r['bytes_per_step_before']['bytes_h2d'] / 2**20:>9.3f} "
              f"{r['bytes_per_step_before']['bytes_d2h'] / 2**20:>9.3f} {'1.00x':>10s}")
        for name, b in r["bytes_per_step"].items():
            moved = b["bytes_h2d"] + b["bytes_d2h"]
            print(f"{'':12s} {name:14s} {b['bytes_h2d'] / 2**20:>9.3f} {b['bytes_d2h'] / 2**20:>9.3f} "
                  f"{(f'{before / moved:.2f}x fewer' if moved else 'none'):>10s}")
    return result

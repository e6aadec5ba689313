"""`flora-train bench lengths`: training throughput on examples of real-text lengths.

Real users' examples are not of one length: paragraphs and chat turns run from a few tokens to
hundreds (median ~60, a heavy tail). Five settings train the same users on the same plan, side by
side, each in its own process (so each has its own peak memory):

- ``padded``: today's micro-batches of ``micro_batch_size`` examples in plan order, each padded to
  its longest member;
- ``grouped``: ``train.micro_batch_tokens``: examples grouped by length under a token budget;
- ``packed``: ``train.packing``: examples of any users concatenated into rows of the budget;
- ``packed_uniform``: the uniform examples below packed as ``packed`` packs: what packing itself
  costs, apart from the lengths (a long example's attention grows with its length squared, so
  real lengths carry more attention work than the same tokens at the mean length);
- ``uniform``: the same number of real tokens with every example at the mean length, in padded
  micro-batches (nothing to pad): the limit.

Each reports real tokens a second (its best of three timed epochs, after a first in which the
kernel tuner meets the shapes; with ``repeats`` the settings run round-robin that many times and
each keeps its best, so a slow spell of the machine cannot land on one setting only), the share of
real tokens among those the base computed, the largest micro-batch in computed tokens (what
activation memory follows) and the peak memory: the process's resident memory on a CPU, the
memory torch allocated on a GPU. On a GPU the runs compute in bf16 (as `train.precision: auto`
does there), so packing takes flash-attention's varlen kernel (PyTorch's, or the ``flash_attn``
package's where installed).
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flora_train.bench.common import bench_device, bench_precision, machine, rss_mib, write_json

DEFAULT_BASE = dict(architecture="llama", hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4,
                    num_kv_heads=4, vocab_size=1024, max_position_embeddings=1024, seed=0, pretrain_steps=0)
# The same vocabulary as the default: with fewer tokens a word "wNNN" splits into more pieces, and
# the examples are no longer the lengths the bench meant (at 400 the longest ran to 1,042 tokens).
TINY_BASE = dict(DEFAULT_BASE, hidden_size=32, intermediate_size=64, num_layers=2)
CONFIGS = (("flora", 1), ("lora", 8))
SETTINGS = ("padded", "grouped", "packed", "packed_uniform", "uniform")
TARGETS = {"packed": 0.9, "grouped": 0.6}  # real tokens/s against the uniform limit (this CPU)


def _lengths(n: int, median: int, sigma: float, longest: int, seed: int) -> np.ndarray:
    """Log-normal token counts (real text's shape: most short, a heavy tail), in [8, longest]."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), 8, longest).astype(int)


def _write(path: Path, users: int, lengths: list[int], seed: int) -> list[str]:
    """JSONL of ``user_id`` / ``text``; a word "wNNN" is about two tokens of the locally built tokenizer."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(600)]
    rows, texts = [], []
    for k, n in enumerate(lengths):
        text = " ".join(rng.choice(vocab) for _ in range(max(1, n // 2)))
        rows.append(json.dumps({"user_id": f"user-{k % users:04d}", "text": text}))
        texts.append(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return texts


def prepare_data(work: Path, users: int, examples_per_user: int, median: int, sigma: float, longest: int,
                 base: dict[str, Any]) -> tuple[np.ndarray, int, Path, int]:
    """The real-length and uniform data files, the base built on their text, and what the recipes'
    ``data.max_length`` must hold: ``(lengths, mean, model_dir, longest_tokens)``, the last counted
    with the base's own tokenizer (a word is about two tokens, not exactly)."""
    from transformers import AutoTokenizer

    from flora_train.base import build_tiny_model

    lengths = _lengths(users * examples_per_user, median, sigma, longest, seed=0)
    mean = int(round(float(lengths.mean())))
    texts = _write(work / "real.jsonl", users, lengths.tolist(), seed=0)
    uniform = _write(work / "uniform.jsonl", users, [mean] * len(lengths), seed=1)
    model_dir = build_tiny_model(work / "base", dict(base), texts)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    longest_tokens = max(len(ids) for ids in tokenizer([*texts, *uniform])["input_ids"])
    return lengths, mean, model_dir, longest_tokens


def _one(spec: dict[str, Any]) -> dict[str, Any]:
    """One setting in this process: a first epoch (the kernel tuner meets the shapes), then
    ``timed_epochs`` epochs, each timed; the best one counts (the machine's slow spells last
    seconds, about an epoch)."""
    from flora_train.config import load_recipe
    from flora_train.train.session import prepare_session, train_settings
    from flora_train.train.trainer import Trainer

    session = prepare_session(load_recipe(None, spec["overrides"]))
    try:
        trainer = Trainer(session.model, session.slot, session.store, session.train, train_settings(session),
                          session.user_total_steps(), session.pad_id, session.device)
        epoch = session.planner.steps_per_epoch()
        timed = spec.get("timed_epochs", 3)
        stats = trainer.fit(session.planner.steps(epochs=1 + timed))[epoch:]
        epochs = [stats[k * epoch:(k + 1) * epoch] for k in range(timed)]
        rates = [sum(s.tokens for s in e) / sum(s.seconds for s in e) for e in epochs]
        lengths = session.train.lengths()
        works = [trainer.rank_work(p) for p in session.planner.steps(epochs=1)]
        biggest = max((len(mb) * int(max(lengths[i] for _, i in mb)) if not trainer.batching.packing
                       else int(sum(lengths[i] for _, i in mb))) for w in works for mb in w.micro_batches if mb)
        seconds = sum(s.seconds for s in stats)
        real, computed = sum(s.tokens for s in stats), sum(s.computed_tokens for s in stats)
        return {"real_tokens_per_s": max(rates), "epoch_real_tokens_per_s": rates, "real_share": real / computed,
                "seconds": seconds,
                "real_tokens": real, "computed_tokens": computed, "biggest_micro_batch_tokens": biggest,
                "micro_batches_per_step": statistics.fmean(len(w.micro_batches) for w in works),
                "peak_rss_mib": rss_mib("VmHWM"),
                "peak_device_mib": (torch.cuda.max_memory_allocated(session.device) / 2**20
                                    if session.device.type == "cuda" else None),
                "examples": len(lengths), "longest": int(lengths.max())}
    finally:
        session.close()


def setting_recipes(work: Path, model_dir: Path, device: torch.device, users: int, longest: int, budget: int,
                    micro_batch_size: int, timed_epochs: int) -> dict[str, list[str]]:
    """Each setting's recipe overrides (all but the run directory and the adapter)."""
    common = [f"base.name_or_path={model_dir}", "data.text_column=text", f"data.max_length={longest + 16}",
              "data.eval_examples_per_user=0", f"train.users_per_step={max(1, users // 2)}",
              "train.examples_per_user=4", f"train.epochs={1 + timed_epochs}",
              f"train.precision={bench_precision(device)}", f"train.device={device.type}", "train.progress=false",
              "tracking.enabled=false", "eval.at_end=false", "adapter.target_modules=all-linear"]
    padded = [f"train.micro_batch_size={micro_batch_size}"]
    packed = ["train.micro_batch_size=null", f"train.micro_batch_tokens={budget}", "train.packing=true"]
    policy = {"padded": padded, "grouped": ["train.micro_batch_size=null", f"train.micro_batch_tokens={budget}"],
              "packed": packed, "packed_uniform": packed, "uniform": padded}
    data = {setting: work / ("uniform.jsonl" if setting.endswith("uniform") else "real.jsonl") for setting in SETTINGS}
    return {setting: [*common, f"data.train_path={data[setting]}", *policy[setting]] for setting in SETTINGS}


def bench_lengths(out: Path = Path("runs/bench"), users: int = 32, examples_per_user: int = 16, median: int = 60,
                  sigma: float = 0.9, longest: int = 768, budget: int = 4096, micro_batch_size: int = 16,
                  tiny: bool = False, configs: tuple[tuple[str, int], ...] = CONFIGS, repeats: int = 2,
                  timed_epochs: int = 3, device: str = "auto") -> dict[str, Any]:
    if budget < longest:  # (the settings' data.max_length is the longest example's tokens + 16: said below)
        raise SystemExit(f"bench lengths: --budget {budget} is under the longest example's {longest} tokens; "
                         f"a budget must hold every example (--budget {longest + 16} or more)")
    dev = bench_device(device)
    work = out / "lengths"
    n = users * examples_per_user
    base = TINY_BASE if tiny else DEFAULT_BASE
    lengths, mean, model_dir, longest_tokens = prepare_data(work, users, examples_per_user, median, sigma, longest, base)
    if budget < longest_tokens + 16:
        raise SystemExit(f"bench lengths: --budget {budget} is under the longest example's {longest_tokens} tokens and "
                         f"the 16 the recipe's data.max_length leaves: --budget {longest_tokens + 16} or more")
    recipes = setting_recipes(work, model_dir, dev, users, longest_tokens, budget, micro_batch_size, timed_epochs)
    runs: dict[str, dict[str, Any]] = {}
    for method, rank in configs:
        name = f"{method} r{rank}"
        runs[name] = {}
        for attempt in range(repeats):
            for setting in SETTINGS:
                overrides = [*recipes[setting], f"run_dir={work / f'{method}-{setting}-{attempt}'}",
                             f"adapter.method={method}", f"adapter.rank={rank}"]
                spec = {"overrides": overrides, "timed_epochs": timed_epochs}
                proc = subprocess.run([sys.executable, "-m", "flora_train.bench.lengths", json.dumps(spec)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"bench lengths: {name} {setting} failed:\n{proc.stderr[-3000:]}")
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                best = runs[name].get(setting)
                if best is None or got["real_tokens_per_s"] > best["real_tokens_per_s"]:
                    runs[name][setting] = got
                print(f"[{name}] {setting} (run {attempt + 1} of {repeats}): "
                      f"{got['real_tokens_per_s']:.0f} real tokens/s", flush=True)
        limit = runs[name]["uniform"]["real_tokens_per_s"]
        for setting in SETTINGS:
            runs[name][setting]["vs_limit"] = runs[name][setting]["real_tokens_per_s"] / limit
    p50, p90, p99 = (int(np.percentile(lengths, q)) for q in (50, 90, 99))
    # Attention work per token grows with the example's length: real lengths' against the mean's.
    attention_work = float((lengths.astype(float) ** 2).mean() / lengths.mean() / mean)
    result = {"suite": "lengths", "machine": machine(), "base": base, "examples": n, "users": users,
              "lengths": {"median": p50, "p90": p90, "p99": p99, "max": int(lengths.max()), "mean": mean},
              "attention_work_vs_uniform": attention_work,
              "device": dev.type, "precision": bench_precision(dev), "budget": budget,
              "micro_batch_size": micro_batch_size, "targets": TARGETS, "repeats": repeats,
              "timed_epochs": timed_epochs, "runs": runs}
    write_json(out, "lengths", result)
    print(f"\nbench lengths: {n} examples of {users} users, lengths median {p50}, p90 {p90}, p99 {p99}, max "
          f"{int(lengths.max())} tokens (uniform: {mean}; attention work a token {attention_work:.2f}x the uniform's); "
          f"Llama {base['hidden_size']}x{base['num_layers']}, every linear layer adapted, {result['precision']} on "
          f"{dev.type}; padded: {micro_batch_size} examples a micro-batch; grouped and packed: {budget} tokens; "
          f"best epoch of {timed_epochs} in each of {repeats} runs; {result['machine']}")
    print(f"{'adapter':9s} {'setting':14s} {'real tok/s':>10s} {'vs limit':>9s} {'target':>7s} {'real share':>10s} "
          f"{'max mb tokens':>13s} {'peak MiB':>9s}  (peak: {'GPU memory allocated' if dev.type == 'cuda' else 'RSS'})")
    for name, by_setting in runs.items():
        for setting, r in by_setting.items():
            target = f"{TARGETS[setting]:.1f}x" if setting in TARGETS else "-"
            print(f"{name:9s} {setting:14s} {r['real_tokens_per_s']:10.0f} {r['vs_limit']:8.2f}x {target:>7s} "
                  f"{r['real_share']:10.0%} {r['biggest_micro_batch_tokens']:13d} "
                  f"{r['peak_device_mib'] if r['peak_device_mib'] is not None else r['peak_rss_mib']:9.0f}")
    for name, by_setting in runs.items():
        own, lengths_cost = by_setting["packed_uniform"]["vs_limit"], by_setting["packed"]["vs_limit"]
        print(f"{name}: packing itself {own:.2f}x the limit (uniform lengths, packed); the real lengths "
              f"{lengths_cost / own:.2f}x that (attention example by example, {attention_work:.2f}x the work a token)")
    return result


if __name__ == "__main__":  # one setting, in its own process (its own peak memory)
    print(json.dumps(_one(json.loads(sys.argv[1]))))

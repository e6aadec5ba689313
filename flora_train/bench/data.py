"""`flora-train bench data`: what a rank holds for a million examples, before and after the
tokenise-once cache.

One synthetic dataset (``--examples``, 16 per user) is read, checked and tokenised once through
the run's data path (``prepare_data``: rank 0's side, timed), then each representation is loaded
in a fresh process, the way a rank holds it through training:

- ``python lists``: what every rank held before, the tokenised columns as Python lists
  (``Dataset.to_dict()``) plus each user's example indices and the per-example target counts;
- ``memory-mapped``: what every rank holds now, ``TokenizedExamples`` over the mapped cache plus
  the same per-user indices, target counts, the data fingerprint and the planner's first epoch.

Reported per process: the growth of RSS, split into private memory (RssAnon: what each rank pays
for itself) and mapped file pages (RssFile: shared by every rank on the node through the page
cache, and dropped under memory pressure).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flora_train.bench.common import machine, write_json

FIELDS = ("VmRSS", "RssAnon", "RssFile")


def _rss() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            out[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return out


def _hold(variant: str, folder: Path) -> dict[str, Any]:
    """Loads ``folder`` as ``variant`` and returns the RSS growth in MiB (run in a fresh process)."""
    import datasets

    from flora_train.data import BatchPlanner
    from flora_train.data.cache import load
    from flora_train.data.examples import IGNORE

    before = _rss()
    if variant == "lists":
        columns = datasets.load_from_disk(str(folder / "train")).select_columns(["user_id", "input_ids", "labels"]).to_dict()
        by_user: dict[str, list[int]] = {}
        for i, u in enumerate(columns["user_id"]):
            by_user.setdefault(u, []).append(i)
        targets = [sum(1 for t in lab[1:] if t != IGNORE) for lab in columns["labels"]]
        held: Any = (columns, by_user, targets)
    else:
        examples = load(folder)[0]["train"]
        by_user = examples.by_user()
        held = (examples, by_user, examples.target_counts(), examples.fingerprint())
        BatchPlanner(by_user, 128, 4, 0).steps_per_epoch()
    after = _rss()
    return {k: after[k] - before[k] for k in FIELDS} | {"examples": len(held[0]["user_id"] if variant == "lists" else held[0])}


def bench_data(examples: int, out: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from flora_train.base.tiny import train_tokenizer
    from flora_train.config import load_recipe
    from flora_train.data import SyntheticTask
    from flora_train.train.data_setup import prepare_data

    work = out / "data"
    users = max(1, examples // 16)
    task = SyntheticTask(num_users=users, train_examples_per_user=16, eval_examples_per_user=0)
    t0 = time.perf_counter()
    train_path, _ = task.write(work / "source")
    write_s = time.perf_counter() - t0
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(SyntheticTask(num_users=200).texts(), 512).save_pretrained(tok_dir)
    cfg = load_recipe(None, [f"run_dir={work / 'run'}", f"base.name_or_path={tok_dir}", f"data.train_path={train_path}",
                             "data.eval_examples_per_user=0", "tracking.enabled=false"])
    t0 = time.perf_counter()
    prepared = prepare_data(cfg)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepare_data(OmegaConf.create(OmegaConf.to_container(cfg)))
    reuse_s = time.perf_counter() - t0
    held = {}
    for variant in ("lists", "mapped"):
        proc = subprocess.run([sys.executable, "-m", "flora_train.bench.data", variant, str(prepared.cache_dir)],
                              capture_output=True, text=True, check=True)
        held[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    n = len(prepared.train)
    result = {"machine": machine(), "examples": n, "users": users, "tokens": int(prepared.train.lengths().sum()),
              "write_jsonl_s": write_s, "read_check_tokenise_s": build_s, "second_run_s": reuse_s, "rss_mib": held,
              "private_ratio": held["lists"]["RssAnon"] / max(held["mapped"]["RssAnon"], 1e-9)}
    write_json(out, "data", result)
    print(f"data: {n:,} examples of {users:,} users, {result['tokens']:,} tokens ({machine()})")
    print(f"  rank 0 reads, checks and tokenises once : {build_s:7.1f} s   (a second run finds the cache: {reuse_s:.1f} s)")
    print(f"  {'held per rank (RSS growth, MiB)':38s} {'private':>9s} {'file pages':>11s} {'total':>9s}")
    for variant, label in (("lists", "python lists (before)"), ("mapped", "memory-mapped cache (now)")):
        h = held[variant]
        print(f"  {label:38s} {h['RssAnon']:9.0f} {h['RssFile']:11.0f} {h['VmRSS']:9.0f}")
    print(f"  private memory per rank: {result['private_ratio']:.1f}x less; file pages are shared by the node's ranks")
    return result


if __name__ == "__main__":
    print(json.dumps(_hold(sys.argv[1], Path(sys.argv[2]))))

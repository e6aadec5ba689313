"""`flora-train bench serve`: the server under concurrent clients, each with its own user.

For FLoRA r1 and LoRA r8 (a tiny Llama, users trained briefly), one set of requests (``clients``
distinct users, ``requests`` each, ``new_tokens`` generated per request, EOS ignored so every
request costs the same) is served three ways, side by side in one run:

- ``batched``: all clients at once against `flora-train serve`'s app (uvicorn on 127.0.0.1), which
  batches concurrent users into one forward;
- ``one at a time``: the same requests sent one after another to the same server;
- ``PEFT, set_adapter per request`` (LoRA): one ``PeftModel`` holding every user's exported adapter,
  ``set_adapter`` + ``generate`` per request, one after another, as a server built on PEFT would.

It reports tokens/s and p50/p99 latency per way, and the ratios.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from flora_train.bench.common import bench_device, machine, write_json

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


def _percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": 1e3 * statistics.median(ordered), "p99_ms": 1e3 * pick(0.99)}


class _Server:
    """The serve app in uvicorn on a background thread (what `flora-train serve` runs)."""

    def __init__(self, trained: Any, max_batch: int) -> None:
        import uvicorn

        from flora_train.inference.server import create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(trained, max_batch=max_batch, batch_window_ms=5),
                                                    host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _http_way(url: str, jobs: list[tuple[str, str]], new_tokens: int, concurrency: int) -> dict[str, Any]:
    import requests

    session_local = threading.local()

    def one(job: tuple[str, str]) -> tuple[float, int]:
        s = getattr(session_local, "s", None) or requests.Session()
        session_local.s = s
        start = time.perf_counter()
        r = s.post(f"{url}/v1/completions", json={"prompt": job[1], "user": job[0], "max_tokens": new_tokens,
                                                  "temperature": 0, "ignore_eos": True}, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(one, jobs))
    wall = time.perf_counter() - start
    tokens = sum(t for _, t in done)
    return {"seconds": wall, "tokens": tokens, "tokens_per_s": tokens / wall, **_percentiles([l for l, _ in done])}


def _peft_way(run_dir: Path, trained: Any, jobs: list[tuple[str, str]], new_tokens: int, work: Path) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from flora_train.export import export_adapters

    users = sorted({u for u, _ in jobs})
    out = work / "peft"
    export_adapters(run_dir, "peft", users, out)
    import json

    index = json.loads((out / "index.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(trained.source.model_path).to(trained.device).eval()
    model = PeftModel.from_pretrained(base, str(out / index[users[0]]), adapter_name=users[0])
    for u in users[1:]:
        model.load_adapter(str(out / index[u]), adapter_name=u)
    model.eval()
    tok = trained.tokenizer
    latencies, tokens = [], 0
    start = time.perf_counter()
    for user, prompt in jobs:
        t = time.perf_counter()
        model.set_adapter(user)
        enc = tok([prompt], return_tensors="pt").to(trained.device)
        with torch.no_grad():
            seq = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        tokens += seq.shape[1] - enc["input_ids"].shape[1]
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    return {"seconds": wall, "tokens": tokens, "tokens_per_s": tokens / wall, **_percentiles(latencies)}


def bench_serve(clients: int = 16, requests: int = 2, new_tokens: int = 16, device: str = "auto",
                out: Path = Path("runs/bench")) -> dict[str, Any]:
    from flora_train.inference import load_trained

    dev = bench_device(device)
    work = out / "serve"
    prompts = [f"quick : favourite {k} ?" for k in ("colour", "animal", "city", "fruit")]
    runs = []
    for method, rank in (("flora", 1), ("lora", 8)):
        run_dir = _train(work / "train", method, rank, max(clients, 16), dev.type)
        trained = load_trained(run_dir, device=dev)
        users = trained.users[:clients]
        jobs = [(users[c], prompts[(c + r) % len(prompts)]) for r in range(requests) for c in range(clients)]
        server = _Server(trained, max_batch=clients)
        try:
            url = f"http://127.0.0.1:{server.port}"
            _http_way(url, jobs[:2], new_tokens, 1)  # warm-up
            ways = {"batched": _http_way(url, jobs, new_tokens, clients),
                    "one at a time": _http_way(url, jobs, new_tokens, 1)}
        finally:
            server.close()
        if method == "lora":
            ways["PEFT, set_adapter per request"] = _peft_way(run_dir, trained, jobs, new_tokens, work / method)
        runs.append({"method": method, "rank": rank, "ways": ways,
                     "speedup_vs_one_at_a_time": ways["batched"]["tokens_per_s"] / ways["one at a time"]["tokens_per_s"]})
        if "PEFT, set_adapter per request" in ways:
            runs[-1]["speedup_vs_peft"] = ways["batched"]["tokens_per_s"] / ways["PEFT, set_adapter per request"]["tokens_per_s"]
    result = {"suite": "serve", "machine": machine(dev), "device": dev.type, "clients": clients,
              "requests_per_client": requests, "new_tokens": new_tokens, "base": DEFAULT_BASE, "runs": runs}
    write_json(out, "serve", result)
    print(f"bench serve: {clients} concurrent clients, each its own user, {requests} requests each, {new_tokens} new "
          f"tokens per request; Llama {DEFAULT_BASE['hidden_size']}x{DEFAULT_BASE['num_layers']}; {result['machine']}")
    print(f"{'adapter':10s} {'way':32s} {'tokens/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for r in runs:
        for way, m in r["ways"].items():
            print(f"{r['method'] + ' r' + str(r['rank']):10s} {way:32s} {m['tokens_per_s']:>9.1f} {m['p50_ms']:>8.1f} {m['p99_ms']:>8.1f}")
        line = f"  batched / one at a time: {r['speedup_vs_one_at_a_time']:.2f}x tokens/s"
        if "speedup_vs_peft" in r:
            line += f"; batched / PEFT set_adapter: {r['speedup_vs_peft']:.2f}x"
        print(line)
    return result

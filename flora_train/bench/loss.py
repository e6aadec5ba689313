"""`flora-train bench loss`: peak memory of one training step's loss at a real vocabulary size.

Side by side on one generated Llama (vocabulary >= 32k, FLoRA on every projection): the loss from
full logits (``model(...).logits`` then a float32 cross-entropy over every position, what the
trainer did before) against the trainer's loss (the head and a chunked float32 cross-entropy at
target positions only). On CUDA the figure is ``max_memory_allocated`` of the step; on CPU each
variant runs in a fresh process and reports its peak RSS above what it held before the step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from flora_train.bench.common import bench_device, bench_dtype, machine, reset_peak_rss, rss_mib, write_json

DEFAULT = dict(vocab_size=32768, hidden_size=256, num_layers=2, batch=8, tokens=512, target_fraction=0.5)


def _step(variant: str, spec: dict[str, Any], device: torch.device) -> float:
    """Runs one forward+backward of ``variant`` and returns its peak memory in MiB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from flora_train.adapters import AdapterSpec, inject_adapters
    from flora_train.data.tokenize import IGNORE
    from flora_train.train.loss import example_losses, target_logits, token_losses

    torch.manual_seed(0)
    h = spec["hidden_size"]
    config = LlamaConfig(vocab_size=spec["vocab_size"], hidden_size=h, intermediate_size=h * 11 // 4,
                         num_hidden_layers=spec["num_layers"], num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=spec["tokens"])
    model = LlamaForCausalLM(config).to(device)
    slot, layout = inject_adapters(model, AdapterSpec("flora", 1), "all-linear")
    rows = layout.init_rows(torch.arange(spec["batch"])).to(device).requires_grad_()
    ids = torch.randint(0, spec["vocab_size"], (spec["batch"], spec["tokens"]), device=device)
    labels = ids.clone()
    labels[:, : int(spec["tokens"] * (1 - spec["target_fraction"]))] = IGNORE
    mask = torch.ones_like(ids)
    dtype = bench_dtype(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        reset_peak_rss()
        before = rss_mib("VmHWM")
    with slot.activate(rows, torch.arange(spec["batch"], device=device)), autocast:
        if variant == "full_logits":
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = token_losses(logits, labels).sum()
        else:
            loss = example_losses(target_logits(model, ids, mask, labels)).sum()
        loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return rss_mib("VmHWM") - before


def bench_loss(device: str, out: Path, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = dict(DEFAULT, **(spec or {}))
    dev = bench_device(device)
    peaks = {}
    for variant in ("full_logits", "target_chunked"):
        if dev.type == "cuda":
            peaks[variant] = _step(variant, spec, dev)
        else:  # a fresh process per variant: RSS's high-water mark never comes down
            proc = subprocess.run([sys.executable, "-m", "flora_train.bench.loss", variant, json.dumps(spec)],
                                  capture_output=True, text=True, check=True)
            peaks[variant] = float(proc.stdout.strip().splitlines()[-1])
    full_mib = spec["batch"] * spec["tokens"] * spec["vocab_size"] * 4 / 2**20
    result = {"machine": machine(dev), "device": str(dev), "spec": spec, "peak_mib": peaks,
              "ratio": peaks["full_logits"] / max(peaks["target_chunked"], 1e-9),
              "float32_full_logits_mib": full_mib, "measure": "max_memory_allocated" if dev.type == "cuda" else "peak RSS"}
    write_json(out, "loss", result)
    print(f"loss memory ({result['measure']}, vocab {spec['vocab_size']}, {spec['batch']}x{spec['tokens']} tokens, "
          f"{spec['target_fraction']:.0%} targets; one float32 copy of the logits = {full_mib:.0f} MiB)")
    print(f"  full logits + float32 cross-entropy : {peaks['full_logits']:8.0f} MiB")
    print(f"  head + chunked CE at targets only   : {peaks['target_chunked']:8.0f} MiB   ({result['ratio']:.2f}x less)")
    return result


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    print(_step(sys.argv[1], json.loads(sys.argv[2]), torch.device("cpu")))

"""Kernel choices for serving, made before the first request.

Under ``adapter.kernel: auto`` the tuner times the method's kernels the first time a shape bucket
is seen. A server must not do that on a live request (the request would wait seconds, on the
device every other request shares). So at start-up the engine's shapes are measured for each
distinct adapted layer: decode steps (``b`` sequences of one token, ``u`` distinct users, for every
power of two up to ``max_batch``) and prefill chunks (``b`` prompts of ``prefill_tokens // b``
tokens); then the tuner is frozen, and a shape it never saw takes its nearest measured neighbour.

They are timed on a thread of their own, as the engine runs them (``engine.py``): once the main
thread has run parallel operators, libgomp stops spinning between another thread's parallel
regions and each operator there waits for a wake-up (a 256x256 ``mul``: 61 against 5 us on this
project's 2-core CPU; a decode step of SmolLM2-135M for 8 sequences 80 against 58 ms), which
weighs on kernels of many small operators. Timed on the main thread, they would be chosen for
costs the engine does not see.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from flora_train.adapters.functional import kernels_for
from flora_train.adapters.layer import personal_layers
from flora_train.adapters.tuning import bucket


def serving_shapes(max_batch: int, prefill_tokens: int) -> list[tuple[int, int, int]]:
    """(sequences, distinct users, tokens) buckets the engine's forwards fall in."""
    shapes = []
    b = 1
    while b <= bucket(max_batch):
        for u in (1 << k for k in range(b.bit_length())):  # 1, 2, 4 .. b users
            shapes.append((b, u, 1))  # a decode step
            shapes.append((b, u, bucket(max(1, prefill_tokens // b))))  # a prefill chunk
        b *= 2
    return list(dict.fromkeys(shapes))


def tune_for_serving(model: torch.nn.Module, slot: Any, max_batch: int, prefill_tokens: int,
                     autocast_dtype: torch.dtype | None) -> dict[str, Any]:
    """Measures every kernel choice the engine's shapes need (on a thread, as the engine runs
    them), then freezes the tuner. Returns what it did (choices measured, seconds)."""
    with ThreadPoolExecutor(1, thread_name_prefix="flora-kernel-tuner") as pool:
        return pool.submit(_tune, model, slot, max_batch, prefill_tokens, autocast_dtype).result()


def _tune(model: torch.nn.Module, slot: Any, max_batch: int, prefill_tokens: int,
          autocast_dtype: torch.dtype | None) -> dict[str, Any]:
    spec, tuner = slot.layout.spec, slot.tuner
    started = time.perf_counter()
    before = len(tuner.timings)
    if spec.kernel == "auto" and len(kernels_for(spec.method, spec.rank)) > 1:
        layers = personal_layers(model, slot)
        device = next(iter(layers.values())).weight.device if layers else torch.device("cpu")
        if device.type == "cuda":  # the thread's current device, which the timing synchronises
            torch.cuda.set_device(device)
        autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            for layer in layers.values():
                for b, u, t in serving_shapes(max_batch, prefill_tokens):
                    tuner.choose(spec.method, spec.rank, layer.weight, layer.bias,
                                 torch.Size([b, t, layer.weight.shape[1]]), u, spec.scaling)
    tuner.freeze()
    return {"measured": len(tuner.timings) - before, "seconds": time.perf_counter() - started}

"""``adapter.kernel: auto``: measure every kernel of the chosen method once per shape, keep the fastest.

Which kernel wins depends on the machine, the layer's shape, the rank and how many distinct users
share a micro-batch (LoRA's gather+bmm copies A and B per example; grouping by user pays a sort and a
GEMM per user; FLoRA's stacked GEMM trades r copies of the activations for one large kernel). No
fixed rule gets all of these right, so the tuner times the candidates on synthetic tensors of the
layer's shape (forward, plus backward when gradients are on) the first time a shape bucket is seen.

Choices are persisted per rank as they are made (``run_dir/kernels/rank-N.json``) and read back
when the run is resumed. A training run measures every shape its first epoch will meet before its
first step (``train/pretune.py``) and then freezes the tuner (a shape met later takes its nearest
measured neighbour's choice), so a run resumed at any step computes with exactly the kernels the
uninterrupted run used, bit for bit. The tuner never swaps the method: FLoRA and LoRA are
different models.
"""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from flora_train.adapters.functional import adapted_linear, kernels_for
from flora_train.adapters.methods import get_method
from flora_train.errors import UserError
from flora_train.files import replace_text


MEASURE_ROWS = 4096  # token rows a kernel is timed on, at most


def bucket(n: int) -> int:
    """The power of two at or above ``n``: shapes in one bucket share a measured choice."""
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class KernelKey:
    method: str
    rank: int
    in_features: int
    out_features: int
    batch: int  # bucketed examples in the micro-batch
    users: int  # bucketed distinct users among them
    tokens: int  # bucketed sequence length
    dtype: str
    device: str
    backward: bool

    def text(self) -> str:
        return (f"{self.method} r{self.rank} {self.in_features}x{self.out_features} batch{self.batch} "
                f"users{self.users} tokens{self.tokens} {self.dtype} {self.device} {'fwd+bwd' if self.backward else 'fwd'}")

    @classmethod
    def parse(cls, text: str) -> "KernelKey | None":
        """The key ``text()`` wrote (a device name may hold spaces); None for anything else."""
        m = _KEY_TEXT.fullmatch(text)
        if m is None:
            return None
        method, rank, n_in, n_out, batch, users, tokens, dtype, device, mode = m.groups()
        return cls(method, int(rank), int(n_in), int(n_out), int(batch), int(users), int(tokens), dtype, device,
                   mode == "fwd+bwd")


_KEY_TEXT = re.compile(r"(\S+) r(\d+) (\d+)x(\d+) batch(\d+) users(\d+) tokens(\d+) (\S+) (.+) (fwd\+bwd|fwd)")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1,
                   give_up_after: float = float("inf")) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs (device-synchronised).

    A warm-up slower than ``give_up_after`` seconds returns that warm-up's time without repeats:
    a kernel already far behind the best one need not be timed precisely.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    for _ in range(warmup):
        start = time.perf_counter()
        fn()
        sync()
        if time.perf_counter() - start > give_up_after:
            return time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synthetic_params(method: str, rank: int, users: int, n_in: int, n_out: int, dtype: torch.dtype,
                     device: torch.device, requires_grad: bool) -> dict[str, torch.Tensor]:
    """Adapter tensors of one layer for ``users`` users, near identity (values do not change timing)."""
    return get_method(method).synthetic_params(users, rank, n_in, n_out, dtype, device, requires_grad)


def grouped_index(batch: int, users: int, device: torch.device) -> torch.Tensor:
    """``batch`` examples of ``users`` users, each user's examples adjacent (as the planner packs them)."""
    return (torch.arange(batch, device=device) * min(users, batch) // batch).long()


def time_kernel(method: str, kernel: str, weight: torch.Tensor, bias: torch.Tensor | None, rank: int, batch: int,
                users: int, tokens: int, backward: bool, repeats: int = 3, scaling: float = 1.0,
                give_up_after: float = float("inf")) -> float:
    """Median seconds of one kernel at one shape: forward, or forward+backward into x and the adapters."""
    device, dtype = weight.device, weight.dtype
    n_out, n_in = weight.shape
    x = torch.randn(batch, tokens, n_in, device=device, dtype=dtype).requires_grad_(backward)
    params = synthetic_params(method, rank, users, n_in, n_out, dtype, device, backward)
    index = grouped_index(batch, users, device)
    w = weight.detach()
    bias = bias.detach() if bias is not None else None

    def step() -> None:
        if backward:
            y = adapted_linear(method, kernel, x, w, bias, params, index, scaling)
            y.backward(torch.ones_like(y))
        else:
            with torch.no_grad():
                adapted_linear(method, kernel, x, w, bias, params, index, scaling)

    return median_seconds(step, device, repeats, give_up_after=give_up_after)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _set_apart(fn: Callable[[], float], device: torch.device) -> float:
    """Runs a measurement on the calling thread so that it leaves no trace: its saved tensors go to
    hooks of its own (activation checkpointing records every tensor a forward saves, and the
    recomputation must find the same ones), and the random state is put back (the recomputation
    replays it). Grad mode and autocast are the caller's, as the kernel will run.

    Not on another thread, as it was: libgomp stops spinning between parallel regions once two
    threads' OpenMP teams exist in a process with no more cores than their threads, and every
    operator on the second thread then waits for a wake-up (a 256x256 ``mul``: 61 against 5 us on
    this project's 2-core CPU). Kernels of many small operators measured 2.3x slower than they
    run: FLoRA's segment kernel at 4,096 packed tokens of 16 users took 16.7 ms there against
    7.1 ms on the training thread, and lost to the gather (9.5 ms) it beats in the run."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
        try:
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_same, _same))
        except RuntimeError:  # saved-tensor hooks are disabled here: none records the measurement
            pass
        return fn()


class KernelRecordError(UserError, ValueError):
    """A run's kernel choice file that cannot be read: which kernels its steps ran is lost."""


class KernelTuner:
    """Measured kernel choices of one process, optionally persisted to ``path`` (JSON)."""

    def __init__(self, path: Path | None = None, repeats: int = 3) -> None:
        self.path = path
        self.repeats = repeats
        # Frozen (a server, once tuned at start-up): an unmeasured shape takes the nearest measured
        # shape's choice instead of timing kernels on a live request.
        self.frozen = False
        self.unmeasured: dict[str, str] = {}  # frozen: shapes answered from a neighbour, and the choice given
        self._keys: dict[str, KernelKey] = {}
        self.choices: dict[str, str] = {}
        self.timings: dict[str, dict[str, float]] = {}  # what was measured in this process, for reports
        if path is not None and path.exists():
            try:
                self.choices = {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
                raise KernelRecordError(
                    f"{path}: not a kernel choice file ({exc}); delete it to measure again (a resumed run may then "
                    "choose other kernels: the same function, summed in another order, so not bit for bit)") from None
            # Frozen, a resumed run answers unmeasured shapes from these as the first run did from its own.
            self._keys = {text: key for text in self.choices if (key := KernelKey.parse(text)) is not None}

    def choose(self, method: str, rank: int, weight: torch.Tensor, bias: torch.Tensor | None, x_shape: torch.Size,
               users: int, scaling: float = 1.0) -> str:
        candidates = kernels_for(method, rank)
        if len(candidates) == 1:
            return candidates[0]
        batch = x_shape[0]
        tokens = 1
        for d in x_shape[1:-1]:
            tokens *= int(d)
        backward = torch.is_grad_enabled()
        device = weight.device
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        compute = autocast or weight.dtype
        key = KernelKey(method, rank, int(weight.shape[1]), int(weight.shape[0]), bucket(batch), bucket(users),
                        bucket(tokens), str(compute).removeprefix("torch."), device_name(device), backward)
        text = key.text()
        chosen = self.choices.get(text)
        if chosen in candidates:
            return chosen
        if self.frozen:
            chosen = self._nearest(key, candidates)
            self.unmeasured[text] = chosen
            return chosen
        # Timed at the bucket's shape, scaled down to at most MEASURE_ROWS token rows (keeping the
        # users-per-example mix): the choice costs a bounded few seconds however large the batch.
        batch_m, users_m = key.batch, min(key.users, key.batch)
        while batch_m * key.tokens > MEASURE_ROWS and batch_m > 1:
            batch_m, users_m = batch_m // 2, max(1, users_m // 2)
        timings: dict[str, float] = {}
        for k in candidates:
            # A kernel whose warm-up is 3x the best median so far is out of the race: stop timing it.
            limit = 3 * min(timings.values(), default=float("inf"))
            timings[k] = _set_apart(lambda k=k, limit=limit: time_kernel(
                method, k, weight, bias, rank, batch_m, users_m, key.tokens, backward, self.repeats, scaling,
                give_up_after=limit), device)
        chosen = min(timings, key=timings.__getitem__)
        self.timings[text] = timings
        self.choices[text] = chosen
        self._keys[text] = key
        self._save()
        return chosen

    def freeze(self) -> None:
        """No more measuring: later unmeasured shapes take their nearest measured neighbour's kernel."""
        self.frozen = True

    def _nearest(self, key: KernelKey, candidates: tuple[str, ...]) -> str:
        """The choice measured for the closest shape of the same layer and method (distance in
        powers of two over batch, users and tokens), of the same mode (forward, or forward and
        backward) where there is one; the method's first kernel if there is none."""
        def far(other: KernelKey) -> tuple[bool, int]:
            return other.backward != key.backward, sum(abs(a.bit_length() - b.bit_length()) for a, b in
                                                       ((key.batch, other.batch), (key.users, other.users),
                                                        (key.tokens, other.tokens)))

        same = [(far(k), text) for text, k in self._keys.items()
                if (k.method, k.rank, k.in_features, k.out_features, k.dtype, k.device) ==
                (key.method, key.rank, key.in_features, key.out_features, key.dtype, key.device)
                and self.choices.get(text) in candidates]
        return self.choices[min(same)[1]] if same else candidates[0]

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        replace_text(self.path, json.dumps(self.choices, indent=1, sort_keys=True))

"""Where a shard's rows cross between their home and the compute device, and what that costs.

A row's home is where its optimizer state lives: the compute device (``store.tier: device``, or a
hot-row cache in front of a slower tier) or the host (``host`` and ``disk`` tiers). The
ZeRO-Offload rule holds for host homes: only a step's rows go to the device, only their
gradients come back, and the optimizer runs on the host beside the moments (torch's fused CPU
AdamW/Adagrad: the same kernels as ``torch.optim``, so a row's update stays bit-equal to
``torch.optim.AdamW``'s). Moments never cross, except through a hot-row cache, which keeps every
column of its rows on the device by design and counts what it loads and writes back.

The counters are logical: a crossing is counted wherever the home is the host, on every device,
so a CPU run counts the bytes a GPU run would move (``store/bytes_h2d``, ``store/bytes_d2h``).

On CUDA the copies are asynchronous: host rows are staged in pinned memory (torch's caching host
allocator keeps a pinned block from reuse until the copy that reads it has run), uploaded on a
side stream that the compute stream waits on, and gradients come back into pinned memory with an
event the optimizer waits on just before it reads them (the step's collectives run in between).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields

import torch


@dataclass
class Transfers:
    """Bytes moved between host homes and the compute side. The prefetch thread counts too: guarded."""

    bytes_h2d: int = 0
    bytes_d2h: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, h2d: int = 0, d2h: int = 0) -> None:
        with self._lock:
            self.bytes_h2d += h2d
            self.bytes_d2h += d2h

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


@dataclass
class Upload:
    """Rows on their way to the compute device (``wait`` on the thread that computes with them)."""

    values: torch.Tensor
    ready: "torch.cuda.Event | None" = None

    def wait(self) -> torch.Tensor:
        if self.ready is not None:
            stream = torch.cuda.current_stream(self.values.device)
            stream.wait_event(self.ready)
            self.values.record_stream(stream)  # its memory is not reused before this stream is done with it
        return self.values


@dataclass
class Download:
    """Gradients on their way to a host home."""

    values: torch.Tensor
    ready: "torch.cuda.Event | None" = None

    def wait(self) -> torch.Tensor:
        if self.ready is not None:
            self.ready.synchronize()
        return self.values


class HostLink:
    """A shard's crossings: ``host_home`` says whether its rows live on the host; ``compute`` is
    the device the model runs on."""

    def __init__(self, host_home: bool, compute: torch.device) -> None:
        self.host_home = host_home
        self.compute = torch.device(compute)
        self.asynchronous = self.compute.type == "cuda"  # pinned memory and streams are CUDA's
        self.transfers = Transfers()
        self._side: torch.cuda.Stream | None = None

    def leaving(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` read out of their home for a step: counted when the home is the host."""
        if self.host_home:
            self.transfers.add(h2d=rows.nbytes)
        return rows

    def upload(self, rows: torch.Tensor, background: bool = False) -> Upload:
        """Rows (``leaving`` their home) to the compute device. ``background``: called off the
        computing thread (a prefetch), so on CUDA the copy goes on a side stream."""
        if not self.asynchronous or rows.device.type == "cuda":
            return Upload(rows.to(self.compute))
        staged = rows if rows.is_pinned() else rows.pin_memory()
        if not background:
            return Upload(staged.to(self.compute, non_blocking=True))
        if self._side is None:
            self._side = torch.cuda.Stream(self.compute)
        with torch.cuda.stream(self._side):
            values = staged.to(self.compute, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._side)
        return Upload(values, ready)

    def download(self, grads: torch.Tensor, home: torch.device) -> Download:
        """A step's gradients to their rows' ``home`` device, started now, waited for by the
        optimizer; counted when the home is the host."""
        if self.host_home:
            self.transfers.add(d2h=grads.nbytes)
        if grads.device == home:
            return Download(grads)
        if grads.device.type != "cuda" or home.type != "cpu":
            return Download(grads.to(home))
        pinned = torch.empty(grads.shape, dtype=grads.dtype, pin_memory=True)
        pinned.copy_(grads, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(grads.device))
        return Download(pinned, ready)

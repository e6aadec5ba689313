"""Preemption and time-based checkpoints, as clusters need them.

Slurm (``--signal=B:USR1@grace``, forwarded by the batch script), Kubernetes (SIGTERM before an
eviction) and torchrun (SIGTERM to its workers when it is stopped) all warn a job before they kill
it. ``PreemptionWatch`` turns SIGTERM and SIGUSR1 into a flag; at the end of each step the ranks
agree (one all-reduce of two numbers) whether any of them was signalled and whether the
checkpoint interval has passed on rank 0's clock, so every rank checkpoints at the same step and
stops together. The run then exits with ``REQUEUE_EXIT_CODE``, which the launchers treat as "run
me again": Slurm's batch script requeues the job, torchrun ``--max-restarts`` restarts it, and the
PyTorchJob's ``ExitCode`` restart policy retries exit codes of 128 and above.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

import torch

from flora_train import dist as fdist

REQUEUE_EXIT_CODE = 143  # 128 + SIGTERM: retryable for Kubeflow's ExitCode policy, distinct from errors (2, 3)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run checkpointed because the scheduler asked it to stop; it should be run again."""


class PreemptionWatch:
    def __init__(self, checkpoint_every_minutes: float) -> None:
        self.every_s = checkpoint_every_minutes * 60.0
        self.last = time.monotonic()
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the step in flight finishes, then every rank checkpoints at the same step.
        self.received = signum

    def poll(self) -> tuple[bool, bool]:
        """``(stop, checkpoint)`` for the step just finished, the same on every rank (collective)."""
        due = self.every_s > 0 and fdist.rank() == 0 and time.monotonic() - self.last >= self.every_s
        flags = fdist.all_reduce(torch.tensor([float(self.received is not None), float(due)]), "max")
        stop, checkpoint = bool(flags[0]), bool(flags[0] or flags[1])
        return stop, checkpoint

    def restart_clock(self) -> None:
        """The interval counts from the start of training (set-up and a resume's restore excluded)."""
        self.last = time.monotonic()

    def checkpointed(self) -> None:
        self.last = time.monotonic()

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

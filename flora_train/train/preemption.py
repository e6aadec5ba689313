"""Preemption and time-based checkpoints, as clusters need them.

Slurm (``--signal=B:USR1@grace``, forwarded by the batch script), Kubernetes (SIGTERM before an
eviction) and torchrun (SIGTERM to its workers when it is stopped) all warn a job before they kill
it. ``PreemptionWatch`` turns SIGTERM and SIGUSR1 into a flag; at the end of each step the ranks
agree (one all-reduce of two numbers) whether any of them was signalled and whether the
checkpoint interval has passed on rank 0's clock, so every rank checkpoints at the same step and
stops together. The run then exits with ``REQUEUE_EXIT_CODE``, which the launchers treat as "run
me again": Slurm's batch script requeues the job, torchrun ``--max-restarts`` restarts it, and the
PyTorchJob's ``ExitCode`` restart policy retries exit codes of 128 and above.

Ctrl-C (SIGINT) in a terminal is the same flag, with one difference: the user asked the run to
stop, not to be run again. The step finishes, every rank checkpoints, and the run exits with
``INTERRUPTED_EXIT_CODE`` (which no launcher retries) saying how to resume. A second Ctrl-C stops
at once. (A job started in the background, whose SIGINT the shell ignores, keeps ignoring it.)
"""

from __future__ import annotations

import os
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


class Interrupted(Preempted):
    """The run checkpointed because the user pressed Ctrl-C; it resumes when they run it again."""


class PreemptionWatch:
    def __init__(self, checkpoint_every_minutes: float) -> None:
        self.every_s = checkpoint_every_minutes * 60.0
        self.last = time.monotonic()
        self.received: int | None = None
        self.interrupted = False  # a rank's stop was a Ctrl-C (``poll``)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored, not someone else's
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the step in flight finishes, then every rank checkpoints at the same step.
        self.received = signum

    def _on_interrupt(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: KeyboardInterrupt, now
        if os.environ.get("RANK", "0") != "0":  # the ranks of one job share a terminal: one notice
            return
        # os.write, not print: a handler that prints may interrupt a print of the main thread's
        os.write(2, b"\nflora-train: Ctrl-C: stopping after this step, once it is checkpointed "
                    b"(Ctrl-C again stops at once, losing the steps since the last checkpoint)\n")

    def poll(self) -> tuple[bool, bool]:
        """``(stop, checkpoint)`` for the step just finished, the same on every rank (collective).
        ``interrupted`` then says whether a rank's stop was a Ctrl-C."""
        due = self.every_s > 0 and fdist.rank() == 0 and time.monotonic() - self.last >= self.every_s
        flags = fdist.all_reduce(torch.tensor([float(self.received is not None), float(due),
                                               float(self.received == signal.SIGINT)]), "max")
        self.interrupted = bool(flags[2])
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

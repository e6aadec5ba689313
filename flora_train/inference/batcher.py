"""Dynamic batching for the server: concurrent requests of different users become one forward.

Request handlers put work on a bounded queue (a full one refuses: ``Overloaded``, the server's
429); one background thread takes the first waiting request, gathers whatever else arrives within
``window_s`` (up to ``max_batch`` prompts), groups it by generation settings, runs each group as
one mixed-user ``generate_batch`` and resolves every request's future. The model is only ever
touched by that thread; the queue is thread-safe and the counters are guarded by a lock.

A request whose caller went away (its future cancelled while queued) is dropped when its batch is
formed: the thread marks each future running first, which a cancelled one refuses, and a running
one can no longer be cancelled, so resolving it cannot raise. Anything that fails while a batch
runs fails that batch's requests only; the thread lives on (``alive`` is the server's liveness).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from flora_train.inference.generate import Generation, GenerationSettings, generate_batch
from flora_train.inference.trained import TrainedAdapters


class Overloaded(RuntimeError):
    """The queue is full: the caller should try again later."""


@dataclass
class Job:
    prompt: object
    user: str
    settings: GenerationSettings
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    batches: int = 0
    prompts: int = 0
    largest_batch: int = 0
    new_tokens: int = 0
    busy_s: float = 0.0
    dropped: int = 0  # requests cancelled before their batch ran
    failed: int = 0  # requests whose batch raised


class Batcher:
    def __init__(self, trained: TrainedAdapters, max_batch: int = 32, window_s: float = 0.01,
                 max_queue: int = 256) -> None:
        self.trained = trained
        self.max_batch = max_batch
        self.window_s = window_s
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._stats = BatchStats()
        self._thread = threading.Thread(target=self._loop, name="flora-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompt: object, user: str, settings: GenerationSettings) -> Future:
        """Queues a request; raises ``Overloaded`` when the queue is full."""
        job = Job(prompt, user, settings)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"{self._queue.maxsize} requests are waiting") from None
        return job.future

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def stats(self) -> BatchStats:
        with self._lock:
            return BatchStats(**vars(self._stats))

    def close(self) -> None:
        self._queue.put(None)  # (blocks while the queue is full: the thread drains it)
        self._thread.join(timeout=30)

    def _collect(self, first: Job) -> list[Job]:
        jobs, deadline = [first], time.monotonic() + self.window_s
        while len(jobs) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=max(left, 0)) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # close after this batch
                break
            jobs.append(job)
        return jobs

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = self._collect(first)
            live = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # False: cancelled, drop it
            with self._lock:
                self._stats.dropped += len(jobs) - len(live)
            groups: dict[GenerationSettings, list[Job]] = {}
            for job in live:
                groups.setdefault(job.settings, []).append(job)
            for settings, group in groups.items():
                self._run(settings, group)

    def _run(self, settings: GenerationSettings, group: list[Job]) -> None:
        start = time.perf_counter()
        try:
            results, _ = generate_batch(self.trained, [j.prompt for j in group], [j.user for j in group], settings)
        except Exception as exc:  # a bad request must not take the server down: its callers get the error
            with self._lock:
                self._stats.failed += len(group)
            for job in group:
                job.future.set_exception(exc)
            return
        with self._lock:
            s = self._stats
            s.batches += 1
            s.prompts += len(group)
            s.largest_batch = max(s.largest_batch, len(group))
            s.new_tokens += sum(r.tokens for r in results)
            s.busy_s += time.perf_counter() - start
        for job, result in zip(group, results):
            job.future.set_result(result)


__all__ = ["Batcher", "BatchStats", "Generation", "Job", "Overloaded"]

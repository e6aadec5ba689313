"""MLflow tracking, on rank 0 only, through an explicit ``MlflowClient`` (no fluent global run).

The embedded default is a SQLite store under the run directory; ``tracking.uri`` points at a
server. Only aggregates are logged as metrics (means, percentiles, counts), never a metric key
per user.

Training never waits on the tracking server. Every call to MLflow runs on one sender thread:
``log_metrics`` and ``log_artifact`` only append to a bounded in-memory queue (under a lock) and
wake the sender, so a server that is down, slow or hung (it accepts the connection and never
answers) costs the training step nothing. When the server cannot be reached the run goes on:
the sender keeps the metrics in memory and appends them to the run's tracking buffer
(``RunDir.tracking_buffer``), a warning says so, and every ``retry_s`` seconds it tries once to
open the run and send the backlog. A buffer left by a run that ended while the server was down
is sent by the next ``flora-train run --resume`` of that run directory. ``end`` waits a bounded
time for the sender; what it could not send stays in the buffer file.

``flora-train eval`` logs to a run of its own, nested under the training run
(``mlflow.parentRunId``), with a buffer file of its own: it never changes the training run's
status or its backlog.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from flora_train.errors import UserError, warn
from flora_train.mlflow_store import default_uri, mlflow_client, unreachable_errors
from flora_train.run_dir import RunDir

MAX_PARAM_LEN = 6000
BATCH = 900
FLUSH_EVERY_S = 10.0
MAX_QUEUED = 100_000  # metrics held in memory; past that they go to the buffer file only
SPILL = "tracking-buffer.jsonl"


class TrackingError(UserError):
    """The tracking store cannot be opened at all (not a server that is down: that is waited out)."""


class Tracker:
    """A no-op when disabled or not rank 0, so callers never branch on rank.

    ``kind``: "train" (the run's own MLflow run) or "eval" (a run nested under ``parent_run_id``,
    with its own buffer file). ``run_id``: the flora_train run id, kept as a tag."""

    def __init__(self, enabled: bool, uri: str | None, experiment: str, run_dir: Path, retry_s: float = 15.0,
                 kind: str = "train", parent_run_id: str | None = None, run_id: str | None = None,
                 client_factory: Callable[[str], Any] = mlflow_client, end_timeout_s: float = 30.0,
                 max_queued: int = MAX_QUEUED) -> None:
        # Only the process of global rank 0 talks to MLflow (RANK is set by torchrun and friends).
        self.enabled = enabled and int(os.environ.get("RANK", "0")) == 0
        self.uri = uri or default_uri(run_dir)
        self.own_store = uri is None  # the run's own SQLite file, not a store the user named
        # With a database store MLflow would put artifacts in ./mlruns of the current directory.
        self.artifact_location = RunDir(run_dir).mlartifacts.resolve().as_uri() if self.uri.startswith("sqlite:") else None
        self.experiment = experiment
        self.spill_path = RunDir(run_dir).tracking_buffer(kind)
        self.retry_s = retry_s
        self.end_timeout_s = end_timeout_s
        self.max_queued = max_queued
        self.parent_run_id = parent_run_id
        self.tags = {"flora_train.kind": kind, **({"flora_train.run_id": run_id} if run_id else {}),
                     **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
        self.run_id: str | None = None
        self._client_factory = client_factory
        self._client: Any = None
        # Shared with the sender thread, guarded by _lock: the queue, what of it is on disk, the
        # artifacts and the final status still to send, the online state.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._requested = 0  # tries asked for (log_metrics, flush, end) ...
        self._served = 0  # ... and how many of them the sender has made
        self._sender_done = False
        self._buffer: list[Any] = []
        self._spilled = 0  # how many of the queued metrics (from the head) are already in the buffer file
        self._disk_only = 0  # metrics past max_queued, kept in the buffer file only
        self._pending: dict[str, Any] | None = None  # the run still to be opened on the server
        self._artifacts: list[tuple[str, str | None]] = []
        self._final_status: str | None = None
        self._closed = False
        self._offline_since: float | None = None
        self._next_try = 0.0
        self._last_flush = time.monotonic()
        self._last_ok: float | None = None  # when a call to the server last succeeded
        self._thread: threading.Thread | None = None
        if self.uri.startswith(("http://", "https://")):
            # MLflow's defaults retry a dead server for minutes per call; the sender must come back.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")

    @property
    def offline(self) -> bool:
        return self._offline_since is not None

    @property
    def known_run_id(self) -> str | None:
        """The run's id, also while a resumed run waits for the server to reopen it."""
        with self._lock:
            return self.run_id or (self._pending or {}).get("resume")

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._buffer)

    def start(self, run_name: str | None, params: dict[str, str], recipe_yaml: Path, resume_run_id: str | None = None,
              wait_s: float = 2.0) -> str | None:
        """Opens (or reopens) the run on the sender thread; waits up to ``wait_s`` for it and
        returns its id, or None while the server has not answered."""
        if not self.enabled:
            return None
        try:
            self._client = self._client_factory(self.uri)
        except Exception as exc:  # a scheme MLflow has no store for, a SQLite file that is not one, a full disk
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if self.own_store:
                raise TrackingError(f"{self.uri.removeprefix('sqlite:///')}: MLflow cannot open the run's store: {detail} "
                                    "(move the file aside to start a new one, or set tracking.enabled=false to train "
                                    "without tracking)") from None
            raise TrackingError(f"tracking.uri={self.uri}: MLflow cannot open it: {detail} (set another tracking.uri, "
                                "or tracking.enabled=false to train without tracking)") from None
        self._pending = {"run_name": run_name, "params": params, "recipe": str(recipe_yaml), "resume": resume_run_id}
        self._load_spill()
        self._thread = threading.Thread(target=self._send_loop, name="flora-train-tracking", daemon=True)
        self._thread.start()
        self._request()
        self.drain(wait_s)
        return self.run_id

    # -- the training thread's side: append and wake, never wait ----------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int, flush: bool = False) -> None:
        if not self.enabled or self._client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        fresh = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        with self._lock:
            if self._closed:
                return
            room = max(self.max_queued - len(self._buffer), 0)
            self._buffer.extend(fresh[:room])
            if len(fresh) > room:  # the sender is far behind: keep the rest on disk for a later run
                self._spill_locked()
                self._append_spill(fresh[room:])
                if not self._disk_only:
                    warn(f"more than {self.max_queued} metrics wait for MLflow at {self.uri}; further metrics go to "
                         f"{self.spill_path} only, sent by the next `flora-train run --resume`")
                self._disk_only += len(fresh) - room
            due = flush or len(self._buffer) >= BATCH or time.monotonic() - self._last_flush >= FLUSH_EVERY_S
            if due or self._offline_since is not None:
                self._requested += 1
                self._cond.notify_all()

    def _request(self) -> None:
        with self._lock:
            self._requested += 1
            self._cond.notify_all()

    def flush(self) -> None:
        if self.enabled and self._client is not None:
            self._request()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled and self._client is not None:
            with self._lock:
                self._artifacts.append((str(path), artifact_path))
            self.flush()

    def drain(self, timeout: float) -> bool:
        """Waits up to ``timeout`` s for the sender to have tried everything queued so far."""
        if self._thread is None:
            return True
        with self._lock:
            target = self._requested
            return self._cond.wait_for(lambda: self._served >= target or self._sender_done, timeout)

    def end(self, status: str = "FINISHED") -> None:
        """Sends what is queued and marks the run ``status``, waiting at most ``end_timeout_s``;
        whatever is left is in the buffer file."""
        if not self.enabled or self._client is None or self._thread is None:
            return
        deadline = time.monotonic() + self.end_timeout_s
        with self._lock:
            self._final_status = status
        while True:
            with self._lock:
                self._next_try = 0.0  # one more try now, offline or not
                self._requested += 1
                self._cond.notify_all()
            finished = self.drain(max(deadline - time.monotonic(), 0.0))
            with self._lock:
                settled = self._final_status is None  # marked: everything before it was sent
                # A server that answered lately (a flaky one) is tried again until the deadline: one
                # failed call is no reason to leave the backlog and the run unmarked. One that has
                # not answered for as long (down) gets that one more try.
                answering = self._last_ok is not None and time.monotonic() - self._last_ok < self.end_timeout_s
            if settled or not finished or not answering or time.monotonic() >= deadline:
                break
            time.sleep(min(max(self.retry_s, 0.05), max(deadline - time.monotonic(), 0.0)))
        with self._lock:
            self._closed = True
            self._spill_locked()
            left = len(self._buffer) + self._disk_only
            marked = self._final_status is None
            self._cond.notify_all()
        if not finished or self.offline or not marked:
            why = "did not answer in time" if not finished else "is still unreachable"
            warn(f"MLflow at {self.uri} {why}: {left} metrics were not sent and the run is not marked {status}; they "
                 f"are in {self.spill_path} and are sent by the next `flora-train run --resume` of this run directory")

    # -- the sender thread ------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            with self._lock:
                # Woken by a request, or every FLUSH_EVERY_S to send what accumulated.
                self._cond.wait_for(lambda: self._requested > self._served or self._closed, timeout=FLUSH_EVERY_S)
                if self._closed:
                    self._sender_done = True
                    self._cond.notify_all()
                    return
                target = self._requested
                ending = self._final_status is not None
            self._attempt()
            with self._lock:
                self._served = target
                if ending and self._final_status is None:  # the run is marked: nothing more will come
                    self._sender_done = True
                self._cond.notify_all()
                if self._sender_done:
                    return

    def _open_run(self, p: dict[str, Any]) -> None:
        client = self._client
        if p["resume"]:
            client.update_run(p["resume"], status="RUNNING")
            run_id = p["resume"]
        else:
            exp_id = self._experiment_id(client)
            run_id = client.create_run(exp_id, run_name=p["run_name"], tags=self.tags).info.run_id
            from mlflow.entities import Param

            items = [Param(k, v[:MAX_PARAM_LEN]) for k, v in p["params"].items()]
            for i in range(0, len(items), 100):
                client.log_batch(run_id, params=items[i : i + 100])
            with self._lock:
                self._artifacts.insert(0, (p["recipe"], None))
        with self._lock:
            self.run_id = run_id
            self._pending = None

    def _experiment_id(self, client: Any) -> str:
        from mlflow.exceptions import MlflowException

        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(self.experiment, artifact_location=self.artifact_location)
        except MlflowException as exc:  # another run made it since we looked
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise exc from None
            return exp.experiment_id

    def _attempt(self) -> None:
        """One try at opening the run and sending the backlog; marks the tracker offline on failure.
        Network calls run outside the lock; only the sender removes from the queue's head."""
        now = time.monotonic()
        with self._lock:
            if self.offline and now < self._next_try:
                self._spill_locked()  # not time to retry yet: the new metrics go to disk too
                return
            pending = dict(self._pending) if self._pending is not None else None
        sent = 0
        try:
            if pending is not None:
                self._open_run(pending)
            while True:
                with self._lock:
                    batch = self._buffer[:BATCH]
                if not batch:
                    break
                self._client.log_batch(self.run_id, metrics=batch)
                with self._lock:
                    self._last_ok = time.monotonic()
                    del self._buffer[: len(batch)]
                    self._spilled = max(0, self._spilled - len(batch))
                sent += len(batch)
            while True:
                with self._lock:
                    item = self._artifacts[0] if self._artifacts else None
                if item is None:
                    break
                self._client.log_artifact(self.run_id, item[0], item[1])
                with self._lock:
                    self._artifacts.pop(0)
            with self._lock:
                status = self._final_status
            if status is not None:
                self._client.set_terminated(self.run_id, status=status)
                with self._lock:
                    self._final_status = None
        except unreachable_errors() as exc:
            with self._lock:
                if self._closed:
                    return
                if not self.offline:
                    self._offline_since = now
                    warn(f"MLflow at {self.uri} is unreachable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                         f"training goes on, metrics are kept in memory and in {self.spill_path} and sent when it is back")
                self._next_try = time.monotonic() + self.retry_s
                self._spill_locked()
            return
        with self._lock:
            self._last_ok = time.monotonic()
            if self._closed:
                return
            self._last_flush = now
            if self.offline:
                warn(f"MLflow at {self.uri} is reachable again; sent {sent} buffered metrics")
                self._offline_since = None
            if not self._buffer and not self._disk_only and self.spill_path.exists():
                self.spill_path.unlink()
                self._spilled = 0

    # -- the buffer file (callers hold the lock) ----------------------------------------------------

    def _append_spill(self, metrics: list[Any]) -> None:
        if not metrics:
            return
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        with self.spill_path.open("a") as f:
            for m in metrics:
                f.write(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n")

    def _spill_locked(self) -> None:
        """Appends the queued metrics not yet on disk to the buffer file (it survives a crash)."""
        self._append_spill(self._buffer[self._spilled :])
        self._spilled = len(self._buffer)

    def _load_spill(self) -> None:
        if not self.spill_path.is_file():
            return
        from mlflow.entities import Metric

        for line in self.spill_path.read_text().splitlines():
            try:
                d = json.loads(line)
                self._buffer.append(Metric(d["key"], float(d["value"]), int(d["timestamp"]), int(d["step"])))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
        self._spilled = len(self._buffer)

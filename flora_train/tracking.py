"""MLflow tracking, on rank 0 only, through an explicit ``MlflowClient`` (no fluent global run).

The embedded default is a SQLite store under the run directory; ``tracking.uri`` points at a
server. Metrics are buffered and sent in batches. Only aggregates are logged as metrics (means,
percentiles, counts), never a metric key per user.

Training never waits on the tracking server. When it cannot be reached (at start or mid-run), the
run goes on: metrics stay buffered in memory and are appended to ``<run_dir>/tracking-buffer.jsonl``,
a warning says so, and every ``retry_s`` seconds one attempt is made to open the run and send the
backlog. A buffer left by a run that ended while the server was down is sent by the next
``flora-train run --resume`` or ``flora-train eval`` of that run directory.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

MAX_PARAM_LEN = 6000
BATCH = 900
FLUSH_EVERY_S = 10.0
SPILL = "tracking-buffer.jsonl"


def default_uri(run_dir: Path) -> str:
    return f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"


def _warn(message: str) -> None:
    print(f"flora-train: warning: {message}", file=sys.stderr, flush=True)


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    return (MlflowException, RequestException, OSError)


class Tracker:
    """A no-op when disabled or not rank 0, so callers never branch on rank."""

    def __init__(self, enabled: bool, uri: str | None, experiment: str, run_dir: Path, retry_s: float = 15.0) -> None:
        # Only the process of global rank 0 talks to MLflow (RANK is set by torchrun and friends).
        self.enabled = enabled and int(os.environ.get("RANK", "0")) == 0
        self.uri = uri or default_uri(run_dir)
        # With a database store MLflow would put artifacts in ./mlruns of the current directory.
        self.artifact_location = (run_dir.resolve() / "mlartifacts").as_uri() if self.uri.startswith("sqlite:") else None
        self.experiment = experiment
        self.spill_path = run_dir / SPILL
        self.retry_s = retry_s
        self.run_id: str | None = None
        self._client: Any = None
        self._buffer: list[Any] = []
        self._spilled = 0  # how many of the buffered metrics are already in the spill file
        self._pending: dict[str, Any] | None = None  # the run still to be opened on the server
        self._artifacts: list[tuple[str, str | None]] = []
        self._offline_since: float | None = None
        self._next_try = 0.0
        self._last_flush = time.monotonic()
        if self.uri.startswith(("http://", "https://")):
            # MLflow's defaults retry a dead server for minutes per call; the run must not stall.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")

    @property
    def offline(self) -> bool:
        return self._offline_since is not None

    @property
    def known_run_id(self) -> str | None:
        """The run's id, also while a resumed run waits for the server to reopen it."""
        return self.run_id or (self._pending or {}).get("resume")

    def start(self, run_name: str | None, params: dict[str, str], recipe_yaml: Path, resume_run_id: str | None = None) -> str | None:
        """Opens (or reopens) the run; returns its id, or None while the server is unreachable."""
        if not self.enabled:
            return None
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        self._pending = {"run_name": run_name, "params": params, "recipe": str(recipe_yaml), "resume": resume_run_id}
        self._load_spill()
        self._attempt(force=True)
        return self.run_id

    def _open_run(self) -> None:
        assert self._pending is not None
        p, client = self._pending, self._client
        if p["resume"]:
            client.update_run(p["resume"], status="RUNNING")
            self.run_id = p["resume"]
        else:
            exp = client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(
                self.experiment, artifact_location=self.artifact_location
            )
            self.run_id = client.create_run(exp_id, run_name=p["run_name"]).info.run_id
            from mlflow.entities import Param

            items = [Param(k, v[:MAX_PARAM_LEN]) for k, v in p["params"].items()]
            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, params=items[i : i + 100])
            self._artifacts.insert(0, (p["recipe"], None))
        self._pending = None

    def _attempt(self, force: bool = False) -> None:
        """One try at opening the run and sending the backlog; marks the tracker offline on failure."""
        now = time.monotonic()
        if self.offline and not force and now < self._next_try:
            self._spill()  # not time to retry yet: the new metrics go to disk too
            return
        try:
            if self._pending is not None:
                self._open_run()
            sent = len(self._buffer)
            while self._buffer:
                self._client.log_batch(self.run_id, metrics=self._buffer[:BATCH])
                self._buffer = self._buffer[BATCH:]
                self._spilled = max(0, self._spilled - BATCH)
            while self._artifacts:
                path, folder = self._artifacts[0]
                self._client.log_artifact(self.run_id, path, folder)
                self._artifacts.pop(0)
        except _unreachable_errors() as exc:
            if not self.offline:
                self._offline_since = now
                _warn(f"MLflow at {self.uri} is unreachable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                      f"training goes on, metrics are kept in memory and in {self.spill_path} and sent when it is back")
            self._next_try = now + self.retry_s
            self._spill()
            return
        self._last_flush = now
        if self.offline:
            _warn(f"MLflow at {self.uri} is reachable again; sent {sent} buffered metrics")
            self._offline_since = None
        if self.spill_path.exists():
            self.spill_path.unlink()
        self._spilled = 0

    def _spill(self) -> None:
        """Appends the metrics not yet on disk to the spill file (it survives a crash)."""
        fresh = self._buffer[self._spilled :]
        if not fresh:
            return
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        with self.spill_path.open("a") as f:
            for m in fresh:
                f.write(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n")
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

    def log_metrics(self, metrics: dict[str, float], step: int, flush: bool = False) -> None:
        if not self.enabled or self._client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        due = time.monotonic() - self._last_flush >= FLUSH_EVERY_S
        if flush or due or len(self._buffer) >= BATCH:
            self.flush()
        elif self.offline:
            self._spill()

    def flush(self) -> None:
        if self.enabled and self._client is not None:
            self._attempt()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled and self._client is not None:
            self._artifacts.append((str(path), artifact_path))
            self._attempt()

    def end(self, status: str = "FINISHED") -> None:
        if not self.enabled or self._client is None:
            return
        self._attempt(force=True)
        if self.offline or self.run_id is None:
            _warn(f"MLflow at {self.uri} is still unreachable: {len(self._buffer)} metrics were not sent; they are "
                  f"in {self.spill_path} and are sent by the next `flora-train run --resume` or `flora-train eval` "
                  "of this run directory")
            return
        try:
            self._client.set_terminated(self.run_id, status=status)
        except _unreachable_errors() as exc:
            _warn(f"MLflow at {self.uri}: could not mark the run {status}: {exc}")

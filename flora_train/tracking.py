"""MLflow tracking, on rank 0 only, through an explicit ``MlflowClient`` (no fluent global run).

The embedded default is a SQLite store under the run directory; ``tracking.uri`` points at a
server. Metrics are buffered and sent in batches. Only aggregates are logged as metrics (means,
percentiles, counts), never a metric key per user.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000
BATCH = 900


def default_uri(run_dir: Path) -> str:
    return f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"


class Tracker:
    """A no-op when disabled or not rank 0, so callers never branch on rank."""

    def __init__(self, enabled: bool, uri: str | None, experiment: str, run_dir: Path) -> None:
        # Only the process of global rank 0 talks to MLflow (RANK is set by torchrun and friends).
        self.enabled = enabled and int(os.environ.get("RANK", "0")) == 0
        self.uri = uri or default_uri(run_dir)
        # With a database store MLflow would put artifacts in ./mlruns of the current directory.
        self.artifact_location = (run_dir.resolve() / "mlartifacts").as_uri() if self.uri.startswith("sqlite:") else None
        self.experiment = experiment
        self.run_id: str | None = None
        self._client: Any = None
        self._buffer: list[Any] = []

    def start(self, run_name: str | None, params: dict[str, str], recipe_yaml: Path, resume_run_id: str | None = None) -> str | None:
        if not self.enabled:
            return None
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        if resume_run_id:
            self.run_id = resume_run_id
            self._client.update_run(resume_run_id, status="RUNNING")
            return resume_run_id
        exp = self._client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(
            self.experiment, artifact_location=self.artifact_location
        )
        run = self._client.create_run(exp_id, run_name=run_name)
        self.run_id = run.info.run_id
        self.log_params(params)
        self._client.log_artifact(self.run_id, str(recipe_yaml))
        return self.run_id

    def log_params(self, params: dict[str, str]) -> None:
        if not self.enabled or self.run_id is None:
            return
        from mlflow.entities import Param

        items = [Param(k, v[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int, flush: bool = False) -> None:
        if not self.enabled or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if flush or len(self._buffer) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if not self._buffer or self.run_id is None:
            return
        while self._buffer:
            chunk, self._buffer = self._buffer[:BATCH], self._buffer[BATCH:]
            self._client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled and self.run_id is not None:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled and self.run_id is not None:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, v)

    def end(self, status: str = "FINISHED") -> None:
        if not self.enabled or self.run_id is None:
            return
        self.flush()
        self._client.set_terminated(self.run_id, status=status)

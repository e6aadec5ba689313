"""Tracking to a real `mlflow server` on 127.0.0.1, read back with MlflowClient."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.helpers import SMALL, flora_train

pytestmark = [pytest.mark.slow, pytest.mark.server]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"), start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(tmp_path / 'server.log').read_text()[-2000:]}")
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError("mlflow server did not answer /health in 120 s")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_run_logs_to_remote_server(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    flora_train(
        "run", "recipes/quickstart.yaml", *SMALL, f"run_dir={tmp_path / 'run'}", f"tracking.uri={mlflow_server}",
        "tracking.experiment=remote-test", "tracking.run_name=server-run", "train.compare_shared_baseline=true",
    )
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("remote-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "server-run" and run.info.status == "FINISHED"
    assert run.data.params["train.users_per_step"] == "8"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 3
    assert {"eval/accuracy_mean", "eval_shared/accuracy_mean", "data/skipped_rows"} <= set(run.data.metrics)
    assert "recipe.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not (tmp_path / "run" / "mlflow.db").exists(), "a remote URI must not create the embedded store"

"""Tracking to a real `mlflow server` on 127.0.0.1, read back with MlflowClient."""

import json
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


def start_server(port: int, root: Path) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:port with its store under root; returns once /health answers."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "a"), start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("mlflow server did not answer /health in 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # the server's workers are in its process group
    proc.wait(timeout=30)


class Server:
    """One real server for the module (each start costs 8-10 s): the outage test stops and
    restarts it on its port, and the fixture stops whichever process runs at the end."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = start_server(self.port, root)

    def stop(self) -> None:
        if self.proc is not None:
            stop_server(self.proc)
            self.proc = None

    def start(self) -> None:
        self.proc = start_server(self.port, self.root)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow-server"))
    yield s
    s.stop()


def test_run_logs_to_remote_server(server, tmp_path):
    from mlflow.tracking import MlflowClient

    flora_train(
        "run", "recipes/quickstart.yaml", *SMALL, f"run_dir={tmp_path / 'run'}", f"tracking.uri={server.url}",
        "tracking.experiment=remote-test", "tracking.run_name=server-run", "train.compare_shared_baseline=true",
    )
    client = MlflowClient(tracking_uri=server.url)
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


def test_metrics_survive_a_server_outage(server, tmp_path, capfd):
    """The server stops mid-run and comes back: nothing blocks, nothing is lost."""
    from mlflow.tracking import MlflowClient

    from flora_train.tracking import SPILL, Tracker

    url = server.url
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recipe = run_dir / "recipe.yaml"
    recipe.write_text("run_dir: x\n")
    tracker = Tracker(True, url, "outage", run_dir, retry_s=0.2)
    run_id = tracker.start("outage-run", {"a": "1"}, recipe)
    assert run_id is not None
    for step in range(3):
        tracker.log_metrics({"train/loss": float(step)}, step=step, flush=True)
    assert tracker.drain(60) and tracker.queued == 0  # sent before the outage
    server.stop()
    started = time.monotonic()
    for step in range(3, 8):
        tracker.log_metrics({"train/loss": float(step)}, step=step, flush=True)
    assert time.monotonic() - started < 1, "logging must not stall while the server is down"
    assert tracker.drain(60)  # the sender has tried (and spilled) what was logged
    assert tracker.offline and (run_dir / SPILL).is_file()
    assert len((run_dir / SPILL).read_text().splitlines()) == 5
    assert "is unreachable" in capfd.readouterr().err
    server.start()
    time.sleep(0.3)
    tracker.log_metrics({"train/loss": 8.0}, step=8, flush=True)
    tracker.drain(60)  # past retry_s: the sender reconnects when it is next woken
    tracker.end("FINISHED")
    assert not tracker.offline and not (run_dir / SPILL).exists()
    assert "reachable again; sent 6 buffered metrics" in capfd.readouterr().err
    client = MlflowClient(tracking_uri=url)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(9))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_training_runs_with_the_server_down_from_the_start(tmp_path):
    dead = f"http://127.0.0.1:{_free_port()}"
    proc = flora_train("run", "recipes/quickstart.yaml", *SMALL, f"run_dir={tmp_path / 'run'}", f"tracking.uri={dead}",
                       "train.compare_shared_baseline=false")
    assert "is unreachable" in proc.stderr and "still unreachable" in proc.stderr
    lines = (tmp_path / "run" / "tracking-buffer.jsonl").read_text().splitlines()
    assert {"train/loss", "eval/accuracy_mean"} <= {json.loads(line)["key"] for line in lines}
    assert (tmp_path / "run" / "result.json").is_file()

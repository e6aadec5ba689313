"""The tracker's sender thread: a hung server costs the training thread nothing, and the queue it
shares with the sender loses and repeats nothing under a flaky server."""

import json
import random
import socket
import threading
import time
from pathlib import Path

import pytest

from flora_train.tracking import Tracker


@pytest.fixture
def hung_server():
    """A socket that accepts every connection and never answers (a server stuck in GC, a proxy
    whose upstream hangs)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held, stop = [], threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


def test_a_hung_server_costs_the_training_thread_nothing(tmp_path, hung_server, monkeypatch, capfd):
    # Before the sender thread every flushed log_metrics waited on the server for the HTTP timeout
    # (15 s by default) on the training thread.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("run_dir: x\n")
    tracker = Tracker(True, hung_server, "hung", tmp_path, end_timeout_s=1.0)
    import mlflow.entities  # noqa: F401  (its import takes seconds: not the server's doing)
    import mlflow.tracking  # noqa: F401

    started = time.monotonic()
    assert tracker.start("hung-run", {"a": "1"}, recipe, wait_s=0.5) is None
    assert time.monotonic() - started < 3
    worst = 0.0
    for step in range(200):
        t = time.monotonic()
        tracker.log_metrics({"train/loss": float(step), "train/tokens": 1.0}, step=step, flush=True)
        worst = max(worst, time.monotonic() - t)
    assert worst < 0.05, f"a log call took {worst:.3f} s"
    t = time.monotonic()
    tracker.end("FINISHED")
    assert time.monotonic() - t < 3, "end waits a bounded time"
    lines = [json.loads(line) for line in tracker.spill_path.read_text().splitlines()]
    assert len(lines) == 400 and [m["step"] for m in lines[::2]] == list(range(200))
    assert "did not answer in time: 400 metrics were not sent" in capfd.readouterr().err


class FlakyClient:
    """Stands in for MlflowClient (no real server can be made to fail at random, call by call):
    records what arrives, fails a third of the calls, answers after a random delay."""

    def __init__(self, uri):
        self.received, self.rng, self.lock = [], random.Random(0), threading.Lock()
        self.terminated = None

    def _maybe_fail(self):
        time.sleep(self.rng.random() * 0.002)
        if self.rng.random() < 0.33:
            raise OSError("connection reset")

    def get_experiment_by_name(self, name):
        self._maybe_fail()
        return None

    def create_experiment(self, name, artifact_location=None):
        return "1"

    def create_run(self, exp_id, run_name=None, tags=None):
        class Run:
            class info:
                run_id = "r1"

        return Run

    def log_batch(self, run_id, metrics=(), params=()):
        self._maybe_fail()
        with self.lock:
            self.received.extend(metrics)

    def log_artifact(self, run_id, path, folder=None):
        self._maybe_fail()

    def set_terminated(self, run_id, status):
        self._maybe_fail()
        self.terminated = status


def test_the_queue_shared_with_the_sender_loses_and_repeats_nothing(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("x: 1\n")
    clients = []

    def factory(uri):
        clients.append(FlakyClient(uri))
        return clients[-1]

    tracker = Tracker(True, "http://flaky", "stress", tmp_path, retry_s=0.0, client_factory=factory, end_timeout_s=60)
    tracker.start("stress", {}, recipe, wait_s=0)

    def producer(k):
        for step in range(3000):
            tracker.log_metrics({f"p{k}": float(step)}, step=step, flush=step % 7 == 0)

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tracker.end("FINISHED")
    got = clients[0].received
    for k in range(3):
        assert [m.step for m in got if m.key == f"p{k}"] == list(range(3000)), f"producer {k}: lost, repeated or reordered"
    assert len(got) == 9000 and clients[0].terminated == "FINISHED"
    assert not tracker.spill_path.exists(), "everything was sent: no backlog left on disk"


def test_a_store_mlflow_cannot_open_is_one_error_naming_it(tmp_path):
    """A run's mlflow.db that is not a database (or a full disk under it), and a tracking.uri of a
    scheme MLflow has no store for, ended in SQLAlchemy's or MLflow's traceback when the run started."""
    from flora_train.errors import UserError  # what the CLI prints as one line
    from flora_train.run_dir import RunDir

    RunDir(tmp_path).mlflow_db.write_text("garbage")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}")
    with pytest.raises(UserError, match=rf"^{tmp_path}/mlflow.db: MLflow cannot open the run's store: "
                                            r"\(sqlite3.DatabaseError\) file is not a database \(move the file aside"):
        Tracker(True, None, "e", tmp_path).start(None, {}, recipe)
    with pytest.raises(UserError, match=r"^tracking.uri=foo://x: MLflow cannot open it: .*unsupported URI 'foo://x'"):
        Tracker(True, "foo://x", "e", tmp_path).start(None, {}, recipe)


def _open_shared_store(uri: str, run_dir: str, go, results) -> None:
    recipe = Path(run_dir) / "recipe.yaml"
    recipe.write_text("{}")
    go.wait()
    try:
        tracker = Tracker(True, uri, "sweep", Path(run_dir))
        run_id = tracker.start(None, {"k": "v"}, recipe, wait_s=60.0)
        tracker.end()
        results.put(run_id or "no run id")
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        results.put(f"{type(exc).__name__}: {exc}")


def test_runs_opening_one_new_sqlite_store_at_once_all_start(tmp_path):
    """Jobs of a sweep sharing tracking.uri=sqlite:///shared.db, started together: the first client
    of a new SQLite store makes its tables, and the others failed in MLflow's migrations ('table
    experiments already exists', 'duplicate column name: step'; 8 of 9 openers in three rounds of
    three). Each now gets its run, in the one experiment."""
    import multiprocessing as mp

    import mlflow.tracking  # noqa: F401 - imported once here, before the fork, not by each child

    ctx = mp.get_context("fork")
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    go, results = ctx.Event(), ctx.Queue()
    procs = []
    for k in range(3):
        (tmp_path / f"run{k}").mkdir()
        procs.append(ctx.Process(target=_open_shared_store, args=(uri, str(tmp_path / f"run{k}"), go, results)))
    for p in procs:
        p.start()
    go.set()
    try:
        got = [results.get(timeout=120) for _ in procs]
    finally:  # a child that hangs or dies is not left behind by a failed test
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(len(r) == 32 for r in got), got  # MLflow run ids
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(got)

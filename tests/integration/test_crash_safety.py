"""Nothing trained is lost: SIGKILL at a random step (1 process; 2 processes under torchrun
--max-restarts), a kill in the middle of a checkpoint save, and a full disk. Each resumed run ends
with exactly the adapters of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flora_train.run_dir.checkpoints import latest_checkpoint, list_checkpoints, verify_checkpoint

from tests.distributed.helpers import saved_state
from tests.e2e.helpers import SMALL

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("crash_driver.py")
# Long enough (about 100 steps) that a kill lands mid-run; checkpoints every 4 steps, keep 1.
LONG = [*SMALL, "train.epochs=16", "train.checkpoint_every_steps=4", "train.keep_checkpoints=1",
        "train.compare_shared_baseline=false", "export.format=none"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def _cli(run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "flora_train.cli", "run", "recipes/quickstart.yaml", *LONG, f"run_dir={run_dir}", *extra]


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600, **kw)


def assert_bitwise_equal(got: dict, want: dict) -> float:
    assert set(got) == set(want)
    worst = 0.0
    for user, cols in want.items():
        for key, value in cols.items():
            assert torch.equal(got[user][key], value), (user, key)
            worst = max(worst, float((got[user][key].double() - value.double()).abs().max()))
    return worst


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = _run(_cli(run_dir, "--resume"))  # --resume with nothing to resume starts the run (a requeued job's first round)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{run_dir} holds no checkpoint to resume from: training from step 0" in proc.stdout  # (it was silent)
    return run_dir, saved_state(run_dir), json.loads((run_dir / "result.json").read_text())["steps"]


def _wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, at_least: int = 1, step: int = 0) -> None:
    """Until ``at_least`` checkpoints exist and the newest is of ``step`` or later."""
    deadline = time.time() + 300
    while True:
        found = list_checkpoints(run_dir / "checkpoints")
        if len(found) >= at_least and int(found[-1].name.split("-")[1]) >= step:
            return
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)


def test_sigkill_at_a_random_step_then_resume(tmp_path, reference):
    ref_dir, ref_state, total = reference
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, *_cli(run_dir)], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # A random step of the first half (a random wait in seconds let a fast machine finish first).
    _wait_for_checkpoint(run_dir, proc, step=random.Random().randrange(4, total // 2))
    time.sleep(random.Random().uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest_checkpoint(run_dir)
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < total
    run_id = json.loads((killed_at / "trainer_state.json").read_text())["mlflow_run_id"]
    resumed = _run(_cli(run_dir, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {killed_at}" in resumed.stdout
    assert assert_bitwise_equal(saved_state(run_dir), ref_state) == 0.0
    result = json.loads((run_dir / "result.json").read_text())
    assert result["mlflow_run_id"] == run_id  # the same MLflow run continues
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    assert len(client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])) == 1
    assert max(m.step for m in client.get_metric_history(run_id, "train/loss")) == total


def test_one_rank_killed_torchrun_restarts_and_resumes(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    common = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    ref = subprocess.run([*common, *_cli(ref_dir, "tracking.enabled=false")], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    agent = subprocess.Popen([*common, "--max-restarts=1", *_cli(run_dir, "tracking.enabled=false")], cwd=REPO,
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    total = json.loads((ref_dir / "result.json").read_text())["steps"]
    _wait_for_checkpoint(run_dir, agent, step=random.Random().randrange(4, total // 2))
    time.sleep(random.Random().uniform(0.0, 0.05))
    workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[1]), signal.SIGKILL)  # rank 1's process
    try:
        out, _ = agent.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(agent.pid, signal.SIGKILL)
        out, _ = agent.communicate()
        raise AssertionError(f"the restarted job did not finish:\n{out[-6000:]}") from None
    assert agent.returncode == 0, out[-4000:]
    assert "resuming from" in out
    assert assert_bitwise_equal(saved_state(run_dir), saved_state(ref_dir)) == 0.0


def test_kill_during_a_delta_then_during_a_compaction_keeps_the_previous_checkpoint(tmp_path, reference):
    """Checkpoints every 4 steps, chains of at most 2. The first run is killed while writing its
    second checkpoint, a delta (step 8): step 4 stays the latest. Its resume writes step 8 (a delta
    on 4) and is killed while writing step 12, a compaction into a full checkpoint: step 8 and the
    step 4 it builds on both stay (keep_checkpoints=1). The last resume ends bitwise equal to an
    uninterrupted run."""
    _, ref_state, _ = reference
    run_dir = tmp_path / "run"
    chains = {"a delta": (["step-00000004"], 8), "a compaction": (["step-00000004", "step-00000008"], 12)}
    for what, (chain, half_step) in chains.items():
        resume = ["--resume"] if what == "a compaction" else []
        proc = subprocess.run([sys.executable, str(DRIVER), *_cli(run_dir, *resume, "train.full_checkpoint_every=2")[2:]],
                              cwd=REPO, env={**_env(), "FLORA_TEST_FAULT": "kill_in_save:2"}, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == -signal.SIGKILL, (what, proc.stderr[-2000:])
        latest = latest_checkpoint(run_dir)
        assert latest is not None and latest.name == chain[-1], what
        assert verify_checkpoint(latest).get("chain", chain) == chain, what
        assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == chain, what
        assert (run_dir / "checkpoints" / f".tmp-step-{half_step:08d}").is_dir(), what  # the half-written one, never used
    resumed = _run(_cli(run_dir, "--resume", "train.full_checkpoint_every=2"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert assert_bitwise_equal(saved_state(run_dir), ref_state) == 0.0
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_disk_full_stops_the_run_with_its_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(DRIVER), *_cli(run_dir)[2:]], cwd=REPO,
                          env={**_env(), "FLORA_TEST_FAULT": "enospc_on_save:2"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "writing checkpoint step-00000008 failed" in proc.stderr and "No space left on device" in proc.stderr
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-00000004"]
    assert not (run_dir / "result.json").exists()  # it stopped; it did not train on without a safe point

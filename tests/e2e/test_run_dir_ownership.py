"""One run directory, one owner, one run: through the real CLI, as a team uses runs on a shared
filesystem. Each of these went through before the run directory had a lock and a run id: a second
`run` beside a live one exited 0, `eval` opened (and truncated) the live run's disk tier, `forget`
rewrote checkpoints under it; a rerun with another learning rate left the old run's checkpoints
as the newest, which export then used; a flipped byte in the newest checkpoint made every reader
use the previous one without a word; eval marked the training run FINISHED and sent, then deleted,
its tracking backlog."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flora_train.run_dir.checkpoints import list_checkpoints, read_manifest
from tests.e2e.helpers import REPO, SMALL, flora_train

pytestmark = pytest.mark.slow


def _error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("flora-train: error:")]
    return line


def test_one_writer_and_a_rerun_never_mixes_two_runs(tmp_path):
    run_dir = tmp_path / "run"
    # (No scoring and no shared baseline: nothing here reads them, and they doubled the runs' time.)
    recipe = ["recipes/quickstart.yaml", *SMALL, f"run_dir={run_dir}", "tracking.enabled=false", "export.format=flora",
              "train.checkpoint_every_steps=6", "train.full_checkpoint_every=1", "eval.at_end=false",
              "train.compare_shared_baseline=false"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    # Long enough to outlive the refused commands (6 steps an epoch), short enough to plan in a moment:
    # planning 100,000 epochs (total steps, each user's steps) cost the live run tens of seconds.
    long = "train.epochs=2000"
    live = subprocess.Popen([sys.executable, "-m", "flora_train.cli", "run", *recipe, long], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not list_checkpoints(run_dir) and live.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert live.poll() is None and list_checkpoints(run_dir), "the live run should be training and checkpointing"
        holder = f"pid {live.pid} on host"
        for command in (["run", *recipe, long], ["eval", str(run_dir)],
                        ["forget", str(run_dir), "--users", "user-000001"]):
            line = _error_line(flora_train(*command, check=False))
            assert "in use by `flora-train run recipes/quickstart.yaml" in line and holder in line, line
    finally:
        os.killpg(live.pid, signal.SIGKILL)  # a crash: the kernel drops its lock
        live.wait()
    at = read_manifest(list_checkpoints(run_dir)[-1])["step"]
    old_id = read_manifest(list_checkpoints(run_dir)[-1])["run_id"]
    resumed = flora_train("run", *recipe, long, f"train.max_steps={at + 2}", "--resume")
    assert f"at step {at}" in resumed.stdout  # a dead holder never blocks

    line = _error_line(flora_train("run", *recipe, "store.optimizer.lr=0.002", check=False))
    assert "already holds a run's checkpoints" in line and "--resume" in line and "train.overwrite=true" in line
    line = _error_line(flora_train("run", *recipe, long, f"train.max_steps={at + 4}",
                                   "store.optimizer.lr=0.002", "adapter.alpha=8", "--resume", check=False))
    assert "store.optimizer.lr: 0.05 -> 0.002" in line and "adapter.alpha: 16.0 -> 8.0" in line, line

    fresh = flora_train("run", *recipe, "store.optimizer.lr=0.002", "train.overwrite=true")
    assert "moved the previous run" in fresh.stdout
    (moved,) = (run_dir / "replaced").iterdir()
    assert moved.name.startswith(old_id) and len(list_checkpoints(moved)) >= 1
    new = [read_manifest(c) for c in list_checkpoints(run_dir)]
    assert new and {m["run_id"] for m in new} != {old_id} and len({m["run_id"] for m in new}) == 1
    final = json.loads((run_dir / "result.json").read_text())["checkpoint"]
    assert json.loads((run_dir / "export" / "flora" / "manifest.json").read_text())["checkpoint"] == final
    exported = flora_train("export", str(run_dir), "--format", "flora", "--out", str(tmp_path / "out"))
    assert "warning" not in exported.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["checkpoint"] == final

    # A run directory moved (a rename, another disk) keeps its exports: exporting into its own
    # export/ again is no "export of another run", and forget reaches the export outside it (both
    # went by the checkpoint path the export recorded: the first was refused, the second left the
    # forgotten user in tmp/out).
    moved = tmp_path / "moved"
    os.replace(run_dir, moved)
    again = flora_train("export", str(moved), "--format", "flora", "--out", str(moved / "export" / "flora"))
    assert "exported 24 users" in again.stdout, again.stderr[-2000:]
    forgot = flora_train("forget", str(moved), "--users", "user-000002")
    assert f"also removed from the exports outside the run: {tmp_path / 'out'}" in forgot.stdout, forgot.stdout
    assert "user-000002" not in json.loads((tmp_path / "out" / "index.json").read_text())


def _digest(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_corrupt_newest_checkpoint_is_named_and_eval_keeps_to_its_own_run(tmp_path, capfd):
    from mlflow.tracking import MlflowClient

    from flora_train.inference.trained import resolve_source

    run_dir = tmp_path / "run"
    recipe = ["recipes/quickstart.yaml", *SMALL, f"run_dir={run_dir}", "export.format=none", "store.tier=disk",
              "train.checkpoint_every_steps=4", "train.full_checkpoint_every=1", "train.keep_checkpoints=3"]
    flora_train("run", *recipe)
    trained = json.loads((run_dir / "result.json").read_text())
    *_, previous, newest = list_checkpoints(run_dir)
    shard = newest / "store-00000-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte, same size
    shard.write_bytes(bytes(data))
    named = [f"skipping a broken checkpoint: {shard}: does not match the manifest",
             f"using {previous}, the newest intact checkpoint"]

    # What the trainer left for MLflow must stay its own: its status and its backlog.
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    client.set_terminated(trained["mlflow_run_id"], status="FAILED")
    backlog = run_dir / "tracking-buffer.jsonl"
    backlog.write_text(json.dumps({"key": "train/loss", "value": 1.0, "timestamp": 1, "step": 1}) + "\n")
    tier = _digest(run_dir / "store_tier")

    for command in (["export", str(run_dir), "--format", "packed", "--out", str(tmp_path / "packed")],
                    ["users", str(run_dir)], ["eval", str(run_dir)]):
        err = flora_train(*command).stderr
        assert all(n in err for n in named), (command, err)
    resolve_source(run_dir)  # what generate and serve load
    err = capfd.readouterr().err
    assert all(n in err for n in named), err

    assert _digest(run_dir / "store_tier") == tier, "eval must never open the run's store tier"
    assert client.get_run(trained["mlflow_run_id"]).info.status == "FAILED"
    assert backlog.read_text().count("\n") == 1
    (child,) = client.search_runs([client.get_run(trained["mlflow_run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{trained['mlflow_run_id']}'")
    assert child.info.status == "FINISHED" and "eval/loss_mean" in child.data.metrics
    assert child.data.params["checkpoint"] == str(previous)

    resumed = flora_train("run", *recipe, "--resume")
    assert all(n in resumed.stderr for n in named) and f"resuming from {previous}" in resumed.stdout

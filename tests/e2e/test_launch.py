"""`flora-train launch`: local torchrun, a real Slurm on localhost, dry runs, and hostile values."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from flora_train.config import load_recipe
from flora_train.launch.job import make_job
from flora_train.launch.slurm import render

from tests.e2e.helpers import REPO, SMALL
from tests.e2e.slurm_cluster import start_cluster, stop_cluster

pytestmark = pytest.mark.slow
HOSTILE = ["$(touch {marker})", "'; touch {marker}; '", "`touch {marker}`", 'a"b\\c $HOME']


def launch(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "flora_train.cli", "launch", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_prints_what_would_run_and_starts_nothing(tmp_path):
    run_dir = tmp_path / "r"
    local = launch("recipes/quickstart.yaml", f"run_dir={run_dir}", "--nodes", "2", "--procs-per-node", "2", "--dry-run")
    assert local.returncode == 0, local.stderr
    assert local.stdout.count("flora_train.launch.torchrun --nnodes=2") == 2 and "--node-rank=1" in local.stdout
    slurm = launch("recipes/quickstart.yaml", f"run_dir={run_dir}", "--scheduler", "slurm", "--nodes", "4",
                   "--gpus-per-node", "8", "--procs-per-node", "8", "--partition", "gpu", "--dry-run",
                   env={"PATH": "/nonexistent"})  # a dry run needs no sbatch
    assert slurm.returncode == 0, slurm.stderr
    assert "would run: sbatch --parsable --job-name=flora-r --nodes=4" in slurm.stdout
    assert "--gpus-per-node=8 --partition=gpu" in slurm.stdout and "--nproc-per-node=8" in slurm.stdout
    assert not run_dir.exists()


def test_recipe_values_reach_the_job_as_literal_strings(tmp_path):
    """The rendered script runs under bash with shims for srun/scontrol: no hostile value executes,
    each arrives byte for byte."""
    marker = tmp_path / "pwned"
    values = [v.format(marker=marker) for v in HOSTILE]
    run_dir = tmp_path / values[0]
    recipe = tmp_path / "hostile.yaml"
    recipe.write_text(yaml.safe_dump({"run_dir": str(run_dir), "base": {"tiny": {}}, "data": {"synthetic": {}},
                                      "launch": {"env": {f"V{i}": v for i, v in enumerate(values)}}}))
    cfg = load_recipe(recipe)
    assert [cfg.launch.env[f"V{i}"] for i in range(len(values))] == values
    job = make_job(cfg)
    _, script = render(job)
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "scontrol").write_text("#!/bin/sh\necho localhost\n")
    (shims / "srun").write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                                f"json.dump({{'argv': sys.argv, 'env': {{k: v for k, v in os.environ.items() if k.startswith('V')}}}}, "
                                f"open({str(tmp_path / 'seen.json')!r}, 'w'))\n")
    for shim in shims.iterdir():
        shim.chmod(0o755)
    (tmp_path / "job.sh").write_text(script)
    proc = subprocess.run(["bash", str(tmp_path / "job.sh")], env={"PATH": f"{shims}:/usr/bin:/bin", "SLURM_JOB_ID": "7",
                          "SLURM_JOB_NODELIST": "localhost"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["env"] == {f"V{i}": v for i, v in enumerate(values)}
    assert seen["argv"][-1] == str(job.recipe_path) and values[0] in seen["argv"][-1]


def test_bad_recipe_or_missing_sbatch_submits_nothing(tmp_path):
    proc = launch("recipes/quickstart.yaml", f"run_dir={tmp_path / 'r'}", "train.epoch=3", "--scheduler", "slurm")
    assert proc.returncode == 2 and "unknown key 'train.epoch'" in proc.stderr
    proc = launch("recipes/quickstart.yaml", f"run_dir={tmp_path / 'r'}", "--scheduler", "slurm", env={"PATH": "/nonexistent"})
    assert proc.returncode == 2 and "sbatch not found on PATH" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_local_scheduler_returns_a_failed_jobs_exit_code(tmp_path):
    # A job that succeeds returns 0 through the local scheduler: the preemption test's reference run.
    # Data that is not there stops the launch before any process starts.
    missing = launch("recipes/quickstart.yaml", f"run_dir={tmp_path / 'missing'}", "data.synthetic=null",
                     f"data.train_path={tmp_path / 'missing.jsonl'}")
    assert missing.returncode == 2 and not (tmp_path / "missing" / "launch").exists()
    assert f"data.train_path: data file not found: {tmp_path / 'missing.jsonl'} (checked before starting" in missing.stderr
    # A job whose ranks fail on a bad row: their error, torchrun's one line with the rank's exit
    # code (2: bad input), and no traceback from torchrun. Bad input fails every round alike, so
    # the job is not restarted (launch.max_restarts=3 ran it four times, printing it each time).
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"user_id": "u1", "prompt": "a", "completion": " b"}\nnot json\n')
    bad = launch("recipes/quickstart.yaml", *SMALL, f"run_dir={tmp_path / 'bad'}", "data.synthetic=null",
                 f"data.train_path={bad_rows}", "--procs-per-node", "2", "launch.max_restarts=3")
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert f"{bad_rows}:2" in bad.stderr and "the job failed: rank " in bad.stderr and "exited with code 2" in bad.stderr
    assert "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert 1 <= bad.stderr.count(f"flora-train: error: {bad_rows}:2") <= 2, bad.stderr[-3000:]  # one round: each rank once at most
    # Training that went non-finite (3) stops the same way again from the same checkpoint (resume is
    # bitwise): it is not restarted either (it ran four times, each printing 'training stopped').
    diverged = launch("recipes/quickstart.yaml", *SMALL, f"run_dir={tmp_path / 'diverged'}", "train.nonfinite=error",
                      "store.optimizer.lr=1e30", "launch.max_restarts=3")
    assert diverged.returncode == 3, diverged.stderr[-3000:]
    assert diverged.stderr.count("flora-train: training stopped: non-finite loss") == 1, diverged.stderr[-3000:]
    assert "exited with code 3" in diverged.stderr and "Traceback" not in diverged.stderr, diverged.stderr[-3000:]
    # Ctrl-C in a terminal reaches the launcher and the job (one process group): the launcher waits
    # for the job to checkpoint and stop. (It left at once, its prompt back while ranks still wrote.)
    run_dir = tmp_path / "ctrl-c"
    job = subprocess.Popen([sys.executable, "-m", "flora_train.cli", "launch", "recipes/quickstart.yaml", *SMALL,
                            "train.epochs=200", f"run_dir={run_dir}", "tracking.enabled=false"],
                           cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "recipe.yaml").exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # rank 0 writes it as training starts
        time.sleep(0.5)
        os.killpg(job.pid, signal.SIGINT)
        out, err = job.communicate(timeout=120)
        left = subprocess.run(["pgrep", "-g", str(job.pid)], capture_output=True, text=True).stdout.split()
    finally:  # the launcher, torchrun and its ranks (one session) must not outlive a failed test
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        job.wait()
    assert job.returncode == 130 and not left, (job.returncode, left, err[-3000:])
    assert "waiting for the job to checkpoint and stop" in err and "stopped by Ctrl-C after step" in err, err[-3000:]
    assert list((run_dir / "checkpoints").glob("step-*")), err[-3000:]


def test_a_node_whose_peer_failed_on_bad_input_ends_in_one_line(tmp_path):
    """Two nodes on loopback: node 0's rank fails on bad input (2) and its agent, which hosts the
    rendezvous, ends the job at once; node 1's rank fails otherwise (4, a lost peer) and its agent,
    ready to restart, finds the rendezvous gone. It says so in one line, not torchrun's traceback."""
    from tests.distributed.test_launchers import _free_port

    (tmp_path / "bad_input.py").write_text("import sys\nsys.exit(2)\n")
    (tmp_path / "lost_peer.py").write_text("import sys, time\ntime.sleep(3)\nsys.exit(4)\n")
    port, env = _free_port(), {**os.environ, "PYTHONPATH": str(REPO)}
    agents = [subprocess.Popen([sys.executable, "-m", "flora_train.launch.torchrun", "--nnodes=2", "--nproc-per-node=1",
                                "--max-restarts=3", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                                f"--rdzv-id=job{port}", f"--rdzv-conf=is_host={int(node == 0)}", script],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for node, script in enumerate(("bad_input.py", "lost_peer.py"))]
    try:
        outs = [agent.communicate(timeout=120)[0] for agent in agents]
    finally:  # a hung agent never outlives the test
        for agent in agents:
            agent.kill()
    assert [a.returncode for a in agents] == [2, 1], outs
    assert "the job failed: rank 0 exited with code 2" in outs[0] and outs[0].count("will restart worker group") == 0
    assert "flora-train launch: the job ended on another node, whose output says why" in outs[1], outs[1][-3000:]
    assert "Traceback" not in outs[1], outs[1][-3000:]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    env, pids = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield env
    stop_cluster(pids)


def test_a_failed_slurm_job_returns_its_exit_code_and_cause(slurm, tmp_path):
    # (A job that completes, with its tracking and export, is the preemption test's Slurm job.)
    bad = launch("recipes/quickstart.yaml", f"run_dir={tmp_path / 'bad'}", "data.synthetic=null",
                 f"data.train_path={tmp_path / 'missing.jsonl'}", "--scheduler", "slurm", "launch.cpus_per_proc=1",
                 "launch.max_restarts=0", "--wait", env=slurm)
    assert bad.returncode != 0 and "ended: FAILED" in bad.stdout and "flora-train: error:" in bad.stdout
    assert "exited with code 2" in bad.stdout and "Traceback" not in bad.stdout, bad.stdout[-3000:]

    # Ctrl-C while --wait follows a job stops the waiting, not the job (it ended in a traceback)
    waiting = subprocess.Popen(
        [sys.executable, "-m", "flora_train.cli", "launch", "recipes/quickstart.yaml", *SMALL,
         f"run_dir={tmp_path / 'waited'}", "--scheduler", "slurm", "launch.cpus_per_proc=1", "--wait"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **slurm},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    job_id = None
    try:
        submitted = ""
        while not submitted.startswith("submitted Slurm job") and waiting.poll() is None:
            submitted = waiting.stdout.readline()
        job_id = submitted.split()[3].rstrip(";")
        time.sleep(1)
        waiting.send_signal(signal.SIGINT)
        out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 130 and "Traceback" not in err, (submitted + out, err[-3000:])
        assert f"stopped waiting; Slurm job {job_id} goes on" in out and f"`scancel {job_id}` stops it" in out, out
        shown = subprocess.run(["scontrol", "show", "job", job_id], env=slurm, capture_output=True, text=True).stdout
        assert re.search(r"JobState=(PENDING|RUNNING|COMPLETING|COMPLETED)", shown), shown
    finally:  # neither the launcher nor its job outlives the test
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
        if job_id is not None:
            subprocess.run(["scancel", job_id], env={**os.environ, **slurm})


def test_srun_starts_flora_train_directly(slurm, tmp_path):
    """`srun -n 2 flora-train run ...`: the process group comes from SLURM_* alone."""
    run_dir = tmp_path / "srun"
    proc = subprocess.run(
        ["srun", "-n", "2", sys.executable, "-m", "flora_train.cli", "run", "recipes/quickstart.yaml", *SMALL,
         f"run_dir={run_dir}", "tracking.enabled=false", "train.compare_shared_baseline=false", "base.zero_stage=3"],
        cwd=REPO, env={**os.environ, **slurm, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["base"]["launcher"] == "srun" and result["base"]["world_size"] == 2


def test_k8s_writes_the_manifest_and_applies_it_with_kubectl(tmp_path):
    run_dir = tmp_path / "k"
    args = ["recipes/quickstart.yaml", f"run_dir={run_dir}", "--scheduler", "k8s", "--nodes", "2",
            "launch.volume_claim=runs"]
    dry = launch(*args, "--dry-run")
    assert dry.returncode == 0 and "kind: PyTorchJob" in dry.stdout and "kind: ConfigMap" in dry.stdout
    assert not run_dir.exists()
    missing = launch(*args, env={"PATH": "/nonexistent"})
    assert missing.returncode == 2 and "kubectl not found on PATH" in missing.stderr
    manifest = run_dir / "launch" / "pytorchjob.yaml"
    assert manifest.is_file()
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "kubectl").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'kubectl-args'}\necho applied\n")
    (shims / "kubectl").chmod(0o755)
    applied = launch(*args, env={"PATH": f"{shims}:/usr/bin:/bin"})
    assert applied.returncode == 0, applied.stderr
    assert (tmp_path / "kubectl-args").read_text().split() == ["apply", "-f", str(manifest)]
    no_claim = launch("recipes/quickstart.yaml", f"run_dir={tmp_path / 'n'}", "--scheduler", "k8s")
    assert no_claim.returncode == 2 and "launch.volume_claim" in no_claim.stderr


def test_slurm_preemption_requeues_and_resumes_to_the_same_adapters(slurm, tmp_path):
    """A real Slurm job signalled mid-run (USR1 to the batch script, as --signal=B:USR1 does before
    a time limit or preemption) checkpoints, is requeued by its script, resumes by itself and ends
    bitwise equal to the same job run without interruption."""
    common = [*SMALL, "train.epochs=40", "train.compare_shared_baseline=false", "base.tiny.pretrain_steps=0",
              "--procs-per-node", "2", "launch.cpus_per_proc=1", "launch.env.OMP_NUM_THREADS=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **slurm}
    # The reference needs only its adapters: no evaluation, export or tracking (none changes a row).
    # It runs beside the Slurm job, which spends most of its time waiting on the scheduler.
    ref = subprocess.Popen([sys.executable, "-m", "flora_train.cli", "launch", "recipes/quickstart.yaml", *common,
                            f"run_dir={tmp_path / 'ref'}", "--scheduler", "local", "eval.at_end=false",
                            "export.format=none", "tracking.enabled=false"],
                           cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _preempt_and_compare(env, common, tmp_path, ref)
    finally:
        if ref.poll() is None:  # a failure above: the reference must not outlive the test
            ref.kill()
            ref.wait()


def _preempt_and_compare(env: dict[str, str], common: list[str], tmp_path, ref: subprocess.Popen) -> None:
    from tests.distributed.helpers import saved_state

    run_dir = tmp_path / "cut"
    job = subprocess.Popen([sys.executable, "-m", "flora_train.cli", "launch", "recipes/quickstart.yaml", *common,
                            f"run_dir={run_dir}", "--scheduler", "slurm", "--wait"],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = run_dir / "recipe.yaml"  # written by rank 0 as training starts
    deadline = time.monotonic() + 300
    while not started.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    log = next((run_dir / "launch").glob("slurm-*.out"))
    job_id = log.stem.split("-")[1]
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, out[-3000:] + err[-3000:]
    _, ref_err = ref.communicate(timeout=600)
    assert ref.returncode == 0, ref_err[-3000:]  # the local scheduler returns the job's exit code
    assert json.loads((tmp_path / "ref" / "result.json").read_text())["base"]["world_size"] == 2
    assert "Slurm job" in out and "ended: COMPLETED, exit code 0" in out
    text = log.read_text()
    assert "flora_train job: requeueing" in text and "flora-train: preempted: stopped by SIGTERM" in text, text[-3000:]
    assert "resuming from" in text and "Traceback" not in text, text[-3000:]
    shown = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    assert "Restarts=1" in shown and "JobState=COMPLETED" in shown, shown
    # The requeued job finishes what a job does: its result, export and tracked run.
    result = json.loads((run_dir / "result.json").read_text())
    assert result["base"]["launcher"] == "torchrun" and result["base"]["world_size"] == 2
    assert (run_dir / "export" / "flora" / "index.json").is_file()
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}").get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    got, want = saved_state(run_dir), saved_state(tmp_path / "ref")
    assert got.keys() == want.keys()
    for user in want:
        for key in want[user]:
            assert torch.equal(got[user][key], want[user][key]), (user, key)

"""Preemption: SIGUSR1 or SIGTERM mid-run -> the step finishes, a checkpoint is written, the run
exits with 143 (requeue); Ctrl-C (SIGINT) the same, exiting with 130; run again, it resumes and ends
bitwise equal to an uninterrupted run. A time-based checkpoint interval writes checkpoints without
any step interval."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from flora_train.config import load_recipe, recipe_to_yaml
from flora_train.run_dir.checkpoints import list_checkpoints
from flora_train.errors import INTERRUPTED_EXIT_CODE
from flora_train.train.preemption import PreemptionWatch
from flora_train.train.run import run_training
from tests.distributed.helpers import REPO, saved_state, small_recipe

pytestmark = pytest.mark.slow


def _recipe(tmp_path, model_dir, name):
    return [*small_recipe(tmp_path, model_dir), f"run_dir={tmp_path / name}", "train.epochs=12", "eval.at_end=false",
            "train.checkpoint_every_minutes=0"]


def test_watch_takes_sigterm_sigusr1_and_ctrl_c_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    interactive = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            with PreemptionWatch(0) as watch:
                os.kill(os.getpid(), sig)
                assert watch.poll() == (True, True) and watch.signal_name == sig.name
                assert watch.interrupted == (sig == signal.SIGINT)
        with PreemptionWatch(0) as watch:
            os.kill(os.getpid(), signal.SIGINT)
            with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C stops at once
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # started in the background: left ignored
        with PreemptionWatch(0) as watch:
            os.kill(os.getpid(), signal.SIGINT)
            assert watch.poll() == (False, False) and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, interactive)


def test_ctrl_c_checkpoints_exits_and_resumes_bitwise(tmp_path, tiny_llama_dir):
    """Ctrl-C ended a run with a traceback and exit code -2, losing the steps since its last
    checkpoint. (SIGTERM and SIGUSR1 take the same path to 143: the watch's test above, and the
    Slurm job requeued in test_launch.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def command(name: str) -> list[str]:  # both runs alike: same process kind, same threads
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(recipe_to_yaml(load_recipe(None, [*_recipe(tmp_path, tiny_llama_dir, name), "train.auto_resume=true"])))
        return [sys.executable, "-m", "flora_train.cli", "run", str(recipe)]

    whole = subprocess.run(command("whole"), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    cmd = command("cut")
    # SIGINT as a terminal's process has it (a test runner started in the background ignores it)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        progress = tmp_path / "cut" / "recipe.yaml"
        while not progress.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the run writes recipe.yaml as training starts (12 epochs take seconds)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:  # a run that ignored the signal must not outlive the test
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == INTERRUPTED_EXIT_CODE == 130, (proc.returncode, err[-2000:])
    assert "flora-train: interrupted: stopped by Ctrl-C after step" in err and "with --resume" in err, err[-2000:]
    (ckpt,) = list_checkpoints(tmp_path / "cut")
    assert 0 < int(ckpt.name.split("-")[1]) and "Traceback" not in err
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout
    got, want = saved_state(tmp_path / "cut"), saved_state(tmp_path / "whole")
    assert got.keys() == want.keys()
    for user in want:
        for key in want[user]:
            assert torch.equal(got[user][key], want[user][key]), (user, key)


def test_checkpoint_every_minutes(tmp_path, tiny_llama_dir):
    run_training(load_recipe(None, [*_recipe(tmp_path, tiny_llama_dir, "timed"), "train.checkpoint_every_minutes=0.0001",
                                    "train.keep_checkpoints=100"]))
    steps = sorted(int(p.name.split("-")[1]) for p in list_checkpoints(tmp_path / "timed"))
    assert len(steps) > 5 and steps[:3] == [1, 2, 3], steps

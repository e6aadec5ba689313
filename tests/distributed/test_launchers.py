"""`flora-train run RECIPE` under every launcher users already have, on a ZeRO-3 base: torchrun,
accelerate launch (with DeepSpeed ZeRO-3), the deepspeed launcher, and two torchrun "nodes" on
127.0.0.1 forming one job. Each trains the same adapters as one process."""

from __future__ import annotations

import json
import os
import socket
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flora_train.config import load_recipe
from flora_train.train.run import run_training

from tests.distributed.helpers import REPO, assert_same_adapters, saved_state, small_recipe

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ZERO3 = ["base.zero_stage=3", "base.deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, out: str, label: str) -> None:
    assert proc.returncode == 0, f"{label} failed ({proc.returncode}):\n{out[-6000:]}"


def _cli(recipe: Path, overrides: list[str]) -> list[str]:
    return ["-m", "flora_train.cli", "run", str(recipe), *overrides]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("launchers")
    base = small_recipe(tmp, tiny_llama_dir)
    run_training(load_recipe(None, [*base, f"run_dir={tmp / 'ref'}"]))
    recipe = tmp / "recipe.yaml"
    recipe.write_text("tracking:\n  enabled: false\n")
    return tmp, base, recipe, saved_state(tmp / "ref")


LAUNCHERS = {
    "torchrun": lambda port: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"],
    "accelerate": lambda port: [
        str(BIN / "accelerate"), "launch", "--num_processes=2", "--num_machines=1", "--mixed_precision=no",
        "--dynamo_backend=no", f"--main_process_port={port}", "--use_deepspeed", "--zero_stage=3",
    ],
    # --num_gpus is the deepspeed launcher's process count; on CPU plain `deepspeed` starts one.
    "deepspeed": lambda port: [str(BIN / "deepspeed"), "--num_gpus=2", f"--master_port={port}", "--module"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_run_under_launcher(setup, launcher):
    tmp, base, recipe, ref = setup
    run_dir = tmp / launcher
    # torchrun's run also draws its progress bars and trains the shared baseline: rank 0 alone draws
    # each bar (both ranks drew the baseline's, interleaved on the one terminal).
    bars = ["train.progress=true", "train.compare_shared_baseline=true"] if launcher == "torchrun" else []
    cmd = [*LAUNCHERS[launcher](_free_port()), *_cli(recipe, [*base, *ZERO3, f"run_dir={run_dir}", *bars])]
    if launcher == "deepspeed":
        cmd.remove("-m")  # the launcher's --module takes the module name itself
    proc = subprocess.run(cmd, cwd=tmp, env=_env(), capture_output=True, text=True, timeout=600)
    _check(proc, proc.stdout + proc.stderr, launcher)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["base"]["launcher"] == launcher and result["base"]["world_size"] == 2
    assert_same_adapters(saved_state(run_dir), ref, launcher)
    if launcher == "torchrun":  # a ZeRO-3 run evaluated later in one process loads the base whole
        first_draws = [len(re.findall(rf"{bar}: +0%\|[^|\r\n]*\| 0/\d+ \[00:00<\?, \?\w+/s\]", proc.stderr))
                       for bar in ("train", "shared baseline")]
        assert first_draws == [1, 1], proc.stderr[-3000:]
        # stderr is a pipe, as a Slurm job's log is: the bar prints a line every 30 s and its last
        # state, not a redraw a step (text=True reads tqdm's carriage returns as line ends).
        draws = re.findall(r"^train: .*$", proc.stderr, re.M)
        assert len(draws) <= 3 and re.match(r"train: 100%\|.*\]$", draws[-1]), draws
        proc = subprocess.run([sys.executable, "-m", "flora_train.cli", "eval", str(run_dir)], cwd=tmp, env=_env(),
                              capture_output=True, text=True, timeout=600)
        _check(proc, proc.stdout + proc.stderr, "eval")
        assert "the base is loaded whole" in proc.stdout and "per-user adapters" in proc.stdout


def test_two_nodes_on_loopback(setup):
    """Two torchrun invocations with --nnodes 2 on 127.0.0.1 form one 4-rank job."""
    tmp, base, recipe, ref = setup
    run_dir, port = tmp / "two-nodes", _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=2",
             "--master-addr=127.0.0.1", f"--master-port={port}", *_cli(recipe, [*base, *ZERO3, f"run_dir={run_dir}"])],
            cwd=tmp, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    for node, p in enumerate(procs):
        out, _ = p.communicate(timeout=600)
        _check(p, out, f"node {node}")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["base"]["world_size"] == 4 and result["base"]["launcher"] == "torchrun"
    assert result["base"]["resident_bytes_per_rank"] <= result["base"]["total_bytes"] / 4 * 1.02
    assert_same_adapters(saved_state(run_dir), ref, "two nodes")


def test_world_that_cannot_hold_the_recipe_fails_before_training(setup):
    tmp, base, recipe, _ = setup
    one_user = tmp / "one-user.jsonl"
    one_user.write_text(json.dumps({"user_id": "u0", "prompt": "a", "completion": "b"}) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         *_cli(recipe, [*base, f"data.train_path={one_user}", "data.eval_path=null", f"run_dir={tmp / 'too-wide'}"])],
        cwd=tmp, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0
    assert "1 user(s) cannot be sharded over 2 ranks" in proc.stderr
    assert not (tmp / "too-wide" / "checkpoints").exists()

"""What the distributed tests share: a small recipe, torchrun in a subprocess, saved adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from flora_train.data import SyntheticTask
from flora_train.store.saved import iter_shards
from flora_train.run_dir.checkpoints import checkpoint_chain, latest_checkpoint

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("run_configs.py")
ROW_TOL = dict(rtol=1e-3, atol=5e-5)  # float32: batches of other shapes round differently


def small_recipe(tmp: Path, model_dir: Path) -> list[str]:
    train, evalp = SyntheticTask(num_users=12, train_examples_per_user=6, eval_examples_per_user=2).write(tmp / "data")
    return [
        f"base.name_or_path={model_dir}", f"data.train_path={train}", f"data.eval_path={evalp}",
        "adapter.target_modules=[q_proj,v_proj,down_proj]", "train.users_per_step=5", "train.examples_per_user=3",
        "train.micro_batch_size=4", "train.epochs=2", "store.optimizer.lr=0.05", "tracking.enabled=false",
        "train.progress=false",
    ]


def torchrun(nproc: int, args: list[str], cwd: Path, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 or not check, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def run_many(nproc: int, runs: list[list[str]], tmp: Path, resume: bool = False, check_base: bool = False,
             rank_overrides: dict[int, list[str]] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    spec = tmp / f"spec-{nproc}-{len(list(tmp.glob('spec-*')))}.json"
    extra = {str(r): o for r, o in (rank_overrides or {}).items()}
    spec.write_text(json.dumps({"runs": runs, "resume": resume, "check_base": check_base, "rank_overrides": extra}))
    return torchrun(nproc, [str(WORKER), str(spec)], tmp, check=check)


def saved_state(run_dir: Path, checkpoint: Path | None = None) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    out = {}
    for member in checkpoint_chain(checkpoint or latest_checkpoint(run_dir)):  # a delta's chain, oldest first
        for path, users in iter_shards(member):
            tensors = load_file(str(path))
            out.update({u: {k: v[i] for k, v in tensors.items()} for i, u in enumerate(users)})
    return out


def row_windows(state: dict, user: str, others: list[bytes]) -> list[bytes]:
    """Byte strings that identify ``user``'s saved tensors (``saved_state``): 24-byte pieces of its
    row and moments that occur in no other user's bytes, to search files for copies of them."""
    out = []
    for key in ("rows", "optim.exp_avg", "optim.exp_avg_sq"):
        data = state[user][key].contiguous().numpy().tobytes()
        for start in range(0, len(data) - 24, max(4, len(data) // 8) // 4 * 4):
            piece = data[start : start + 24]
            if len(set(piece)) > 8 and not any(piece in o for o in others):
                out.append(piece)
    return out


def assert_same_adapters(got: dict, want: dict, label: str) -> None:
    assert set(got) == set(want), label
    for user, cols in want.items():
        assert torch.equal(got[user]["optim.step"], cols["optim.step"]), (label, user)
        torch.testing.assert_close(got[user]["rows"], cols["rows"], **ROW_TOL, msg=lambda m: f"{label} {user}: {m}")
        if "select.kept" in cols:  # train.select: the same row kept, from the same step
            assert torch.equal(got[user]["select.best_step"], cols["select.best_step"]), (label, user)
            torch.testing.assert_close(got[user]["select.kept"], cols["select.kept"], **ROW_TOL,
                                       msg=lambda m: f"{label} {user} kept: {m}")

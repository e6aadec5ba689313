"""Running the real CLI in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A small version of the quickstart: same code path, seconds instead of minutes.
SMALL = [
    "base.tiny.hidden_size=32",
    "base.tiny.intermediate_size=64",
    "base.tiny.vocab_size=300",
    "base.tiny.pretrain_steps=30",
    "data.synthetic.num_users=24",
    "data.synthetic.train_examples_per_user=8",
    "data.synthetic.eval_examples_per_user=2",
    "train.epochs=2",
    "train.users_per_step=8",
    "train.examples_per_user=4",
    "train.micro_batch_size=16",
    "train.progress=false",
    "train.log_every_steps=2",
]


def flora_train(*args: str, check: bool = True, timeout: int = 600, cwd: Path = REPO) -> subprocess.CompletedProcess:
    # Two compute threads, or what the suite was started with (`make test` gives each of its two
    # pytest workers one core: OMP_NUM_THREADS=1).
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(
        [sys.executable, "-m", "flora_train.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"flora-train {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc

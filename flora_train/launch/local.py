"""`--scheduler local`: torchrun on this machine, one node or several (loopback rendezvous)."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys

from flora_train.launch.job import Job, write_recipe

TORCHRUN = "flora_train.launch.torchrun"  # torchrun, ending a failed job in one line (see that module)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(job: Job, port: int | None = None) -> list[list[str]]:
    la = job.cfg.launch
    tail = ["-m", "flora_train.cli", "run", str(job.recipe_path)]
    if la.nodes == 1:
        return [[job.python, "-m", TORCHRUN, "--standalone", f"--nproc-per-node={la.procs_per_node}",
                 f"--max-restarts={la.max_restarts}", *tail]]
    port = port or _free_port()
    return [
        [job.python, "-m", TORCHRUN, f"--nnodes={la.nodes}", f"--node-rank={node}",
         f"--nproc-per-node={la.procs_per_node}", "--master-addr=127.0.0.1", f"--master-port={port}",
         f"--max-restarts={la.max_restarts}", *tail]
        for node in range(la.nodes)
    ]


def run_local(job: Job, dry_run: bool = False) -> int:
    """Streams the job's output here and returns its exit code (the first failing node's)."""
    cmds = commands(job)
    env_line = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in job.cfg.launch.env.items())
    if dry_run:
        print(f"would write the resolved recipe to {job.recipe_path}")
        for cmd in cmds:
            print((env_line + " " if env_line else "") + shlex.join(cmd))
        return 0
    write_recipe(job)
    env = {**os.environ, **{k: str(v) for k, v in job.cfg.launch.env.items()}}
    procs = [subprocess.Popen(cmd, env=env) for cmd in cmds]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reached the job as well (one process group): its ranks finish the step
        # and checkpoint. Leaving now would give back the prompt while they still write, and a
        # relaunch would find the run directory still locked.
        print("flora-train launch: Ctrl-C: waiting for the job to checkpoint and stop (Ctrl-C again leaves it)",
              file=sys.stderr, flush=True)
        codes = [p.wait() for p in procs]
    return next((c for c in codes if c != 0), 0)

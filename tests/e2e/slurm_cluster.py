"""A real Slurm cluster of one node on localhost: munged, slurmctld and slurmd started for a test
session with a generated slurm.conf (Debian's slurm-wlm 22.05, running as root)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

CONF = """ClusterName=flora
SlurmctldHost={host}
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
# How long a requeued job waits before it starts again (default 120 s, at least 5): short for the
# tests; then the scheduling passes that start it run every 1-2 s instead of every 30-60.
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=2,bf_interval=1
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={host} CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(root: Path) -> tuple[dict[str, str], list[int]]:
    """Starts the daemons; returns the environment client commands need, and the daemon pids."""
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"Slurm is not installed ({', '.join(missing)} missing): `make test` installs "
                           "Debian's slurm-wlm and munge; or apt-get install slurm-wlm munge")
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(CONF.format(host=host, root=root, ctld_port=_free_port(), d_port=_free_port(), cpus=os.cpu_count() or 1))
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        subprocess.run(["munged", "--force"], check=True, capture_output=True)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
    subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
        if out == "idle":
            break
        time.sleep(0.5)
    else:
        raise RuntimeError(f"slurmd never became idle: {(root / 'slurmd.log').read_text()[-2000:]}")
    pids = [int((root / f).read_text()) for f in ("slurmctld.pid", "slurmd.pid")]
    return {"SLURM_CONF": str(conf)}, pids


def stop_cluster(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass

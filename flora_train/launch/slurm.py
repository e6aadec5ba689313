"""`--scheduler slurm`: a batch script from ``templates/slurm.sbatch``, submitted with sbatch.

Scheduler options go to sbatch as arguments (never through a shell or ``#SBATCH`` lines); the
script holds only quoted paths and ``launch.env`` values. ``--wait`` follows the job with squeue /
scontrol and returns its exit code, showing the tail of its log when it failed.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from string import Template

from flora_train.errors import INTERRUPTED_EXIT_CODE
from flora_train.launch.job import Job, LaunchFailed, write_recipe
from flora_train.run_dir import RunDir

TEMPLATE = Path(__file__).with_name("templates") / "slurm.sbatch"


def sbatch_argv(job: Job, script: Path) -> list[str]:
    la = job.cfg.launch
    argv = ["sbatch", "--parsable", f"--job-name={job.name}", f"--nodes={la.nodes}", "--ntasks-per-node=1",
            f"--cpus-per-task={la.cpus_per_proc * la.procs_per_node}", f"--time={la.time_limit}",
            f"--output={log_path(job)}", "--open-mode=append",  # a requeued job appends to its log
            f"--chdir={Path.cwd()}",  # relative recipe paths mean what they mean here
            "--requeue", f"--signal=B:USR1@{int(la.preempt_grace_s)}"]
    if la.gpus_per_node:
        argv.append(f"--gpus-per-node={la.gpus_per_node}")
    for key in ("partition", "account", "qos"):
        if la[key]:
            argv.append(f"--{key}={la[key]}")
    if la.memory:
        argv.append(f"--mem={la.memory}")
    return [*argv, *map(str, la.sbatch_args), str(script)]


def log_path(job: Job, job_id: str = "%j") -> Path:
    """The job's log; with no id, the sbatch pattern (``%j`` is the job id)."""
    return RunDir(Path(job.cfg.run_dir)).launch / f"slurm-{job_id}.out"


def render(job: Job) -> tuple[list[str], str]:
    script_path = job.recipe_path.with_name("job.sbatch")
    argv = sbatch_argv(job, script_path)
    la = job.cfg.launch
    script = Template(TEMPLATE.read_text()).substitute(
        submit=shlex.join(argv), procs=int(la.procs_per_node), nodes=int(la.nodes), port=int(la.port),
        exports=job.exports(), python=shlex.quote(job.python), recipe=shlex.quote(str(job.recipe_path)),
        max_restarts=int(la.max_restarts),
    )
    return argv, script


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise LaunchFailed(f"{tool} not found on PATH: --scheduler slurm needs Slurm's client commands "
                           "(sbatch, squeue, scontrol) on this machine; or use --scheduler local")
    return path


def submit(job: Job, dry_run: bool = False) -> str | None:
    argv, script = render(job)
    if dry_run:
        print(f"would write the resolved recipe to {job.recipe_path}")
        print(f"would write {argv[-1]}:\n{script}")
        print(f"would run: {shlex.join(argv)}")
        return None
    _need("sbatch")
    write_recipe(job)
    Path(argv[-1]).write_text(script)
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LaunchFailed(f"sbatch refused the job ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    print(f"submitted Slurm job {job_id}; log {log_path(job, job_id)}")
    return job_id


def _job_state(job_id: str) -> tuple[str, int] | None:
    """(state, exit code) of a finished job; None while it is pending or running."""
    queued = subprocess.run([_need("squeue"), "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    if queued.returncode == 0 and queued.stdout.strip():
        return None
    shown = subprocess.run([_need("scontrol"), "show", "job", job_id], capture_output=True, text=True)
    state = re.search(r"JobState=(\S+)", shown.stdout)
    code = re.search(r"\bExitCode=(\d+):(\d+)", shown.stdout)
    if state is None or code is None:
        if queued.returncode == 0:
            return None  # between squeue and scontrol: look again
        raise LaunchFailed(f"Slurm no longer knows job {job_id}: {shown.stderr.strip()}")
    if state.group(1) in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
        return None
    exit_code, signal = int(code.group(1)), int(code.group(2))
    return state.group(1), exit_code or (128 + signal if signal else (0 if state.group(1) == "COMPLETED" else 1))


def wait(job: Job, job_id: str, poll_s: float = 2.0) -> int:
    try:
        while (done := _job_state(job_id)) is None:
            time.sleep(poll_s)
    except KeyboardInterrupt:  # Ctrl-C stops the waiting; the job is Slurm's and runs on
        print(f"\nstopped waiting; Slurm job {job_id} goes on (log {log_path(job, job_id)}): "
              f"`scancel {job_id}` stops it")
        return INTERRUPTED_EXIT_CODE
    state, code = done
    log = log_path(job, job_id)
    print(f"Slurm job {job_id} ended: {state}, exit code {code}")
    if code != 0 and log.is_file():
        lines = log.read_text(errors="replace").splitlines()
        # torchrun's own traceback buries the cause: show flora-train's error lines first.
        causes = list(dict.fromkeys(line for line in lines if line.startswith("flora-train: ")))
        if causes:
            print("\n".join(causes))
        print(f"last lines of {log}:\n" + "\n".join(lines[-20:]))
    return code

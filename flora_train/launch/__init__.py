"""`flora-train launch`: a recipe (and its `launch:` section) turned into a running job."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from flora_train.launch.job import Job, LaunchFailed, make_job
from flora_train.launch_env import LaunchError


def check_local_data(cfg: DictConfig) -> None:
    """The recipe's training and evaluation data exist, checked before starting processes that
    would each load the base only to fail on them. Only for jobs on this machine: a cluster's nodes
    may see files this one does not."""
    from flora_train.data.sources import SourceError, resolve_sources

    d = cfg.data
    if d.synthetic is not None:
        return  # the run generates it
    given = [("data.train_path", d.train_path, d.split)] + ([("data.eval_path", d.eval_path, d.eval_split or d.split)]
                                                            if d.eval_path else [])
    for key, spec, split in given:
        try:
            resolve_sources(OmegaConf.to_object(spec) if OmegaConf.is_list(spec) else spec, split, d.subset, key)
        except SourceError as exc:
            raise LaunchError(f"{exc} (checked before starting the job)") from None


def _local(job: Job, dry_run: bool, wait: bool) -> int:
    from flora_train.launch.local import run_local

    check_local_data(job.cfg)
    return run_local(job, dry_run)  # in the foreground: it always waits


def _slurm(job: Job, dry_run: bool, wait: bool) -> int:
    from flora_train.launch import slurm

    job_id = slurm.submit(job, dry_run)
    return slurm.wait(job, job_id) if wait and job_id is not None else 0


def _k8s(job: Job, dry_run: bool, wait: bool) -> int:
    from flora_train.launch import k8s

    return k8s.submit(job, dry_run)


@dataclass(frozen=True)
class Scheduler:
    start: Callable[[Job, bool, bool], int]  # (job, dry_run, wait) -> the exit code to report
    # The command line's scheduler-specific flags it reads (every scheduler reads --nodes and
    # --procs-per-node); another scheduler's flag given on the command line is refused.
    flags: tuple[str, ...]


SCHEDULERS: dict[str, Scheduler] = {
    "local": Scheduler(_local, ("wait",)),
    "slurm": Scheduler(_slurm, ("gpus_per_node", "partition", "time_limit", "job_name", "wait")),
    "k8s": Scheduler(_k8s, ("gpus_per_node", "image", "job_name")),
}


def launch(cfg: DictConfig, dry_run: bool = False, wait: bool = False, given: tuple[str, ...] = ()) -> int:
    """Starts (or, with ``dry_run``, prints) the job; returns the exit code to report. ``given``: the
    scheduler-specific flags set on the command line (argparse dests), checked against the scheduler."""
    name = cfg.launch.scheduler.value
    scheduler = SCHEDULERS[name]
    specific = {flag for s in SCHEDULERS.values() for flag in s.flags}
    for flag in given:
        if flag in specific and flag not in scheduler.flags:
            readers = " or ".join(f"--scheduler {n}" for n, s in SCHEDULERS.items() if flag in s.flags)
            option = "--time" if flag == "time_limit" else "--" + flag.replace("_", "-")
            raise LaunchError(f"{option} is read by {readers}, not --scheduler {name} (launch.scheduler)")
    return scheduler.start(make_job(cfg), dry_run, wait)


__all__ = ["SCHEDULERS", "Job", "LaunchFailed", "launch"]

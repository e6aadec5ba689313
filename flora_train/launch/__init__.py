"""`flora-train launch`: a recipe (and its `launch:` section) turned into a running job."""

from __future__ import annotations

from omegaconf import DictConfig

from flora_train.launch.job import Job, LaunchFailed, make_job


def launch(cfg: DictConfig, dry_run: bool = False, wait: bool = False) -> int:
    """Starts (or, with ``dry_run``, prints) the job; returns the exit code to report."""
    job = make_job(cfg)
    scheduler = cfg.launch.scheduler.value
    if scheduler == "local":
        from flora_train.launch.local import run_local

        return run_local(job, dry_run)
    if scheduler == "slurm":
        from flora_train.launch import slurm

        job_id = slurm.submit(job, dry_run)
        return slurm.wait(job, job_id) if wait and job_id is not None else 0
    from flora_train.launch import k8s

    return k8s.submit(job, dry_run)


__all__ = ["Job", "LaunchFailed", "launch"]

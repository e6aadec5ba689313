"""`flora-train launch`: a recipe (and its `launch:` section) turned into a running job."""

from __future__ import annotations

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


def launch(cfg: DictConfig, dry_run: bool = False, wait: bool = False) -> int:
    """Starts (or, with ``dry_run``, prints) the job; returns the exit code to report."""
    job = make_job(cfg)
    scheduler = cfg.launch.scheduler.value
    if scheduler == "local":
        from flora_train.launch.local import run_local

        check_local_data(job.cfg)
        return run_local(job, dry_run)
    if scheduler == "slurm":
        from flora_train.launch import slurm

        job_id = slurm.submit(job, dry_run)
        return slurm.wait(job, job_id) if wait and job_id is not None else 0
    from flora_train.launch import k8s

    return k8s.submit(job, dry_run)


__all__ = ["Job", "LaunchFailed", "launch"]

"""What every scheduler needs from a recipe: the resolved recipe file the job runs, and names.

The job never receives recipe values through a shell: the launcher writes the fully resolved
recipe to ``<run_dir>/launch/recipe.yaml`` and the job runs ``flora-train run`` on that file. Only
paths and ``launch.env`` values reach a script, each through ``shlex.quote``.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from flora_train.errors import UserError
from flora_train.run_dir import RunDir


class LaunchFailed(UserError, RuntimeError):
    """The scheduler is missing, refused the job, or the job failed."""


@dataclass(frozen=True)
class Job:
    cfg: DictConfig  # the resolved recipe, run_dir made absolute
    recipe_path: Path  # where the resolved recipe is (or would be) written

    @property
    def name(self) -> str:
        return self.cfg.launch.job_name or f"flora-{Path(self.cfg.run_dir).name}"

    @property
    def python(self) -> str:
        return self.cfg.launch.python or sys.executable

    def exports(self) -> str:
        return "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in self.cfg.launch.env.items())


def make_job(cfg: DictConfig) -> Job:
    cfg = cfg.copy()
    cfg.run_dir = str(Path(cfg.run_dir).resolve())  # nodes may start elsewhere; the path must be absolute
    # A scheduler that restarts or requeues the job starts the same recipe again: it must resume.
    cfg.train.auto_resume = True
    return Job(cfg, RunDir(Path(cfg.run_dir)).launch / "recipe.yaml")


def write_recipe(job: Job) -> None:
    from flora_train.config import recipe_to_yaml

    job.recipe_path.parent.mkdir(parents=True, exist_ok=True)
    job.recipe_path.write_text(recipe_to_yaml(job.cfg))

"""Which job this process belongs to, read from whatever launcher started it.

``torchrun``, ``accelerate launch``, the ``deepspeed`` launcher and ``mpirun``-style wrappers all set
the torch environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
``srun`` sets only ``SLURM_*``, from which the same five values are derived. Explicit torch variables
win, so ``srun torchrun ...`` behaves as torchrun. This module only reads the environment: joining
the process group is ``dist.init_from_env``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flora_train.errors import UserError


class LaunchError(UserError, RuntimeError):
    """The launcher's environment is incomplete or contradicts the recipe."""


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str  # single | torchrun | accelerate | deepspeed | srun | env
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    # What `accelerate launch --use_deepspeed` asked for, to be checked against the recipe.
    launcher_zero_stage: int | None = None
    launcher_offload_params: str | None = None
    local_world_size: int = 1  # processes on this node (LOCAL_WORLD_SIZE, LOCAL_SIZE, SLURM_NTASKS_PER_NODE)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def torch_environ(self) -> dict[str, str]:
        """The variables ``init_process_group(init_method="env://")`` reads."""
        out = {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank)}
        if self.master_addr is not None:
            out["MASTER_ADDR"] = self.master_addr
        if self.master_port is not None:
            out["MASTER_PORT"] = str(self.master_port)
        return out


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise LaunchError(f"environment variable {key}={env[key]!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist (``node[01-02]-ib`` -> ``node01-ib``,
    ``gpu[1-2]x[3-4]`` -> ``gpu1x3``), expanded by python-hostlist as ``scontrol show hostnames``
    expands it (suffixes, several brackets, zero padding)."""
    import hostlist

    try:
        hosts = hostlist.expand_hostlist(nodelist.strip())
    except hostlist.BadHostlist as exc:
        raise LaunchError(f"cannot read the Slurm node list {nodelist!r}: {exc}") from None
    if not hosts:
        raise LaunchError(f"the Slurm node list {nodelist!r} names no host")
    return hosts[0]


def _slurm_port(env: Mapping[str, str]) -> int:
    # Stable for every task of one job step, and different between concurrent jobs on a node.
    job = int(env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", "0")) or 0)
    step = int(env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "0")) or 0)
    return 15000 + (job * 7 + step) % 20000


def _accelerate_zero(env: Mapping[str, str]) -> tuple[int | None, str | None]:
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return None, None
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    offload = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")
    config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and config_file != "None":
        try:
            zero = json.loads(Path(config_file).read_text()).get("zero_optimization", {})
        except (OSError, ValueError) as exc:
            raise LaunchError(f"accelerate's DeepSpeed config {config_file}: cannot read it: {exc}") from None
        stage = zero.get("stage", stage)
        offload = zero.get("offload_param", {}).get("device", offload)
    stage_int = int(stage) if stage not in (None, "", "None", "auto") else None
    return stage_int, (str(offload).lower() if offload not in (None, "", "None", "auto") else None)


def _local_world(env: Mapping[str, str]) -> int:
    """Processes on this node, as the launcher says it (1 where it says nothing)."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(key, "").split("(")[0].split(",")[0]  # Slurm may write "2(x3)" or "2,1"
        if value.isdigit():
            return int(value)
    return 1


def read_launch_env(env: Mapping[str, str]) -> LaunchEnv:
    zero_stage, offload = _accelerate_zero(env)
    if "WORLD_SIZE" in env and int(env.get("WORLD_SIZE") or 1) > 1:
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise LaunchError(f"WORLD_SIZE={env['WORLD_SIZE']} but {', '.join(missing)} not set: start the job "
                              "with torchrun, accelerate launch, deepspeed or srun")
        if any(k.startswith("ACCELERATE_") for k in env):
            launcher = "accelerate"
        elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
            launcher = "deepspeed"
        elif "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env:
            launcher = "torchrun"
        else:
            launcher = "env"
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        if not 0 <= rank < world:
            raise LaunchError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return LaunchEnv(launcher, rank, world, int(env.get("LOCAL_RANK", "0") or 0), env["MASTER_ADDR"],
                         _int(env, "MASTER_PORT"), zero_stage, offload, _local_world(env))
    # srun sets SLURM_STEP_NUM_TASKS for the tasks of a job step; an sbatch script (the batch step,
    # one process) has SLURM_NTASKS too, and must not wait for tasks that will never come.
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env and _int(env, "SLURM_STEP_NUM_TASKS") > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodes:
            raise LaunchError("srun: SLURM_STEP_NODELIST is not set; cannot find the rank-0 host")
        port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else _slurm_port(env)
        return LaunchEnv("srun", _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS"),
                         int(env.get("SLURM_LOCALID", "0")), env.get("MASTER_ADDR") or first_host(nodes), port,
                         zero_stage, offload, _local_world(env))
    return LaunchEnv("single", launcher_zero_stage=zero_stage, launcher_offload_params=offload)


def elastic_job(env: Mapping[str, str]) -> str | None:
    """torchrun's job id (``--rdzv-id``; a fresh uuid under ``--standalone``), which every restart
    round of the job keeps. None outside torchrun, and at torchrun's default ``none`` (every job
    with a static rendezvous has it, so it tells no job from another)."""
    job = env.get("TORCHELASTIC_RUN_ID", "")
    return None if job in ("", "none") else job

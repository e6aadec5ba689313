"""The process group as the rest of the code sees it: rank, world, and agreement between ranks.

Everything here degrades to a single process when ``torch.distributed`` is not initialised, so the
same code path runs under a plain ``python`` and under ``torchrun``.
"""

from __future__ import annotations

import os
from datetime import timedelta
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from flora_train.launch_env import LaunchEnv, read_launch_env


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def backend_for(device_type: str) -> str:
    """The process group's backend for a job computing on ``device_type``.

    On GPUs one group serves both devices: NCCL moves CUDA tensors (the rows of fetch placement,
    DeepSpeed's gathers) and gloo moves CPU ones (per-step loss and token counts, ids, counters,
    pickled objects). NCCL alone refuses every CPU tensor ("No backend type associated with device
    type cpu"), and copying each small counter to the GPU and back would cost a sync per call.
    """
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def new_group() -> dist.ProcessGroup:
    """A group over every rank with the default group's backends (both devices on GPUs)."""
    return dist.new_group(backend=dist.get_backend_config())


def serves(group: dist.ProcessGroup | None, device_type: str) -> bool:
    """Whether ``group`` has a backend for tensors on ``device_type``."""
    config = dist.get_backend_config(group)
    return any(part.split(":")[0] == device_type for part in config.split(",")) if ":" in config else True


def init_from_env(device: torch.device, env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Joins the job the launcher started this process in (torchrun, accelerate launch, deepspeed,
    srun: see ``launch_env``); a single process joins nothing. Returns what was read."""
    launch = read_launch_env(os.environ if env is None else env)
    if is_distributed() or not launch.distributed:
        return launch
    os.environ.update(launch.torch_environ())  # srun gives only SLURM_*; env:// reads these
    backend = backend_for(device.type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(minutes=int(os.environ.get("FLORA_DIST_TIMEOUT_MIN", "30")))
    from torch.distributed.rendezvous import rendezvous

    store, _, _ = next(rendezvous("env://", launch.rank, launch.world_size, timeout=timeout))
    # torchrun --max-restarts may hand a restarted job the store of the failed attempt: without a
    # prefix per attempt, gloo reads the dead processes' addresses and the restart never connects.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"flora_train/attempt_{attempt}", store)
    dist.init_process_group(backend, store=store, rank=launch.rank, world_size=launch.world_size, timeout=timeout)
    check_collectives_if_asked()
    return launch


def check_collectives_if_asked() -> None:
    """``FLORA_TRAIN_CHECK_COLLECTIVES=cuda`` (the test suite sets it): every collective checks
    that its tensors would be served on a GPU job (see ``collective_check``)."""
    if os.environ.get("FLORA_TRAIN_CHECK_COLLECTIVES") == "cuda":
        from flora_train.collective_check import install

        install(backend_for("cuda"))


def shutdown(clean: bool) -> None:
    """Leaves the process group before the interpreter exits. Left to interpreter teardown, gloo's
    threads may be destroyed while a peer still talks to them, and a rank that finished its work
    aborts ("terminate called without an active exception"). After a clean run the ranks first meet
    at a barrier, so no rank tears down while another still needs it."""
    if not is_distributed():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def raise_if_any_failed(error: str | None, exc_type: type[Exception]) -> None:
    """Every rank raises ``exc_type`` if any rank reports an error, so no rank runs on alone."""
    errors = [e for e in all_gather_objects(error) if e]
    if errors:
        raise exc_type("; ".join(dict.fromkeys(errors)))


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of a small CPU or device tensor (a no-op in a single process)."""
    if is_distributed():
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        if not serves(None, tensor.device.type):
            host = tensor.cpu()
            dist.all_reduce(host, ops[op])
            tensor.copy_(host)
        else:
            dist.all_reduce(tensor, ops[op])
    return tensor

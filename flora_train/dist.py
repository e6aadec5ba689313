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

from flora_train.launch_env import LaunchEnv, LaunchError, read_launch_env


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


# Joining: how long a process waits for the others to start (imports, a restarted node's agent).
# Collectives get ``train.collective_timeout_s`` once every rank is in (``_set_pg_timeout``: torch
# offers no public way to give a group's start-up and its collectives different timeouts).
STARTUP_TIMEOUT = timedelta(minutes=30)


def new_group() -> dist.ProcessGroup:
    """A group over every rank with the default group's backends (both devices on GPUs) and its
    collective timeout (joined under the start-up one: ranks create groups at their own pace)."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    group = dist.new_group(backend=dist.get_backend_config(), timeout=STARTUP_TIMEOUT)
    _set_pg_timeout(collective_timeout(), group)
    return group


def collective_timeout(group: dist.ProcessGroup | None = None) -> timedelta:
    """The timeout a group's collectives run under (its CPU backend's, the default group's by default)."""
    group = group or dist.group.WORLD
    return group._get_backend(torch.device("cpu")).options._timeout


def serves(group: dist.ProcessGroup | None, device_type: str) -> bool:
    """Whether ``group`` has a backend for tensors on ``device_type``."""
    config = dist.get_backend_config(group)
    return any(part.split(":")[0] == device_type for part in config.split(",")) if ":" in config else True


def init_from_env(device: torch.device, env: Mapping[str, str] | None = None, timeout_s: float = 1800.0) -> LaunchEnv:
    """Joins the job the launcher started this process in (torchrun, accelerate launch, deepspeed,
    srun: see ``launch_env``); a single process joins nothing. ``timeout_s``: how long a collective
    waits for the other ranks (``train.collective_timeout_s``). Returns what was read."""
    launch = read_launch_env(os.environ if env is None else env)
    if is_distributed() or not launch.distributed:
        return launch
    os.environ.update(launch.torch_environ())  # srun gives only SLURM_*; env:// reads these
    backend = backend_for(device.type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    from torch.distributed.distributed_c10d import _set_pg_timeout
    from torch.distributed.rendezvous import rendezvous

    store, _, _ = next(rendezvous("env://", launch.rank, launch.world_size, timeout=STARTUP_TIMEOUT))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = _attempt_store(store)
    dist.init_process_group(backend, store=store, rank=launch.rank, world_size=launch.world_size, timeout=STARTUP_TIMEOUT)
    _set_pg_timeout(timedelta(seconds=timeout_s))
    check_collectives_if_asked()
    return launch


def _attempt_store(store: dist.Store) -> dist.Store:
    """torchrun's agent store is shared by every rendezvous round: a restarted round finds the
    failed round's keys there, and gloo would read the dead processes' addresses. One node has one
    agent, whose restart count every worker shares: a prefix per attempt keeps rounds apart. Over
    several nodes the counts differ (a node restarted for a peer's failure does not count it), so
    no prefix can: each round needs its own store (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which
    ``flora-train launch`` and ``python -m flora_train.launch.torchrun`` set)."""
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1") or 1)
    if nodes > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0:
        raise LaunchError(
            f"torchrun --max-restarts over {nodes} nodes shares its agent's store between restart rounds, and a "
            "restarted round would read the failed round's addresses and hang: start it with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment, or through python -m "
            "flora_train.launch.torchrun (flora-train launch does), which sets it")
    return dist.PrefixStore(f"flora_train/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


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


LOST_PEERS_EXIT_CODE = 4  # after 2 (bad input), 3 (non-finite training); 143 is a preemption


class LostPeers(RuntimeError):
    """A collective failed: another rank died, or the network between the nodes went down for
    longer than ``train.collective_timeout_s``. The job stops; what its checkpoints hold is intact."""


def lost_peers(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed collective rather than a bug: torch's distributed errors (NCCL's
    are ``DistBackendError``) and gloo's transport errors, which come as plain ``RuntimeError``
    naming gloo's source (a timed-out receive, a closed connection)."""
    if isinstance(exc, dist.DistError):
        return True
    return is_distributed() and isinstance(exc, RuntimeError) and "gloo" in str(exc)

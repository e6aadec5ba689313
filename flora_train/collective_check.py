"""A test mode that makes CPU runs fail where a GPU job's collectives would.

On a CPU machine every rank talks over gloo, which serves any tensor, so a collective handed a
tensor that NCCL would refuse passes every CPU test and crashes the first multi-GPU step.
``install(gpu_backend)`` wraps ``torch.distributed``'s collectives: each call checks that every
tensor it is handed is on a device the group's backend *as configured on a GPU job* serves
(``gpu_backend`` for the default group and groups made without a backend, the named backend for
the others), and that one call does not mix devices. ``FLORA_TRAIN_CHECK_COLLECTIVES=cuda``
turns it on in every process of a run; the test suite sets it for all its torchrun jobs.

What it cannot see on a CPU machine: which host tensors would be device tensors on a GPU (they
are all CPU here). The design makes that irrelevant: on GPUs the group serves both devices
(``dist.backend_for``), and this check is what fails when it stops doing so.
"""

from __future__ import annotations

import functools
import traceback
from typing import Any

import torch
import torch.distributed as dist

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor", "broadcast",
    "all_to_all", "all_to_all_single", "reduce", "gather", "scatter", "send", "recv", "isend", "irecv",
)


class CollectiveDeviceError(RuntimeError):
    pass


def served_devices(backend: str) -> set[str]:
    """Device types a backend string serves on a GPU job: ``cpu:gloo,cuda:nccl`` both, ``nccl``
    only CUDA, ``gloo`` only the host (its CUDA support does not cover all_to_all)."""
    out = set()
    for part in backend.lower().split(","):
        device, _, name = part.rpartition(":")
        if device:
            out.add(device)
        elif name == "nccl":
            out.add("cuda")
        elif name in ("gloo", "mpi", "ccl"):
            out.add("cpu")
    return out


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "torch/distributed" not in frame.filename and "collective_check" not in frame.filename:
            return f"{frame.filename}:{frame.lineno}"
    return "?"


def install(gpu_backend: str) -> None:
    """Checks every collective from now on (idempotent)."""
    if getattr(dist, "_flora_collective_check", None) is not None:
        return
    group_backends: dict[int, str] = {}
    dist._flora_collective_check = group_backends  # type: ignore[attr-defined]
    real_new_group = dist.new_group

    @functools.wraps(real_new_group)
    def new_group(*args: Any, **kwargs: Any):
        args = list(args)
        backend = kwargs.pop("backend", None) if len(args) <= 2 else args.pop(2)
        # The group is made with the CPU job's own backend (NCCL does not exist here) and checked
        # as the backend it asked for; one made like the default group is what that is on a GPU.
        group = real_new_group(*args, **kwargs)
        if backend is not None and str(backend) != dist.get_backend_config():
            group_backends[id(group)] = str(backend)
        return group

    dist.new_group = new_group

    def wrap(name: str) -> None:
        real = getattr(dist, name)

        @functools.wraps(real)
        def checked(*args: Any, **kwargs: Any):
            group = kwargs.get("group")
            backend = group_backends.get(id(group), gpu_backend) if group is not None else gpu_backend
            served = served_devices(backend)
            tensors = _tensors(args, kwargs)
            devices = {t.device.type for t in tensors}
            if len(devices) > 1:
                raise CollectiveDeviceError(f"{name} at {_caller()}: one call mixes tensors on {sorted(devices)}")
            refused = devices - served
            if refused:
                raise CollectiveDeviceError(
                    f"{name} at {_caller()}: a {refused.pop()} tensor on a group whose backend on a GPU job is "
                    f"{backend!r}, which serves only {sorted(served)} tensors"
                )
            return real(*args, **kwargs)

        setattr(dist, name, checked)

    for name in COLLECTIVES:
        if hasattr(dist, name):
            wrap(name)

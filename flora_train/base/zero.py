"""The frozen base under DeepSpeed ZeRO-3: partitioned at load time, gathered layer by layer.

DeepSpeed only ever sees the frozen base. The adapters are not module parameters (they reach the
layers through the ``AdapterSlot``), so the engine is built without an optimizer and reduces to
ZeRO-3's parameter coordinator: hooks that all-gather a module's weights before its forward and
its backward and free them after. ``AdaptedLinear`` reads its wrapped layer's weight directly, so
it is registered as a ZeRO-3 leaf: its hook gathers the wrapped layer's weight with it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flora_train.launch_env import LaunchEnv, LaunchError


@dataclass(frozen=True)
class ZeroSpec:
    stage: int = 0  # 0: every rank holds the whole base; 3: partitioned over the ranks
    offload_params: str = "none"  # none | cpu
    extra: dict[str, Any] = field(default_factory=dict)  # merged over the generated DeepSpeed config

    @property
    def partitioned(self) -> bool:
        return self.stage == 3


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def deepspeed_config(spec: ZeroSpec, dtype: str, hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a frozen ZeRO-3 base. The batch and clipping entries are required by
    DeepSpeed but unused: the engine never steps an optimizer (set anyway: 0.19 clips at 1.0).

    Gather sizes follow the model's width as transformers' "auto" values do: DeepSpeed's fixed
    defaults (50M-element prefetch buckets, 100k-element persistence) fit neither a small base nor
    a wide one; `bench zero` measured 1.37x stage-0 step time with these against 1.83x with them."""
    zero: dict[str, Any] = {"stage": 3}
    if hidden_size:
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
        zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    if spec.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "steps_per_print": 2**31 - 1,
        "zero_optimization": zero,
        # zero.Init casts the weights it partitions to this dtype: it must be the base's dtype.
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
    }
    return _merge(config, copy.deepcopy(spec.extra))


def check_zero_launch(spec: ZeroSpec, launch: LaunchEnv) -> None:
    """Errors, before anything is loaded, when the launch cannot run the recipe's ZeRO setting."""
    if launch.launcher_zero_stage is not None and launch.launcher_zero_stage != spec.stage:
        raise LaunchError(
            f"accelerate launch asked for DeepSpeed ZeRO stage {launch.launcher_zero_stage} but the recipe has "
            f"base.zero_stage={spec.stage}; make them agree (the recipe key base.zero_stage decides how the "
            "frozen base is held; flora_train runs no ZeRO optimizer, the adapters live in its own store)"
        )
    if (spec.partitioned and launch.launcher_offload_params not in (None, "none")
            and launch.launcher_offload_params != spec.offload_params):
        raise LaunchError(
            f"accelerate launch offloads parameters to {launch.launcher_offload_params!r} but the recipe has "
            f"base.offload_params={spec.offload_params}"
        )
    if spec.partitioned and launch.world_size == 1 and spec.offload_params == "none":
        raise LaunchError(
            "base.zero_stage=3 on a world of one process partitions nothing; start more processes "
            "(torchrun --nproc-per-node N ...), set base.offload_params=cpu, or use base.zero_stage=0"
        )


def _quiet_deepspeed() -> None:
    import logging

    import deepspeed.ops

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    # On CPU, DeepSpeed's comm layer compiles a shared-memory all-reduce (about a minute of g++)
    # that only inference all-reduces use; ZeRO-3's gathers go through the gloo process group.
    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group even for one process (ZeRO-3 with offload on one GPU)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)  # zero.Init reads LOCAL_RANK from the environment
    from flora_train import dist as fdist

    dist.init_process_group(fdist.backend_for(device.type), store=dist.HashStore(), rank=0, world_size=1)
    fdist.check_collectives_if_asked()


class ZeroBase:
    """Holds the DeepSpeed state of a partitioned base for the life of a run.

    ``load`` runs the model loader while transformers' ``HfDeepSpeedConfig`` is alive, so
    ``from_pretrained`` builds every layer inside ``deepspeed.zero.Init`` and no rank ever holds the
    whole base; ``engage`` installs the gather/release hooks once adapters are injected."""

    def __init__(self, spec: ZeroSpec, dtype: str, device: torch.device, hidden_size: int | None = None) -> None:
        _quiet_deepspeed()
        ensure_process_group(device)
        from transformers.integrations import HfDeepSpeedConfig

        self.config = deepspeed_config(spec, dtype, hidden_size)
        self._hf_config: Any = HfDeepSpeedConfig(self.config)  # transformers holds only a weak reference
        self.engine: Any = None
        self.forward_starts = 0  # times ZeRO-3's start-of-forward hook ran (engage counts them)

    def load(self, loader: Callable[[], nn.Module]) -> nn.Module:
        from flora_train.base.loading import ModelLoadError

        try:
            model = loader()
        except (ValueError, TypeError, AssertionError) as exc:
            raise ModelLoadError(f"cannot load the base under DeepSpeed ZeRO-3 (base.deepspeed / "
                                 f"base.zero_stage): {exc}") from None
        whole = [n for n, p in model.named_parameters() if not is_partitioned(p)]
        if whole:
            # A loader that bypasses zero.Init (e.g. one that builds the model itself) would have
            # materialised the whole base on every rank: refuse rather than run unpartitioned.
            raise ModelLoadError(f"the base was loaded without ZeRO-3 partitioning ({len(whole)} parameters "
                                 f"whole, e.g. {whole[0]}); this loader does not support base.zero_stage=3")
        return model

    def engage(self, model: nn.Module, leaf_types: list[type[nn.Module]]) -> None:
        import deepspeed
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, leaf_types)
        try:
            self.engine, *_ = deepspeed.initialize(model=model, config=self.config)
        except (ValueError, TypeError) as exc:  # DeepSpeed's config validation
            raise LaunchError(f"DeepSpeed rejected the config built from base.*: {exc}") from None
        # ZeRO-3's start-of-forward hook (on the root module) resets the parameter coordinator's
        # step: the trace it prefetches from, and its per-step bookkeeping. Counted here, so a run
        # can show that every forward entered through the root (``forward_through_root``).
        coordinator = self.engine.optimizer.get_param_coordinator()
        reset = coordinator.reset_step

        def counted_reset() -> None:
            self.forward_starts += 1
            reset()

        coordinator.reset_step = counted_reset
        self._coordinator = coordinator

    def hook_report(self) -> dict[str, Any]:
        """What DeepSpeed's root hooks did: how many forwards they started, and whether the
        coordinator completed a trace of the module order (what its prefetch follows)."""
        coordinator = getattr(self, "_coordinator", None)
        return {"forward_starts": self.forward_starts,
                "trace_complete": bool(coordinator is not None and coordinator.is_complete_trace())}

    def close(self) -> None:
        """Lets a later base in the same process load unpartitioned."""
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
        self._hf_config = None
        unset_hf_deepspeed_config()


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_tensor")


def resident_base_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of base parameters this rank holds, bytes of the whole base)."""
    held = total = 0
    for p in model.parameters():
        size = p.element_size()
        if is_partitioned(p):
            # Parameters under stage3_param_persistence_threshold stay whole on every rank as well.
            whole = p.ds_numel * size
            held += whole if getattr(p, "ds_persist", False) else p.ds_tensor.numel() * p.ds_tensor.element_size()
            total += whole
        else:
            held += p.numel() * size
            total += p.numel() * size
    return held, total


@contextmanager
def gathered(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Every base parameter, whole, by its name in the loaded checkpoint (collective under ZeRO-3)."""
    params = dict(model.named_parameters())
    names = {n: n.replace(".base_layer.", ".") for n in params}
    partitioned = [p for p in params.values() if is_partitioned(p)]
    if not partitioned:
        yield {names[n]: p for n, p in params.items()}
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield {names[n]: p for n, p in params.items()}


def forward_through_root(model: nn.Module, forward: Callable[[], Any]) -> Any:
    """Runs ``forward()`` (which calls some of ``model``'s submodules, e.g. the backbone, then the
    head on target rows only) as ``model``'s own forward, through ``model.__call__``: the root
    module's hooks run as they do for ``model(...)``. DeepSpeed ZeRO-3 hangs its start-of-forward
    (coordinator reset, trace, prefetch) and end-of-forward hooks on the root; calling submodules
    directly skipped them. Any forward set on the instance (accelerate's hooks) is put back."""
    had = model.__dict__.get("forward")
    model.forward = lambda *_args, **_kwargs: forward()
    try:
        return model()
    finally:
        if had is None:
            del model.forward
        else:
            model.forward = had

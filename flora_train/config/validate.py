"""Cross-field checks OmegaConf's types cannot express. Each error names the key, and where its value
came from (``source(key)``: the override that set it, or its line in the recipe file)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from flora_train.adapters.functional import kernel_error
from flora_train.adapters.methods import get_method
from flora_train.config.schema import ExportFormat
from flora_train.devices import BASE_DTYPES, device_error
from flora_train.store.optimizers import OPTIMIZERS, state_dtype_refusal

Source = Callable[[str], str]  # key -> where its value was set ("r.yaml:7", "override 'k=v'")


def _fail(source: Source, key: str, message: str) -> None:
    from flora_train.config.load import RecipeError

    raise RecipeError(f"{source(key)}: key '{key}': {message}")


def _positive(cfg: DictConfig, source: Source, keys: list[str]) -> None:
    for key in keys:
        value = cfg
        for part in key.split("."):
            value = value[part]
        if value is not None and value <= 0:
            _fail(source, key, f"must be > 0, got {value}")


def _check_targets(targets, source: Source, key: str) -> None:
    if isinstance(targets, str):
        if targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as exc:
                _fail(source, key, f"not a valid regular expression: {exc}")
    elif not OmegaConf.is_list(targets) or not targets or not all(isinstance(t, str) and t for t in targets):
        shown = OmegaConf.to_container(targets) if OmegaConf.is_config(targets) else targets
        _fail(source, key, f"must be a non-empty list of module names, a regex or 'all-linear', got {shown}")


FREE_FORM = ("base.deepspeed", "launch.env")  # mappings passed on as they are (an env value may be '')


def _leaves(node: object, prefix: str = "") -> list[tuple[str, object]]:
    """``(key, value)`` of every value in the recipe outside ``FREE_FORM`` (a list's items as ``key.i``)."""
    if isinstance(node, dict):
        return [leaf for name, v in node.items() if f"{prefix}{name}" not in FREE_FORM
                for leaf in _leaves(v, f"{prefix}{name}.")]
    if isinstance(node, list):
        return [leaf for i, v in enumerate(node) for leaf in _leaves(v, f"{prefix}{i}.")]
    return [(prefix[:-1], node)]


def _whole(key: str) -> str:
    """A list item's key names its list (the key the user wrote)."""
    return key.rsplit(".", 1)[0] if key.rsplit(".", 1)[-1].isdigit() else key


def validate_recipe(cfg: DictConfig, source: Source) -> None:
    base, data, train = cfg.base, cfg.data, cfg.train
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)):
        # A path of '' is the current directory (run_dir='' would write the run into it); no name or column is ''.
        if isinstance(value, str) and not value.strip():
            _fail(source, _whole(key), "is empty: give it a value, or leave it out (null) for its default")
        # nan passes every `<= 0` check (store.optimizer.lr=nan trained nothing and said it trained).
        if isinstance(value, float) and not math.isfinite(value):
            _fail(source, _whole(key), f"must be a finite number, got {value}")
    if (base.name_or_path is None) == (base.tiny is None):
        _fail(source, "base.name_or_path", "set exactly one of base.name_or_path (hub id or folder) and base.tiny")
    if base.gguf_file is not None and base.name_or_path is None:
        _fail(source, "base.gguf_file", "needs base.name_or_path (the folder holding the GGUF file)")
    if base.dtype not in BASE_DTYPES:
        _fail(source, "base.dtype", f"must be {', '.join(BASE_DTYPES[:-1])} or {BASE_DTYPES[-1]}, got {base.dtype!r}")
    if base.dtype == "float16":
        # Refused rather than scaled: adapter gradients below float16's 6e-8 would flush to zero with
        # no error, and bfloat16 gives the same memory with float32's range (no scaler needed).
        _fail(source, "base.dtype", "float16 trains without loss scaling (adapter gradients underflow to zero "
              "silently); use bfloat16: the same memory, float32's range")
    if base.tiny is not None and base.tiny.architecture not in ("llama", "gpt2"):
        _fail(source, "base.tiny.architecture", f"must be llama or gpt2, got {base.tiny.architecture!r}")
    if base.zero_stage not in (0, 3):
        _fail(source, "base.zero_stage", f"must be 0 or 3, got {base.zero_stage}: stages 1 and 2 partition "
              "gradients and optimizer state, which the frozen base has none of (the adapters live in the store)")
    if base.gguf_file is not None and base.zero_stage == 3:
        _fail(source, "base.zero_stage", "3 cannot partition a GGUF base: transformers loads a GGUF file whole, outside "
              "DeepSpeed's zero.Init, so every rank would hold all of it. Convert it once to a safetensors folder "
              f"(flora-train base convert {base.name_or_path} --gguf-file {base.gguf_file} --out DIR), then set "
              "base.name_or_path=DIR and base.gguf_file=null")
    if base.offload_params.value != "none" and base.zero_stage != 3:
        _fail(source, "base.offload_params", "parameter offload needs base.zero_stage=3")
    zero_extra = base.deepspeed.get("zero_optimization")
    ds_stage = zero_extra.get("stage") if isinstance(zero_extra, DictConfig) else None
    if ds_stage is not None and ds_stage != base.zero_stage:
        _fail(source, "base.deepspeed.zero_optimization.stage",
              f"is {ds_stage} but base.zero_stage is {base.zero_stage}; set the stage through base.zero_stage only")
    _check_targets(cfg.adapter.target_modules, source, "adapter.target_modules")
    if not 0 <= data.validation_fraction < 1:
        _fail(source, "data.validation_fraction", f"must be in [0, 1), got {data.validation_fraction}")
    has_validation = data.validation_fraction > 0 or data.validation_path is not None
    if data.validation_fraction > 0 and data.validation_path is not None:
        _fail(source, "data.validation_fraction", "set data.validation_fraction or data.validation_path, not both")
    for key, wanted in (("train.select", train.select.value == "best"), ("train.patience", train.patience is not None)):
        if wanted and not has_validation:
            _fail(source, key, "needs a validation split: set data.validation_fraction (e.g. 0.2) or data.validation_path")
    _positive(cfg, source, ["train.patience"])
    sweep = list(train.sweep.lr)
    if sweep:
        if not all(isinstance(v, (int, float)) and v > 0 for v in sweep) or len(set(sweep)) != len(sweep):
            _fail(source, "train.sweep.lr", f"must be distinct learning rates > 0, got {sweep}")
        if train.select.value != "best":
            _fail(source, "train.select", "must be best with train.sweep.lr: each user keeps its variant whose kept row "
                  "has the lowest validation loss")
        if train.on_data_change.value == "new_phase":
            _fail(source, "train.on_data_change", "new_phase with train.sweep.lr is not supported: a swept run's users "
                  "are chosen once, at its end")
    if train.validate_every_steps < 0:
        _fail(source, "train.validate_every_steps", f"must be >= 0, got {train.validate_every_steps}")
    shared = cfg.adapter.shared
    if shared is not None:
        _check_targets(shared.target_modules, source, "adapter.shared.target_modules")
        _positive(cfg, source, ["adapter.shared.rank", "adapter.shared.alpha", "adapter.shared.lr", "train.shared_steps"])
        if train.shared_phase.value == "joint" and train.shared_steps is not None:
            _fail(source, "train.shared_steps", "is the length of shared_phase=first's own phase; with joint the shared "
                  "adapter trains in every step (leave it null)")
    for key, value in (("data.train_path", data.train_path), ("data.eval_path", data.eval_path),
                       ("data.validation_path", data.validation_path), ("train.retain.path", train.retain.path),
                       ("eval.general_path", cfg.eval.general_path)):
        items = list(value) if OmegaConf.is_list(value) else [value]
        if value is not None and (not items or not all(isinstance(v, str) and v for v in items)):
            _fail(source, key, "must be a path, a folder, a glob pattern, a dataset id or a list of them")
    if (data.train_path is None) == (data.synthetic is None):
        _fail(source, "data.train_path", "set exactly one of data.train_path and data.synthetic")
    if data.synthetic is not None and data.eval_path is not None:
        _fail(source, "data.eval_path", "synthetic data writes its own eval split; leave data.eval_path unset")
    _positive(
        cfg,
        source,
        [
            "adapter.rank",
            "adapter.alpha",
            "data.max_length",
            "train.epochs",
            "train.max_steps",
            "train.users_per_step",
            "train.examples_per_user",
            "train.micro_batch_size",
            "train.micro_batch_tokens",
            "train.log_every_steps",
            "train.keep_checkpoints",
            "train.full_checkpoint_every",
            "export.pack_size",
            "train.max_consecutive_nonfinite",
            "train.collective_timeout_s",
            "eval.batch_size",
            "store.optimizer.lr",
            "store.optimizer.eps",
        ],
    )
    if train.micro_batch_size is None and train.micro_batch_tokens is None:
        _fail(source, "train.micro_batch_size", "null needs train.micro_batch_tokens: a micro-batch needs a size")
    if train.packing and train.micro_batch_tokens is None:
        _fail(source, "train.packing", "packs examples into rows of train.micro_batch_tokens tokens: set it too")
    if train.micro_batch_tokens is not None and train.micro_batch_tokens < data.max_length:
        _fail(source, "train.micro_batch_tokens", f"{train.micro_batch_tokens} tokens cannot hold an example of "
              f"data.max_length={data.max_length} tokens; set it to at least that")
    for key in ("data.eval_examples_per_user", "train.checkpoint_every_steps", "train.checkpoint_every_minutes",
                "eval.every_steps", "store.optimizer.warmup_steps", "store.optimizer.weight_decay"):
        section, _, leaf = key.rpartition(".")
        node = cfg
        for part in section.split("."):
            node = node[part]
        if node[leaf] < 0:
            _fail(source, key, f"must be >= 0, got {node[leaf]}")
    if data.synthetic is not None:
        syn = data.synthetic
        for leaf in ("num_users", "train_examples_per_user", "num_keys", "num_values"):
            if syn[leaf] <= 0:
                _fail(source, f"data.synthetic.{leaf}", f"must be > 0, got {syn[leaf]}")
        chat = syn.task.value == "persona_chat"
        if chat and data.messages_column != "messages":
            _fail(source, "data.messages_column", "data.synthetic.task=persona_chat writes chat rows: set it to messages")
        if not chat and data.messages_column is not None:
            _fail(source, "data.messages_column", f"data.synthetic.task={syn.task.value} writes prompt/completion rows: "
                  "leave it unset")
    if train.retain.examples_per_user_step < 1:
        _fail(source, "train.retain.examples_per_user_step", f"must be >= 1, got {train.retain.examples_per_user_step}")
    opt = cfg.store.optimizer
    if opt.state_dtype.value not in OPTIMIZERS[opt.name.value].state_dtypes:
        _fail(source, "store.optimizer.state_dtype", state_dtype_refusal(opt.name.value, opt.state_dtype.value))
    for leaf in ("beta1", "beta2"):
        if not 0.0 <= opt[leaf] < 1.0:
            _fail(source, f"store.optimizer.{leaf}", f"must be in [0, 1), got {opt[leaf]}")
    if not 0.0 <= opt.min_lr_ratio <= 1.0:
        _fail(source, "store.optimizer.min_lr_ratio", f"must be in [0, 1], got {opt.min_lr_ratio}")
    if cfg.store.cache_rows < 0:
        _fail(source, "store.cache_rows", f"must be >= 0, got {cfg.store.cache_rows}")
    if 0 < cfg.store.cache_rows < train.users_per_step:
        _fail(source, "store.cache_rows", f"must hold a step's users (train.users_per_step={train.users_per_step}) or be 0")
    if (error := device_error(train.device)) is not None:
        _fail(source, "train.device", error)
    la = cfg.launch
    _positive(cfg, source, ["launch.nodes", "launch.procs_per_node", "launch.cpus_per_proc", "launch.port"])
    if la.gpus_per_node < 0:
        _fail(source, "launch.gpus_per_node", f"must be >= 0, got {la.gpus_per_node}")
    if la.gpus_per_node and la.procs_per_node > la.gpus_per_node:
        _fail(source, "launch.procs_per_node", f"{la.procs_per_node} processes cannot each have a GPU of "
              f"launch.gpus_per_node={la.gpus_per_node}")
    if la.procs_per_node < la.gpus_per_node:  # `--gpus-per-node 8` alone trained on one GPU of the eight
        procs, gpus = la.procs_per_node, la.gpus_per_node
        _fail(source, "launch.procs_per_node", f"{procs} process{'' if procs == 1 else 'es'} per node would leave "
              f"{gpus - procs} of launch.gpus_per_node={gpus} GPUs idle (each training process drives one GPU): "
              f"set launch.procs_per_node={gpus} (--procs-per-node {gpus})")
    if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", la.time_limit):
        _fail(source, "launch.time_limit", f"must look like [D-]HH:MM:SS, got {la.time_limit!r}")
    for name in la.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)):
            _fail(source, f"launch.env.{name}", "is not a valid environment variable name")
    kernel = kernel_error(cfg.adapter.method.value, cfg.adapter.kernel.value)
    if kernel:
        _fail(source, "adapter.kernel", kernel)
    if cfg.export.format == ExportFormat.peft and get_method(cfg.adapter.method.value).peft_type is None:
        _fail(
            source,
            "export.format",
            f"PEFT has no {cfg.adapter.method.value} adapter matching flora_train's; use export.format=flora",
        )

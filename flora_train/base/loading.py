"""Load the frozen foundation model and its tokenizer (hub id, local folder or GGUF file)."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from flora_train.devices import BASE_DTYPES, missing_device
from flora_train.errors import UserError
from flora_train.hub import unreachable_hub

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in BASE_DTYPES}


class ModelLoadError(UserError, RuntimeError):
    pass


def resolve_device(name: str, local_rank: int = 0, local_world_size: int = 1) -> torch.device:
    """``auto`` picks CUDA when present; a bare ``cuda`` is the local rank's GPU (one GPU per process).
    ``cuda:N`` with more than one process on the node is refused, not remapped: every process reads
    the same recipe, so all of them would take GPU N and NCCL fails on the duplicate GPU (and
    remapping N silently would make the key mean two things)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ModelLoadError(f"train.device={name!r} is not a device: {exc}") from None
    if device.type == "cuda" and device.index is not None and (local_world_size > 1 or local_rank > 0):
        raise ModelLoadError(
            f"train.device={name!r} would put all {max(local_world_size, local_rank + 1)} processes of this node on GPU "
            f"{device.index}; set train.device=cuda (each process takes its local rank's GPU) and choose GPUs with "
            "CUDA_VISIBLE_DEVICES")
    missing = missing_device(name if device.index is not None else device.type)
    if device.type in ("cuda", "mps") and missing:
        raise ModelLoadError(f"key 'train.device': {missing}")
    if device.type == "cuda" and device.index is None:
        if local_rank >= torch.cuda.device_count():
            raise ModelLoadError(
                f"local rank {local_rank} has no GPU: this node shows {torch.cuda.device_count()} "
                "(start at most one process per GPU on each node)"
            )
        device = torch.device("cuda", local_rank)
    return device


def looks_local(name_or_path: str) -> bool:
    """A filesystem path rather than a hub id (``org/name``): absolute, relative with ``./``,
    ``../`` or ``~``, or more than one ``/``."""
    return name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1


def check_source(name_or_path: str, gguf_file: str | None) -> None:
    """Fails at once, naming the key, where ``from_pretrained`` would retry the hub for a minute or
    print a bogus hub URL: a local folder that is not there, a GGUF file not in the folder, a
    missing ``gguf`` package."""
    folder = Path(name_or_path).expanduser()
    if looks_local(name_or_path) and not folder.is_dir():
        raise ModelLoadError(f"base.name_or_path={name_or_path!r}: no such folder")
    if not gguf_file:
        return
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("base.gguf_file needs the gguf package: pip install 'flora_train[gguf]' (or pip install gguf)")
    if folder.is_dir() and not (folder / gguf_file).is_file():
        present = sorted(p.name for p in folder.glob("*.gguf"))
        raise ModelLoadError(f"base.gguf_file={gguf_file!r} is not in {folder}; GGUF files there: "
                             + (", ".join(present) if present else "none"))


def _in_hub_cache(name_or_path: str, gguf_file: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name_or_path, gguf_file or "config.json"), str)


def hub_unavailable(name_or_path: str, gguf_file: str | None = None) -> str | None:
    """For a hub id: the hub's host when this machine can neither reach it nor find the model in the
    Hugging Face cache; else None (loadable, from the hub or the cache)."""
    host = unreachable_hub()
    return None if host is None or _in_hub_cache(name_or_path, gguf_file) else host


def _cache_instead_of_hub(name_or_path: str, gguf_file: str | None, what: str) -> bool:
    """For a hub id on a machine that cannot reach the hub: True when the model is in the Hugging
    Face cache (read it from there, at once and without retries); one error saying what to do when
    it is not. False when the hub is reachable."""
    host = unreachable_hub()
    if host is None:
        return False
    if not _in_hub_cache(name_or_path, gguf_file):
        raise ModelLoadError(
            f"cannot load {what} '{name_or_path}': it is not a local folder nor in the Hugging Face cache, and "
            f"{host} cannot be reached from this machine; download it where there is network and name its "
            "folder in base.name_or_path (or copy the cache, $HF_HOME)")
    return True


def _pretrained(what: str, factory: Any, name_or_path: str, gguf_file: str | None, trust_remote_code: bool,
                **kwargs: Any) -> Any:
    """``factory.from_pretrained`` with one error that names what failed to load and from where."""
    check_source(name_or_path, gguf_file)
    if not kwargs.get("local_files_only") and not Path(name_or_path).expanduser().exists():
        kwargs["local_files_only"] = _cache_instead_of_hub(name_or_path, gguf_file, what)
    if kwargs.get("local_files_only") and hasattr(factory, "_model_mapping"):
        # AutoModel*'s probe for a PEFT adapter in the repo is not given local_files_only (transformers
        # 5.x): it asks the hub, retrying for most of a minute, when the model is read from the cache
        kwargs["adapter_kwargs"] = {"local_files_only": True}
    kwargs["trust_remote_code"] = trust_remote_code
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return factory.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, ImportError, SafetensorError, struct.error) as exc:  # the last two: a cut file
        hint = "" if Path(name_or_path).exists() else (
            " (not a local folder nor in the Hugging Face cache, and nothing is downloaded here)"
            if kwargs.get("local_files_only") else " (not a local folder; hub ids need network access)")
        raise ModelLoadError(f"cannot load {what} '{name_or_path}'{hint}: {exc}") from None


def load_config(name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False,
                local_files_only: bool = False) -> Any:
    """The model's config alone. ``local_files_only``: a local folder or the Hugging Face cache, never
    the hub (``validate``: offline, the hub is retried for a minute before it fails)."""
    from transformers import AutoConfig

    return _pretrained("the config of model", AutoConfig, name_or_path, gguf_file, trust_remote_code,
                       local_files_only=local_files_only)


def load_tokenizer(name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False,
                   local_files_only: bool = False) -> Any:
    from transformers import AutoTokenizer

    tok = _pretrained("the tokenizer of model", AutoTokenizer, name_or_path, gguf_file, trust_remote_code,
                      local_files_only=local_files_only)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_frozen_model(
    name_or_path: str,
    dtype: str = "float32",
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """A causal LM with every parameter frozen and dropout off."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model = _pretrained("model", AutoModelForCausalLM, name_or_path, gguf_file, trust_remote_code, dtype=DTYPES[dtype])
    model.requires_grad_(False)
    if gradient_checkpointing:
        # HF only checkpoints in training mode; the base stays deterministic because dropout is zeroed.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable_dropout(model)
        model.train()
    else:
        model.eval()
    return model


def disable_dropout(model: nn.Module) -> None:
    """Sets every dropout probability to zero so that training mode changes nothing numerically."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout", "activation_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


def model_hidden_size(name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False) -> int | None:
    """The model's width from its config alone (no weights), or None if the config names none."""
    from transformers import AutoConfig

    config = _pretrained("the config of model", AutoConfig, name_or_path, gguf_file, trust_remote_code)
    config = getattr(config, "text_config", config)
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, key, None), int):
            return int(getattr(config, key))
    return None

"""Load the frozen foundation model and its tokenizer (hub id, local folder or GGUF file)."""

from __future__ import annotations

import os

from pathlib import Path
from typing import Any

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per local rank
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"train.device={name!r} but no CUDA device is available")
    return device


def load_tokenizer(name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of model '{name_or_path}': {exc}") from None
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

    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        hint = "" if Path(name_or_path).exists() else " (not a local folder; hub ids need network access)"
        raise ModelLoadError(f"cannot load model '{name_or_path}'{hint}: {exc}") from None
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

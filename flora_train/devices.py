"""The device names a recipe's ``train.device`` and the commands' ``--device`` take, and the base
model's dtype names (``base.dtype``, ``serve --dtype``, ``base convert --dtype``). Torch-free: the
CLI's parser offers them before anything heavy is imported."""

from __future__ import annotations

import argparse
import re

DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
BASE_DTYPES = ("float32", "bfloat16", "float16")  # torch's names for them (base/loading.py maps them)


def device_error(device: str) -> str | None:
    """Why ``device`` names no device this project runs on (None when it does): the recipe's
    ``train.device`` and the commands' ``--device`` take the same names."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        return f"must be {DEVICE_FORMS}, got {device!r}"
    return None


def missing_device(device: str) -> str | None:
    """Why this machine has no ``device`` (a name ``device_error`` accepts), or None: found before
    anything is loaded, where torch would fail deep inside a model's ``.to()``."""
    import torch  # here, not at the top: the CLI builds its parser before anything needs torch

    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            return f"{device}: this machine has {count} CUDA device{'' if count == 1 else 's'}"
    if device == "mps" and not torch.backends.mps.is_available():
        return "mps: this machine has no MPS device (Apple silicon, with a PyTorch built for it)"
    return None


def device_arg(text: str) -> str:
    """An argparse type for ``--device``: a name ``device_error`` accepts, of a device this machine
    has (else a run would start and fail deep inside torch)."""
    error = device_error(text) or missing_device(text)
    if error is not None:
        raise argparse.ArgumentTypeError(error)
    return text

"""Loading the frozen foundation model: hub id, local folder, GGUF, or a tiny model built locally."""

from flora_train.base.loading import ModelLoadError, disable_dropout, load_frozen_model, load_tokenizer, resolve_device
from flora_train.base.tiny import build_tiny_model, train_tokenizer

__all__ = [
    "ModelLoadError",
    "build_tiny_model",
    "disable_dropout",
    "load_frozen_model",
    "load_tokenizer",
    "resolve_device",
    "train_tokenizer",
]

"""Using what was trained: a base plus every user's adapter, mixed-user generation, serving."""

from flora_train.inference.generate import Generation, GenerationSettings, GenerationStats, generate, generate_batch
from flora_train.inference.trained import InferenceError, TrainedAdapters, load_trained, resolve_source

__all__ = ["Generation", "GenerationSettings", "GenerationStats", "InferenceError", "TrainedAdapters", "generate",
           "generate_batch", "load_trained", "resolve_source"]

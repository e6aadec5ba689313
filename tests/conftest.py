"""Shared fixtures: tiny models built locally (never downloaded) and quiet libraries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every process group the suite starts (torchrun jobs, CLI runs) checks each collective as a GPU
# job's backend would serve it: a CPU tensor handed to NCCL fails here, not on the first GPU step.
os.environ.setdefault("FLORA_TRAIN_CHECK_COLLECTIVES", "cuda")

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # `make test` gives each of its two workers one core (OMP_NUM_THREADS=1). Two threads per
    # worker on the 2-core machine put four busy threads on two cores, and in-process training then
    # ran 2-3x slower than on one thread (the generation-eval file: 104 s against 47 s).
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


TINY = dict(
    architecture="llama", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    vocab_size=300, max_position_embeddings=64, seed=0, pretrain_steps=0,
)


@pytest.fixture(scope="session")
def synthetic_texts() -> list[str]:
    from flora_train.data import SyntheticTask

    task = SyntheticTask(num_users=20, train_examples_per_user=8)
    return [e["prompt"] + e["completion"] for i in range(20) for e in task.examples(i, "train", 8)]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, synthetic_texts) -> Path:
    from flora_train.base import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), dict(TINY), synthetic_texts)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, synthetic_texts) -> Path:
    from flora_train.base import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_gpt2"), dict(TINY, architecture="gpt2"), synthetic_texts)

"""``adapter.kernel: auto`` and resume: every kernel choice is made before the first step, so a run
cut and resumed takes the kernels the uninterrupted run took, and ends on the same bits."""

import json
import zlib

import torch

import flora_train.adapters.tuning as tuning
from flora_train.config import load_recipe
from flora_train.train.run import run_training
from tests.distributed.helpers import saved_state, small_recipe


def test_a_resumed_run_takes_the_kernels_the_uninterrupted_run_took(tmp_path, tiny_llama_dir, monkeypatch):
    """Timing noise, replayed: a process's n-th measurement reads a clock that depends on n alone,
    so the kernel a shape gets depends on when in its process it is measured, as with real noise.
    Measured as the run went, the shapes first met after the resume were timed at other n than the
    uninterrupted run timed them, took other kernels, and the rows differed in their last bits."""
    clock = {"n": 0}

    def noisy(method, kernel, *args, **kwargs):
        clock["n"] += 1
        return 1e-6 * (1 + zlib.crc32(f"{kernel}/{clock['n']}".encode()) % 997)

    monkeypatch.setattr(tuning, "time_kernel", noisy)

    def run(overrides, resume=False):
        clock["n"] = 0  # each run is a process of its own: its own noise
        run_training(load_recipe(None, overrides), resume=resume)

    recipe = [*small_recipe(tmp_path, tiny_llama_dir), "eval.at_end=false", "adapter.method=lora", "adapter.rank=2",
              "train.micro_batch_size=null", "data.max_length=64", "train.micro_batch_tokens=64"]
    run([*recipe, f"run_dir={tmp_path / 'whole'}"])
    run([*recipe, f"run_dir={tmp_path / 'cut'}", "train.max_steps=2"])
    run([*recipe, f"run_dir={tmp_path / 'cut'}"], resume=True)
    choices = [json.loads((tmp_path / run_dir / "kernels" / "rank-0.json").read_text()) for run_dir in ("whole", "cut")]
    assert choices[0] == choices[1] and len(set(choices[0].values())) > 1, choices
    whole, resumed = saved_state(tmp_path / "whole"), saved_state(tmp_path / "cut")
    for user, state in whole.items():
        for key, value in state.items():
            assert torch.equal(resumed[user][key], value), (user, key)

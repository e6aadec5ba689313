"""`bench lengths` builds one recipe per setting; they must validate and differ only where the
setting says, on a CPU and on a GPU (the GPU's is built here without one: bf16, so packing can take
flash-attention's varlen kernel; the doctor runs this bench on the device it checks)."""

import pytest
import torch

from flora_train.bench.lengths import SETTINGS, TINY_BASE, prepare_data, setting_recipes
from flora_train.config import load_recipe


@pytest.mark.parametrize("device,precision", [("cpu", "fp32"), ("cuda", "bf16")])
def test_every_setting_recipe_validates_with_the_devices_precision(tmp_path, device, precision):
    recipes = setting_recipes(tmp_path, tmp_path / "base", torch.device(device), users=8, longest=100, budget=512,
                              micro_batch_size=4, timed_epochs=3)
    assert tuple(recipes) == SETTINGS
    cfg = {s: load_recipe(None, [*r, f"run_dir={tmp_path / s}", "adapter.method=lora", "adapter.rank=8"])
           for s, r in recipes.items()}
    for setting, c in cfg.items():
        assert (c.train.device, c.train.precision) == (device, precision), setting  # Precision is a str enum
        assert c.train.epochs == 4 and c.data.max_length == 116 and c.train.users_per_step == 4
        uniform = setting in ("uniform", "packed_uniform")
        assert c.data.train_path.endswith("uniform.jsonl" if uniform else "real.jsonl"), setting
    assert [(c.train.micro_batch_size, c.train.micro_batch_tokens, c.train.packing) for c in cfg.values()] == [
        (4, None, False), (None, 512, False), (None, 512, True), (None, 512, True), (4, None, False)]


def test_the_recipes_hold_every_example_the_tiny_bench_writes(tmp_path):
    """`bench lengths --tiny` (and `doctor` on a small machine) stopped at its first setting:
    "real.jsonl:220: 1042 tokens > data.max_length=784". Its base had a 400-token vocabulary, so a
    word took more than the two tokens the lengths assume; max_length is now what the base's own
    tokenizer counts, and the tiny base keeps the default's vocabulary."""
    lengths, mean, model_dir, longest_tokens = prepare_data(tmp_path, users=4, examples_per_user=16, median=60,
                                                            sigma=0.9, longest=768, base=TINY_BASE)
    recipes = setting_recipes(tmp_path, model_dir, torch.device("cpu"), 4, longest_tokens, 4096, 16, 1)
    cfg = load_recipe(None, [*recipes["packed"], f"run_dir={tmp_path / 'r'}"])
    assert cfg.data.max_length >= longest_tokens
    # The lengths the bench reports are near what the base computes: about two tokens a word.
    assert int(lengths.max()) <= longest_tokens <= int(lengths.max()) * 1.1 + 4, (int(lengths.max()), longest_tokens)

"""Examples of real-text lengths through the CLI: `validate` names the keys that cut the padding,
and a packed run trains every user exactly as that user's packed run alone does."""

import json
import random

import numpy as np
import pytest
import torch

from tests.distributed.helpers import saved_state
from tests.e2e.helpers import flora_train

pytestmark = pytest.mark.slow
USERS = ["ann", "bob", "cy", "dee"]


def _data(path, seed=0):
    """Log-normal lengths (median ~8 words, a tail to 18): most examples short, a few long."""
    rng = random.Random(seed)
    lengths = np.clip(np.random.default_rng(seed).lognormal(np.log(8), 0.7, 48), 2, 18).astype(int)
    rows = [{"user_id": USERS[k % len(USERS)], "text": " ".join(rng.choice("abcdefghij") + rng.choice("klmnop")
                                                              for _ in range(n))} for k, n in enumerate(lengths)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _recipe(model_dir, data, run_dir, *extra):
    return ["recipes/quickstart.yaml", f"run_dir={run_dir}", "base.tiny=null", f"base.name_or_path={model_dir}",
            "data.synthetic=null", f"data.train_path={data}", "data.text_column=text", "data.max_length=64",
            "data.eval_examples_per_user=0", "train.users_per_step=4", "train.examples_per_user=3", "train.epochs=2",
            "train.compare_shared_baseline=false", "tracking.enabled=false", "train.progress=false", "eval.at_end=false",
            "adapter.method=lora", "adapter.rank=2", "store.optimizer.lr=0.02", "train.log_every_steps=1", *extra]


def test_validate_warns_of_padding_and_a_packed_run_trains_each_user_as_alone(tmp_path, tiny_llama_dir):
    rows = _data(tmp_path / "all.jsonl")
    padded = flora_train("validate", *_recipe(tiny_llama_dir, tmp_path / "all.jsonl", tmp_path / "v", "train.micro_batch_size=8"))
    share = int(padded.stdout.split("# padding: ")[1].split("%")[0])
    assert share < 67, padded.stdout
    warning = padded.stderr
    assert "flora-train: warning:" in warning and "train.micro_batch_size=8" in warning
    assert "set train.micro_batch_tokens=" in warning and "train.packing=true (100%)" in warning
    packing = ["train.micro_batch_size=null", "train.micro_batch_tokens=64", "train.packing=true"]
    packed = flora_train("validate", *_recipe(tiny_llama_dir, tmp_path / "all.jsonl", tmp_path / "v", *packing))
    assert "# padding: 100% of the tokens the base computes are real" in packed.stdout and "warning" not in packed.stderr

    flora_train("run", *_recipe(tiny_llama_dir, tmp_path / "all.jsonl", tmp_path / "joint", *packing))
    joint = saved_state(tmp_path / "joint")
    assert sorted(joint) == sorted(USERS)
    assert not torch.allclose(joint[USERS[0]]["rows"], joint[USERS[1]]["rows"], atol=1e-3), "users trained apart"
    for user in USERS[1:2]:
        own = tmp_path / f"{user}.jsonl"
        own.write_text("".join(json.dumps(r) + "\n" for r in rows if r["user_id"] == user))
        flora_train("run", *_recipe(tiny_llama_dir, own, tmp_path / user, *packing))
        alone = saved_state(tmp_path / user)[user]
        assert int(alone["optim.step"]) == int(joint[user]["optim.step"]) > 0
        # float32: the same sums in other rows and orders (tolerance as tests/integration/test_independence.py).
        torch.testing.assert_close(alone["rows"], joint[user]["rows"], rtol=1e-3, atol=5e-5)

"""The base's positions (max_position_embeddings) bound every example, whatever data.max_length
says: GPT-2's learned position table has no row past them, and a rotary base never trained there."""

import json

import pytest

from flora_train.config import load_recipe
from flora_train.data import DataError
from flora_train.train.run import run_training


def test_examples_past_the_bases_context_are_bad_rows_not_an_index_error(tmp_path, capsys):
    """With a 64-position GPT-2 base and data.max_length 256 (the default), rows of 83 tokens ended
    the run with IndexError 'index out of range in self', first in the tiny base's own pretraining
    on the data's texts, then in the first step. Now the tiny base pretrains on texts cut to its
    positions, and such a row is a bad row naming the context and the key."""
    path = tmp_path / "d.jsonl"
    rows = [{"user_id": f"u{i % 3}", "prompt": "favourite colour " * (40 if i == 4 else 2), "completion": " red"}
            for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = [f"run_dir={tmp_path / 'run'}", f"data.train_path={path}", "base.tiny.architecture=gpt2",
              "base.tiny.max_position_embeddings=64", "base.tiny.hidden_size=32", "base.tiny.num_heads=2",
              "base.tiny.vocab_size=300", "base.tiny.pretrain_steps=2", "adapter.target_modules=[c_attn]",
              "train.users_per_step=3", "train.examples_per_user=2", "train.epochs=1", "tracking.enabled=false",
              "train.progress=false", "eval.at_end=false"]
    with pytest.raises(DataError, match=rf"^{path}:5: user 'u1': \d+ tokens > the base's context of 64 tokens "
                                        r"\(max_position_embeddings; data.max_length=256\) \(set data.on_bad_row=skip"):
        run_training(load_recipe(None, recipe))
    # Held-out generation (eval.generate, 32 new tokens) on a prompt of 50 tokens ran past the 64
    # positions at the end of the run: the same IndexError, after all the training.
    held_out = tmp_path / "e.jsonl"
    held_out.write_text("".join(json.dumps({"user_id": f"u{i}", "prompt": "favourite colour " * (24 if i else 2),
                                            "completion": " red"}) + "\n" for i in range(3)))
    result = run_training(load_recipe(None, [*recipe, "data.on_bad_row=skip", f"data.eval_path={held_out}",
                                             "eval.at_end=true", "eval.generate=true", "eval.max_new_tokens=32",
                                             "train.compare_shared_baseline=false"]))
    assert result["steps"] > 0 and "skipped 1 bad row: " in capsys.readouterr().out
    assert result["eval_generate"]["eval_gen/users"] == 3, result.keys()

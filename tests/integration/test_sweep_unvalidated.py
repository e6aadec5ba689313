"""A learning-rate sweep over users too small to spare a validation example: they take no step
(select: best keeps their identity row) and are not counted as choosing a rate."""

import json

from flora_train.config import load_recipe
from flora_train.train.run import run_training
from tests.distributed.helpers import saved_state, small_recipe


def test_a_sweep_counts_no_rate_for_users_it_could_not_validate(tmp_path, tiny_llama_dir, capsys, caplog):
    recipe = small_recipe(tmp_path, tiny_llama_dir)
    train_path = tmp_path / "data" / "train.jsonl"
    lines = train_path.read_text().splitlines()
    small = "user-000003"
    mine = [line for line in lines if json.loads(line)["user_id"] == small]
    others = [line for line in lines if json.loads(line)["user_id"] != small]
    train_path.write_text("\n".join([*others, mine[0]]) + "\n")  # one example: none to spare
    with caplog.at_level("WARNING", logger="flora_train"):
        result = run_training(load_recipe(None, [*recipe, f"run_dir={tmp_path / 'run'}", "eval.at_end=false",
                                                 "data.validation_fraction=0.34", "train.select=best",
                                                 "train.sweep.lr=[0.02,0.2]"]))
    out = capsys.readouterr()
    assert "too few examples to spare one for validation and keep the identity row" in caplog.text
    # It was counted under the first rate, by a tie of two missing losses.
    assert "; 1 user(s) with no validation loss keep the first, 0.02" in out.out
    assert sum(result["sweep"]["chosen_counts"].values()) == 11 and result["sweep"]["unvalidated_users"] == 1
    state = saved_state(tmp_path / "run")
    assert int(state[small]["optim.step"]) == 0 and len(state) == 12

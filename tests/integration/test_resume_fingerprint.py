"""A resume knows its data: other data, another plan or another user set fail before training,
naming what changed, unless the recipe says how to go on (train.on_data_change=new_phase)."""

import json

import pytest
import torch

from flora_train.config import load_recipe
from flora_train.run_dir.checkpoints import CheckpointError
from flora_train.train.run import run_training
from tests.distributed.helpers import saved_state, small_recipe


def test_resume_refuses_changed_data_plan_or_users(tmp_path, tiny_llama_dir):
    base = [*small_recipe(tmp_path, tiny_llama_dir), f"run_dir={tmp_path / 'run'}", "train.max_steps=3",
            "eval.at_end=false"]
    run_training(load_recipe(None, base))
    trained = saved_state(tmp_path / "run")
    longer = [*base, "train.max_steps=6"]

    # A plan change alone: new_phase goes on under the new plan (it said "to train the new and
    # changed users", of whom there are none here, and a user wanting more epochs looked no further).
    with pytest.raises(CheckpointError, match=r"the plan \(train.users_per_step: 5 -> 4\).* set train.on_data_change="
                                              r"new_phase to plan the rest of the run with the new values from here"):
        run_training(load_recipe(None, [*longer, "train.users_per_step=4"]), resume=True)

    train_path = next(a.split("=", 1)[1] for a in base if a.startswith("data.train_path="))
    lines = open(train_path).read().splitlines()
    edited = [json.dumps(dict(json.loads(lines[0]), completion=" changed")), *lines[1:]]
    with open(train_path, "w") as f:
        f.write("\n".join(edited) + "\n")
    with pytest.raises(CheckpointError, match=r"the training data \(examples, tokens or labels\).* set "
                                              r"train.on_data_change=new_phase to train the new and changed users"):
        run_training(load_recipe(None, longer), resume=True)
    assert saved_state(tmp_path / "run").keys() == trained.keys(), "a refused resume writes nothing"

    with open(train_path, "w") as f:  # a user leaves the data: another user set as well
        f.write("\n".join(l for l in lines if '"user-000011"' not in l) + "\n")
    with pytest.raises(CheckpointError, match=r"the user set \(12 -> 11 users\)"):
        run_training(load_recipe(None, longer), resume=True)

    with open(train_path, "w") as f:  # user 0's data changed and user 11 left: a new phase trains user 0 alone
        f.write("\n".join(l for l in edited if '"user-000011"' not in l) + "\n")
    result = run_training(load_recipe(None, [*longer, "train.on_data_change=new_phase"]), resume=True)
    assert result["steps"] > 3, "new_phase goes on from the checkpoint's step with the new data"
    after = saved_state(tmp_path / "run")
    assert after["user-000000"]["optim.step"] > trained["user-000000"]["optim.step"]
    assert all(torch.equal(after[u]["rows"], trained[u]["rows"]) for u in trained if u != "user-000000")


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_a_run_cut_by_max_steps_and_resumed_follows_the_uncut_schedule(tmp_path, tiny_llama_dir, schedule):
    """Raising train.max_steps is a plain resume of the same schedule: each user's decaying learning
    rate spans its steps in the epochs' plan. It spanned only the steps before max_steps, so the cut
    run decayed early and the resumed one started its schedule over (every user's row differed)."""
    recipe = [*small_recipe(tmp_path, tiny_llama_dir), "eval.at_end=false", f"store.optimizer.schedule={schedule}",
              "store.optimizer.warmup_steps=1", "store.optimizer.min_lr_ratio=0.1"]
    run_training(load_recipe(None, [*recipe, f"run_dir={tmp_path / 'whole'}"]))
    cut = [*recipe, f"run_dir={tmp_path / 'cut'}"]
    run_training(load_recipe(None, [*cut, "train.max_steps=3"]))
    run_training(load_recipe(None, cut), resume=True)
    whole, resumed = saved_state(tmp_path / "whole"), saved_state(tmp_path / "cut")
    assert whole.keys() == resumed.keys()
    for user, state in whole.items():
        for key, value in state.items():
            assert torch.equal(resumed[user][key], value), (user, key)

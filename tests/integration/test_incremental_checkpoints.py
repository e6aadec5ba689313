"""Incremental checkpoints: a delta holds exactly the users its steps trained; every checkpoint of
a chain restores bitwise equal to the full checkpoint of the same step; compaction writes a full
one every ``full_checkpoint_every``; pruning keeps what a kept delta builds on."""

import json

import torch

from flora_train.config import load_recipe
from flora_train.data import SyntheticTask
from flora_train.store.saved import read_saved_rows
from flora_train.run_dir.checkpoints import checkpoint_chain, list_checkpoints, load_checkpoint, verify_checkpoint
from flora_train.train.run import run_training
from flora_train.train.session import prepare_session

from tests.distributed.helpers import saved_state


def _overrides(tmp_path, model_dir, run, *extra):
    train, evalp = SyntheticTask(num_users=20, train_examples_per_user=4, eval_examples_per_user=1).write(tmp_path / "data")
    return [f"run_dir={tmp_path / run}", f"base.name_or_path={model_dir}", f"data.train_path={train}",
            f"data.eval_path={evalp}", "adapter.target_modules=[q_proj,v_proj]", "train.users_per_step=3",
            "train.examples_per_user=2", "train.epochs=1", "train.checkpoint_every_steps=1", "train.keep_checkpoints=100",
            "store.optimizer.lr=0.05", "tracking.enabled=false", "train.progress=false", *extra]


def test_deltas_hold_the_steps_users_and_restore_bitwise_like_full_checkpoints(tmp_path, tiny_llama_dir):
    inc = run_training(load_recipe(None, _overrides(tmp_path, tiny_llama_dir, "inc", "train.full_checkpoint_every=3")))
    full = run_training(load_recipe(None, _overrides(tmp_path, tiny_llama_dir, "full", "train.full_checkpoint_every=1")))
    steps = inc["steps"]
    assert steps == full["steps"] >= 6
    inc_ckpts, full_ckpts = list_checkpoints(tmp_path / "inc"), list_checkpoints(tmp_path / "full")
    assert [p.name for p in inc_ckpts] == [p.name for p in full_ckpts]
    session = prepare_session(load_recipe(None, _overrides(tmp_path, tiny_llama_dir, "inc", "train.full_checkpoint_every=3")))
    plans = list(session.planner.steps(1))
    kinds = []
    for k, (a, b) in enumerate(zip(inc_ckpts, full_ckpts), start=1):
        manifest = verify_checkpoint(a)
        kinds.append(manifest.get("kind", "full"))
        assert manifest["users"] == 20 and "chain" not in verify_checkpoint(b)
        got, want = saved_state(tmp_path / "inc", a), saved_state(tmp_path / "full", b)
        assert set(got) == set(want) == set(session.user_tokens)
        for user in want:
            for key in want[user]:
                assert torch.equal(got[user][key], want[user][key]), (a.name, user, key)
        if manifest.get("kind") == "delta":
            # Exactly the users trained since the parent, and bytes in proportion.
            delta_users = json.loads((a / "users-00000-of-00001.json").read_text())["user_ids"]
            assert sorted(delta_users) == sorted(plans[k - 1].user_ids)
            ratio = (a / "store-00000-of-00001.safetensors").stat().st_size / (b / "store-00000-of-00001.safetensors").stat().st_size
            assert ratio < 3 / 20 + 0.05, ratio
            # No user joined since the chain's full checkpoint: the delta names its shard plan
            # instead of writing every user's owner again.
            assert not (a / "shard_plan.json").exists() and manifest["shard_plan_in"] == manifest["chain"][0]
        ids, rows = read_saved_rows(checkpoint_chain(a))
        assert sorted(ids) == sorted(session.user_tokens) and rows.shape[0] == 20
        # A store restored from the chain equals one restored from the full checkpoint.
        load_checkpoint(a, session.store, session.layout, session.user_tokens)
        assert session.store.saved_at == a.name
        assert torch.equal(session.store.read(sorted(session.user_tokens)), torch.stack([want[u]["rows"] for u in sorted(want)]))
    # Chains of at most 3: full, delta, delta, full, delta, ...
    assert kinds[:6] == ["full", "delta", "delta", "full", "delta", "delta"], kinds


def test_pruning_keeps_what_a_kept_delta_builds_on(tmp_path, tiny_llama_dir):
    run_training(load_recipe(None, _overrides(tmp_path, tiny_llama_dir, "run", "train.full_checkpoint_every=4",
                                              "train.keep_checkpoints=1")))
    left = list_checkpoints(tmp_path / "run")
    latest = left[-1]
    chain = verify_checkpoint(latest).get("chain", [latest.name])
    assert [p.name for p in left] == chain, "only the newest checkpoint and the chain it builds on"

"""Adding users to a trained population (train.on_data_change=new_phase): the new users train from
fresh rows exactly as they would alone, a user whose data changed goes on from its row, and every
other user's row and optimizer state stay bit for bit."""

import json
import shutil

import pytest
import torch

from flora_train.config import load_recipe
from flora_train.run_dir.checkpoints import CheckpointError, latest_checkpoint, list_checkpoints
from flora_train.train.run import run_training
from tests.distributed.helpers import ROW_TOL, saved_state, small_recipe

NEW, CHANGED = ("user-000010", "user-000011"), "user-000002"


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")


def test_added_and_changed_users_train_and_the_others_are_untouched(tmp_path, tiny_llama_dir, capsys):
    recipe = small_recipe(tmp_path, tiny_llama_dir)
    train_path = tmp_path / "data" / "train.jsonl"
    lines = train_path.read_text().splitlines()
    first = [l for l in lines if json.loads(l)["user_id"] not in NEW]
    base = [*recipe, "eval.at_end=false", "train.checkpoint_every_steps=2", "train.keep_checkpoints=10"]
    _write(train_path, first)
    run_dir = tmp_path / "run"
    phase0 = run_training(load_recipe(None, [*base, f"run_dir={run_dir}"]))
    before = saved_state(run_dir)
    assert set(before) == {f"user-{i:06d}" for i in range(10)}

    changed = [json.dumps(dict(json.loads(l), completion=" changed")) if json.loads(l)["user_id"] == CHANGED else l
               for l in lines]
    _write(train_path, changed)
    # A checkpoint part-way through phase 0: adding users there would strand the others mid-schedule.
    cut = tmp_path / "cut"
    shutil.copytree(run_dir, cut)
    shutil.rmtree(latest_checkpoint(cut))
    with pytest.raises(CheckpointError, match=r"stopped at step \d+ of phase 0, whose plan runs to step \d+"):
        run_training(load_recipe(None, [*base, f"run_dir={cut}", "train.on_data_change=new_phase"]), resume=True)

    capsys.readouterr()
    grown = run_training(load_recipe(None, [*base, f"run_dir={run_dir}", "train.on_data_change=new_phase"]), resume=True)
    after = saved_state(run_dir)
    assert grown["steps"] > phase0["steps"]
    # The phase's own count (it said "trained 12 users", of whom it trained 3).
    phase_steps, start = grown["steps"] - phase0["steps"], phase0["steps"]
    assert f"\nphase 1 trained 3 user(s) for {phase_steps} step(s) from step {start} in " in capsys.readouterr().out
    assert set(after) == set(before) | set(NEW)
    for user in set(before) - {CHANGED}:
        for key, value in before[user].items():
            assert torch.equal(after[user][key], value), (user, key)
    assert after[CHANGED]["optim.step"] > before[CHANGED]["optim.step"]
    assert not torch.equal(after[CHANGED]["rows"], before[CHANGED]["rows"])

    # The new users alone, from scratch: the same rows (a user's batches and schedule depend only on
    # the seed and its own data, and its row's init only on its id).
    _write(train_path, [l for l in lines if json.loads(l)["user_id"] in NEW])
    alone_dir = tmp_path / "alone"
    run_training(load_recipe(None, [*base, f"run_dir={alone_dir}"]))
    alone = saved_state(alone_dir)
    for user in NEW:
        assert torch.equal(after[user]["optim.step"], alone[user]["optim.step"]), user
        torch.testing.assert_close(after[user]["rows"], alone[user]["rows"], **ROW_TOL)

    # Resumed again on the same data, the phase is over: nothing trains, nothing moves.
    _write(train_path, changed)
    ckpts = len(list_checkpoints(run_dir))
    again = run_training(load_recipe(None, [*base, f"run_dir={run_dir}", "train.on_data_change=new_phase"]), resume=True)
    assert again["steps"] == grown["steps"] and len(list_checkpoints(run_dir)) >= ckpts
    for user, cols in saved_state(run_dir).items():
        for key, value in cols.items():
            assert torch.equal(value, after[user][key]), (user, key)

    # A phase file damaged or lost: the resume that needs it and `forget` name it, and forget
    # rewrites nothing before it finds out.
    from flora_train.lifecycle import forget_users
    from flora_train.train.phases import phase_dir

    phase_file = sorted(phase_dir(run_dir).glob("phase-*.parquet"))[-1]
    # (readers' lock files under checkpoints/.readers hold no bytes of a checkpoint)
    ckpt_bytes = {p: p.read_bytes() for p in (run_dir / "checkpoints").rglob("*")
                  if p.is_file() and ".readers" not in p.parts}
    phase_file.write_bytes(b"not parquet")
    resume = load_recipe(None, [*base, f"run_dir={run_dir}", "train.on_data_change=new_phase"])
    with pytest.raises(CheckpointError, match=f"{phase_file}: not a readable phase file"):
        run_training(resume, resume=True)
    with pytest.raises(CheckpointError, match=f"{phase_file}: not a readable phase file"):
        forget_users(run_dir, [CHANGED])
    assert {p: p.read_bytes() for p in (run_dir / "checkpoints").rglob("*")
            if p.is_file() and ".readers" not in p.parts} == ckpt_bytes
    phase_file.unlink()
    with pytest.raises(CheckpointError, match=f"{phase_file}: missing"):
        run_training(resume, resume=True)


def test_a_new_phase_moves_only_its_own_users_selection_and_trains_a_stopped_user_again(tmp_path, tiny_llama_dir):
    """With train.select: best and train.patience, a later phase's validations counted against the
    users it does not train (their rows never change, so never improve): they were marked stopped,
    and a stopped user whose data then changed was left out of the phase that trains its new data."""
    recipe = small_recipe(tmp_path, tiny_llama_dir)
    train_path = tmp_path / "data" / "train.jsonl"
    lines = train_path.read_text().splitlines()
    select = [*recipe, "eval.at_end=false", f"run_dir={tmp_path / 'run'}", "data.validation_fraction=0.34",
              "train.select=best", "train.patience=1", "train.validate_every_steps=1", "store.optimizer.lr=0.5"]
    _write(train_path, [l for l in lines if json.loads(l)["user_id"] not in NEW])
    run_training(load_recipe(None, select))
    before = saved_state(tmp_path / "run")
    stopped = sorted(u for u, cols in before.items() if int(cols["select.stopped_at"]))
    assert stopped, "patience 1 at lr 0.5 stops someone in phase 0"
    changed = stopped[0]
    _write(train_path, [json.dumps(dict(json.loads(l), completion=" changed")) if json.loads(l)["user_id"] == changed
                        else l for l in lines])
    run_training(load_recipe(None, [*select, "train.on_data_change=new_phase"]), resume=True)
    after = saved_state(tmp_path / "run")
    for user in set(before) - {changed}:  # the phase's validations left the others' choice and stop be
        for key, value in before[user].items():
            assert torch.equal(after[user][key], value), (user, key)
    assert after[changed]["optim.step"] > before[changed]["optim.step"], "the changed user trains on its new data"
    assert int(after[changed]["select.best_step"]) > int(before[changed]["select.stopped_at"])

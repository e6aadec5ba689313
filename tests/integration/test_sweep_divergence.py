"""A sweep's rate too high for its users diverges: those variants stop (each keeps its best
validated row) and the run goes on with the other rates, as a run at each rate alone would."""

import contextlib
import fcntl
import json
import os
import shutil

import torch
from safetensors.torch import load_file

from flora_train.config import load_recipe
from flora_train.lifecycle import forget_users
from flora_train.run_dir.checkpoints import latest_checkpoint, list_checkpoints
from flora_train.train.run import run_training
from flora_train.train.sweep import user_of
from tests.distributed.helpers import saved_state, small_recipe


def test_a_diverging_rate_stops_its_variants_not_the_sweep(tmp_path, tiny_llama_dir, caplog):
    common = [*small_recipe(tmp_path, tiny_llama_dir), "data.validation_fraction=0.34", "train.select=best",
              "train.compare_shared_baseline=true"]
    ref = run_training(load_recipe(None, [*common, f"run_dir={tmp_path / 'alone'}", "store.optimizer.lr=0.02"]))
    # Before: "training stopped: 3 consecutive steps with non-finite loss or gradient (last: users
    # ['user-000003@sweep1', ...])": the whole sweep ended on the rate it was there to rule out.
    sweep = [*common, "train.sweep.lr=[0.02,1e30]", "store.optimizer.lr=0.02",  # (the shared baseline's rate)
             "train.checkpoint_every_steps=1", "train.keep_checkpoints=100", "train.full_checkpoint_every=1"]
    with caplog.at_level("WARNING", logger="flora_train"), _leased(tmp_path / "sweep"):
        result = run_training(load_recipe(None, [*sweep, f"run_dir={tmp_path / 'sweep'}"]))
    assert "variants stopped on non-finite losses or gradients (3 of their own steps in a row): lr 1e+30: " \
        in caplog.text
    assert result["sweep"]["chosen_counts"] == {"0.02": 12, "1e+30": 0}
    # The shared baseline trains as long as the run without the sweep did: before, as long as the
    # sweep (twice: two variants of every user), a stronger baseline than the per-user rows had.
    baselines = [load_file(str(tmp_path / run / "shared_adapter.safetensors"))["row"] for run in ("alone", "sweep")]
    torch.testing.assert_close(baselines[1], baselines[0], rtol=1e-5, atol=1e-7)
    assert result["eval_shared"] == ref["eval_shared"]
    state = json.loads((latest_checkpoint(tmp_path / "sweep") / "trainer_state.json").read_text())
    assert set(state["sweep"]["chosen"].values()) == {0.02} and state["nonfinite_steps"] > 0
    swept, alone = saved_state(tmp_path / "sweep"), saved_state(tmp_path / "alone")
    assert sorted(swept) == sorted(alone)
    for user, cols in alone.items():  # the 0.02 variants trained on as that run did (float32 reduction order)
        for key in ("rows", "select.kept", "optim.exp_avg_sq", "optim.step"):
            torch.testing.assert_close(swept[user][key], cols[key], rtol=1e-3, atol=5e-5,
                                       msg=lambda m, user=user, key=key: f"{user} {key}: {m}")

    # Preempted while variants were on their way to a stop (1 or 2 non-finite steps so far), the run
    # resumes counting where it was: the same variants stop at the same step, and it ends bit for bit.
    mid = next(c for c in list_checkpoints(tmp_path / "sweep")
               if json.loads((c / "trainer_state.json").read_text()).get("nonfinite_streaks"))
    shutil.copytree(tmp_path / "sweep", tmp_path / "cut", ignore=shutil.ignore_patterns(".readers"))
    for later in list_checkpoints(tmp_path / "cut"):
        if later.name > mid.name:
            shutil.rmtree(later)
    with _leased(tmp_path / "cut"):
        run_training(load_recipe(None, [*sweep, f"run_dir={tmp_path / 'cut'}"]), resume=True)
    for ckpt in list_checkpoints(tmp_path / "sweep"):  # every variant's stop step included
        if ckpt.name > mid.name:
            want, got = saved_state(tmp_path / "sweep", ckpt), saved_state(tmp_path / "cut", tmp_path / "cut" /
                                                                           "checkpoints" / ckpt.name)
            assert sorted(got) == sorted(want)
            for name, cols in want.items():
                assert all(torch.equal(got[name][k], v) for k, v in cols.items()), (ckpt.name, name)

    # The streaks name users: `forget` removes them with the users' rows.
    gone = user_of(next(iter(json.loads((mid / "trainer_state.json").read_text())["nonfinite_streaks"])))
    forget_users(tmp_path / "sweep", [gone])
    assert not [c.name for c in list_checkpoints(tmp_path / "sweep") if gone in (c / "trainer_state.json").read_text()]


@contextlib.contextmanager
def _leased(run):
    """Shared locks on the run's checkpoints to come, as readers hold them: the sweep's end leaves
    them (every variant) in place."""
    leases = run / "checkpoints" / ".readers"
    leases.mkdir(parents=True, exist_ok=True)
    held = [os.open(leases / f"step-{k:08d}", os.O_RDWR | os.O_CREAT) for k in range(1, 40)]
    try:
        for fd in held:
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        for fd in held:
            os.close(fd)

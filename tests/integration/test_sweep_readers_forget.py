"""A sweep's variant rows (``user@sweepK``) are their users' rows: the sweep's end removes the
checkpoints holding them only where no reader holds them, readers refuse a checkpoint holding
them, and `forget` removes a user's variants from every checkpoint (a running sweep's too) and its
chosen rate from the trainer state."""

import fcntl
import json
import os
import shutil

import pytest

from flora_train.config import load_recipe
from flora_train.export import export_adapters
from flora_train.inference import load_trained
from flora_train.lifecycle import forget_users, list_users
from flora_train.run_dir.checkpoints import latest_checkpoint, list_checkpoints
from flora_train.train.run import run_training
from flora_train.train.scoring import run_eval
from flora_train.train.sweep import SweepUnchosen, user_of
from tests.distributed.helpers import saved_state, small_recipe


def test_a_sweep_leaves_a_read_checkpoint_and_forget_removes_a_users_variants_everywhere(tmp_path, tiny_llama_dir,
                                                                                        capsys):
    run = tmp_path / "run"
    leases = run / "checkpoints" / ".readers"
    leases.mkdir(parents=True)
    read = "step-00000002"
    fd = os.open(leases / read, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)  # what `serve`/`generate`/`export` hold while they read that checkpoint
    try:
        run_training(load_recipe(None, [*small_recipe(tmp_path, tiny_llama_dir), f"run_dir={run}", "eval.at_end=false",
                                        "data.validation_fraction=0.34", "train.select=best",
                                        "train.sweep.lr=[0.02,0.2]", "train.checkpoint_every_steps=2",
                                        # before: "not users of this run's data or checkpoint: 'user-000001' (did
                                        # you mean 'user-000001'?)": the store's rows were its variants
                                        "export.format=flora", "export.users=[user-000001]"]))
    finally:
        os.close(fd)
    final = latest_checkpoint(run)
    assert list(json.loads((run / "export" / "flora" / "index.json").read_text())) == ["user-000001"]
    # Before, the sweep's end deleted every older checkpoint, this one under its reader.
    assert [c.name for c in list_checkpoints(run)] == [read, final.name]
    assert f"{read} is being read" in capsys.readouterr().err
    old = run / "checkpoints" / read
    variants = set(saved_state(run, old))
    assert all("@sweep" in name for name in variants) and len(variants) == 24

    gone = "user-000004"
    forget_users(run, [gone])
    # Before, the variants in the older checkpoint were kept (only the name `gone` was looked for)...
    assert set(saved_state(run, old)) == {name for name in variants if user_of(name) != gone}
    assert gone not in saved_state(run, final) and len(saved_state(run, final)) == 11
    chosen = json.loads((final / "trainer_state.json").read_text())["sweep"]["chosen"]
    assert gone not in chosen and len(chosen) == 11  # ... and its chosen rate stayed in the trainer state

    shutil.rmtree(final)  # a run preempted in the middle of its sweep: variants only
    # Readers refuse it: before, generate and serve gave every user the base model ("users never
    # trained"), eval said none of the users trained in this run, export wrote user@sweepK folders.
    refused = (rf"{read}: a checkpoint of a learning-rate sweep \(train.sweep.lr: \[0.02, 0.2\]\) from before it "
               r"chose: it holds each user's 2 variants")
    for read_it in (lambda: load_trained(run, device="cpu"),
                    lambda: export_adapters(run, "flora", None, tmp_path / "x"),
                    lambda: run_eval(run, data=tmp_path / "data" / "eval.jsonl")):
        with pytest.raises(SweepUnchosen, match=refused):
            read_it()
    # `users` lists the variants, each with its user's tokens (before: "-", looked up under user@sweepK).
    listed = {r["user_id"]: r["tokens"] for r in list_users(run)}
    assert set(listed) == variants - {f"{gone}@sweep0", f"{gone}@sweep1"}
    assert all(listed[f"user-000001@sweep{k}"] == listed["user-000001@sweep0"] > 0 for k in (0, 1))
    forget_users(run, ["user-000007"])  # before: "no such user(s) in any checkpoint: 'user-000007'"
    left = {f"user-{i:06d}" for i in range(12)} - {gone, "user-000007"}
    assert {user_of(name) for name in saved_state(run, old)} == left

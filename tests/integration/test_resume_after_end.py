"""A resume of a finished run (a requeued job, `--resume` again) trains nothing and writes no
checkpoint: it scores the run again with the baseline the run trained."""

import json

from flora_train.config import load_recipe
from flora_train.run_dir.checkpoints import list_checkpoints, read_manifest
from flora_train.train import shared_baseline
from flora_train.train.run import run_training
from tests.distributed.helpers import small_recipe


def _files(run):
    return {str(p.relative_to(run)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for c in list_checkpoints(run) for p in [c, *c.iterdir()]}


def test_a_finished_run_resumed_trains_and_writes_nothing(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    run = tmp_path / "run"
    recipe = load_recipe(None, [*small_recipe(tmp_path, tiny_llama_dir), f"run_dir={run}",
                                "train.compare_shared_baseline=true", "train.checkpoint_every_steps=3"])
    first = run_training(recipe)
    final = list_checkpoints(run)[-1]
    assert read_manifest(final).get("kind") == "delta"
    before = _files(run)
    capsys.readouterr()

    class NoTraining:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the shared baseline was trained again")

    # Before: the baseline was trained again (as long as the run's own steps: 60 s of the
    # quickstart's 74 s resume), and the final checkpoint written again, full, over the old one.
    monkeypatch.setattr(shared_baseline, "Trainer", NoTraining)
    again = run_training(recipe, resume=True)
    assert "nothing left to train: the run had finished at step" in capsys.readouterr().out
    assert _files(run) == before and read_manifest(final).get("kind") == "delta"
    assert first["eval_shared"]["eval_shared/users"] == 12  # scored with the baseline the run trained
    for scores in ("eval", "eval_base", "eval_shared"):
        assert again[scores] == first[scores], scores
    assert json.loads((run / "result.json").read_text())["eval_shared"] == first["eval_shared"]


def test_a_torn_shared_baseline_or_result_is_made_again_scored_without_and_forgotten(tmp_path, tiny_llama_dir, capsys):
    """``shared_adapter.safetensors`` beside a finished run is torn (a disk fault, a copy cut short).
    It is derived, so nothing stops on it: `eval` scores without it, a resume trains it again, and
    `forget` removes it all the same (it learnt from every user). Before, each ended in
    safetensors' traceback, and a forget stopped halfway with the forgotten users' data in it.
    A torn ``result.json`` is written again by the resume (before: json's traceback)."""
    from flora_train.lifecycle import forget_users
    from flora_train.run_dir import RunDir
    from flora_train.train.scoring import run_eval

    run = tmp_path / "run"
    recipe = load_recipe(None, [*small_recipe(tmp_path, tiny_llama_dir), f"run_dir={run}",
                                "train.compare_shared_baseline=true", "train.max_steps=2"])
    first = run_training(recipe)
    torn = run / "shared_adapter.safetensors"
    torn.write_bytes(b"torn")
    capsys.readouterr()
    scored = run_eval(run)
    assert "eval_shared" not in scored and scored["eval"] == first["eval"]
    assert f"{torn}: not a readable safetensors file" in capsys.readouterr().err
    again = run_training(recipe, resume=True)
    assert f"{torn}: not a readable safetensors file" in capsys.readouterr().err
    assert again["eval_shared"] == first["eval_shared"]  # the same baseline, trained again
    assert RunDir(run).read_shared_adapter() is not None
    (run / "result.json").write_text('{"steps": ')  # the same for the run's report
    assert run_training(recipe, resume=True)["eval"] == first["eval"]
    assert f"{run / 'result.json'}: cannot be read; written again" in capsys.readouterr().err
    assert RunDir(run).read_result()["eval"] == first["eval"]
    torn.write_bytes(b"torn")
    done = forget_users(run, ["user-000001"])
    assert done["removed_shared_adapter"] and done["shared_adapter_steps"] == first["steps"] == 2
    assert not torn.exists() and RunDir(run).removed_shared_steps() == 2
    assert "removed all the same (it was trained on the forgotten users' data too)" in capsys.readouterr().err
    RunDir(run).shared_adapter_removed.write_text('{"st')  # its note torn too: the run's steps, said
    assert RunDir(run).removed_shared_steps() == 2
    assert "shared_adapter.removed.json: cannot be read; the shared adapter a forget removed trains again for the " \
           "run's 2 steps" in capsys.readouterr().err

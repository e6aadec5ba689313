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

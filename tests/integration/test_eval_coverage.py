"""Which trained users a run scores, and why the others are not: with examples held out of the
training data (data.eval_examples_per_user=K), a user with K examples or fewer keeps them all for
training, so it has none to be scored on; the run names them and the rule, not only a count."""

import json
import logging

from flora_train.config import load_recipe
from flora_train.train.run import run_training


def test_users_too_small_to_hold_out_are_named_and_an_empty_hold_out_says_why(tmp_path, tiny_llama_dir, caplog, capsys):
    path = tmp_path / "d.jsonl"
    rows = [{"user_id": f"u{u}", "prompt": f"q{k} :", "completion": f" a{u}"}
            for u in range(8) for k in range(3 if u < 4 else 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = [f"base.name_or_path={tiny_llama_dir}", f"data.train_path={path}", "adapter.target_modules=[q_proj]",
              "train.users_per_step=4", "train.examples_per_user=1", "train.epochs=1", "tracking.enabled=false",
              "train.progress=false", "train.compare_shared_baseline=false", "export.format=none"]
    with caplog.at_level(logging.WARNING):
        result = run_training(load_recipe(None, [*recipe, f"run_dir={tmp_path / 'a'}",
                                                 "data.eval_examples_per_user=1"]))
    # (Before, the run's table said 4 users and nothing else: u4-u7 were trained and silently not scored.)
    assert result["eval"]["eval/users"] == 4 and result["eval"]["eval/trained_users_without_eval_rows"] == 4
    assert ("4 trained user(s) are not scored, data.eval_examples_per_user=1 holds out examples only of users with "
            "more than 1 (each keeps one to train on): 'u4', 'u5', 'u6', 'u7'") in caplog.text, caplog.text
    capsys.readouterr()
    result = run_training(load_recipe(None, [*recipe, f"run_dir={tmp_path / 'b'}", "data.eval_examples_per_user=3"]))
    # (Before: '... holds no held-out examples (set data.eval_path, or data.eval_examples_per_user=N', which was set.)
    assert "eval" not in result
    assert ("nothing evaluated: no user has more than 3 examples, and data.eval_examples_per_user=3 holds out examples "
            "only of users with more (each keeps one to train on). Set data.eval_path") in capsys.readouterr().out

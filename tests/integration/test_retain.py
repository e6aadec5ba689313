"""train.retain and eval.general_path on a tiny base: the retain targets are the base's own greedy
answers, retain examples join every user's chunks and change what users learn, the untrained
adapter agrees with the base on every general prompt, and a resume checks the retain data."""

import json

import pytest
import torch

from flora_train.config import load_recipe
from flora_train.data import IGNORE, SyntheticTask
from flora_train.train.general_eval import base_answers
from flora_train.train.scoring import general_agreement
from flora_train.train.run import run_training
from flora_train.train.session import prepare_session


def _general(path, n=6, seed=1):
    """User-anonymous prompt/completion rows (the task's own format, another seed's users)."""
    rows = [ex for i in range(n) for ex in SyntheticTask(num_users=n, seed=seed).examples(i, "general", 1)]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "user_id"}) + "\n" for r in rows))
    return path


def _overrides(tmp_path, model_dir, *extra):
    train, evalp = SyntheticTask(num_users=6, train_examples_per_user=4, eval_examples_per_user=2).write(tmp_path / "data")
    return [f"run_dir={tmp_path / 'run'}", f"base.name_or_path={model_dir}", f"data.train_path={train}",
            f"data.eval_path={evalp}", "adapter.target_modules=[q_proj,v_proj,down_proj]", "train.users_per_step=3",
            "train.examples_per_user=2", "train.micro_batch_size=8", "train.epochs=2", "store.optimizer.lr=0.05",
            "tracking.enabled=false", "train.progress=false", "eval.max_new_tokens=4", *extra]


def test_retain_targets_are_the_bases_greedy_answers_and_join_every_chunk(tmp_path, tiny_llama_dir):
    retain = _general(tmp_path / "retain.jsonl")
    s = prepare_session(load_recipe(None, _overrides(tmp_path, tiny_llama_dir, f"train.retain.path={retain}",
                                                     "train.retain.examples_per_user_step=2")))
    assert s.retain is not None and len(s.retain) == 6
    for i in range(len(s.retain)):
        ids, labels = s.retain.input_ids(i).tolist(), s.retain.labels(i).tolist()
        first = next(k for k, t in enumerate(labels) if t != IGNORE)
        with torch.no_grad(), s.slot.base_only():
            want = s.model.generate(input_ids=torch.tensor([ids[:first]]), max_new_tokens=4, do_sample=False,
                                    pad_token_id=s.pad_id)[0, first:].tolist()
        eos = s.tokenizer.eos_token_id
        want = want[: want.index(eos) + 1] if eos in want else want
        assert ids[first:] == want and labels[first:] == want, "retain targets are the base's own answer"
    n_train = len(s.train)
    for plan in s.planner.steps(2):
        for user, ex in plan.groups:
            extra = [i for i in ex if i >= n_train]
            assert len(extra) == 2 and all(i < n_train + 6 for i in extra), (user, ex)
    examples = s.step_examples
    assert examples.user(n_train) == "__general__"
    # Untrained rows are the identity: every user agrees with the base on every general prompt.
    answers = base_answers(s, s.retain)
    agreement = general_agreement(s, s.store.row_init, answers)
    assert set(agreement) == set(s.user_tokens) and all(r.accuracy == 1.0 for r in agreement.values())
    s.close()


def test_retain_changes_what_users_learn_and_a_resume_checks_it(tmp_path, tiny_llama_dir):
    retain = _general(tmp_path / "retain.jsonl")
    general = _general(tmp_path / "general.jsonl", seed=2)
    common = _overrides(tmp_path, tiny_llama_dir, f"eval.general_path={general}")
    without = run_training(load_recipe(None, [*common, f"run_dir={tmp_path / 'plain'}"]))
    mixed = run_training(load_recipe(None, [*common, f"run_dir={tmp_path / 'mixed'}", f"train.retain.path={retain}"]))
    assert without["steps"] == mixed["steps"]
    for r in (without, mixed):
        assert r["eval_general"]["eval_general/users"] == 6.0
    # The retain examples are in the users' loss, so the adapters differ.
    assert without["eval"]["eval/loss_mean"] != mixed["eval"]["eval/loss_mean"]
    assert mixed["eval_general"]["eval_general/loss_mean"] != without["eval_general"]["eval_general/loss_mean"]
    # Resuming the retained run onto other retain data is a change of the training data.
    _general(retain, seed=3)
    with pytest.raises(Exception, match="the training data"):
        run_training(load_recipe(None, [*common, f"run_dir={tmp_path / 'mixed'}", f"train.retain.path={retain}",
                                        "train.auto_resume=true", "train.epochs=3"]))

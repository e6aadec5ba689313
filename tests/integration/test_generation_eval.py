"""eval.generate: per-user exact match and ROUGE-L of generated completions, with the adapter and
with the base, the gain per user, the users worse than the base, a per-user JSONL and a histogram
of the gains logged to MLflow; on a task the adapters learn, they beat the base."""

import json
import subprocess
import sys

import pytest

from mlflow.tracking import MlflowClient
from rouge_score import rouge_scorer

from flora_train.config import load_recipe
from flora_train.inference import GenerationSettings, generate_batch, load_trained
from flora_train.train.generation_eval import UserGeneration, summarise_generation, worse_than_base
from flora_train.train.run import run_training
from tests.e2e.helpers import REPO, SMALL


QUICK = [*SMALL, "base.tiny.hidden_size=64", "base.tiny.intermediate_size=128", "train.epochs=80", "data.synthetic.num_users=16", "train.users_per_step=8",
         "train.compare_shared_baseline=false", "export.format=none"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("quick") / "run"
    result = run_training(load_recipe("recipes/quickstart.yaml", [*QUICK, f"run_dir={run_dir}", "eval.generate=true",
                                                                  "eval.max_new_tokens=4"]))
    return run_dir, result


def test_scores_users_against_the_base_and_logs_the_report(quick_run):
    run_dir, result = quick_run
    summary = result["eval_generate"]
    assert summary["eval_gen/users"] == 16
    assert summary["eval_gen/exact_match_mean"] > summary["eval_gen/base_exact_match_mean"] + 0.15, summary
    rows = [json.loads(l) for l in (run_dir / "eval" / f"generate_per_user-step{result['steps']}.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and (run_dir / "eval" / f"generate_gain-step{result['steps']}.png").read_bytes()[:4] == b"\x89PNG"
    # One user's figures, recomputed independently from generate() and rouge-score:
    trained = load_trained(run_dir, device="cpu")
    row = rows[0]
    evals = [json.loads(l) for l in (run_dir / "data" / "eval.jsonl").read_text().splitlines()]
    mine = [e for e in evals if e["user_id"] == row["user_id"]]
    gens, _ = generate_batch(trained, [e["prompt"] for e in mine], [row["user_id"]] * len(mine), GenerationSettings(max_new_tokens=4))
    exact = sum(g.text.strip() == e["completion"].strip() for g, e in zip(gens, mine)) / len(mine)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = sum(scorer.score(e["completion"].strip(), g.text.strip())["rougeL"].fmeasure for g, e in zip(gens, mine)) / len(mine)
    assert row["examples"] == len(mine) and abs(row["exact_match"] - exact) < 1e-9 and abs(row["rouge_l"] - rouge) < 1e-9
    run = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}").get_run(result["mlflow_run_id"])
    assert {"eval_gen/rouge_l_gain_mean", "eval_gen/users_worse_than_base"} <= set(run.data.metrics)
    artifacts = {a.path for a in MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}").list_artifacts(run.info.run_id, "eval")}
    assert any(p.endswith(".png") for p in artifacts) and any(p.endswith(".jsonl") for p in artifacts)


def test_worse_than_base_and_summary():
    per_user = {"a": UserGeneration(2, 2, 2.0, 0, 0.5), "b": UserGeneration(1, 0, 0.1, 1, 0.9), "c": UserGeneration()}
    s = summarise_generation(per_user)
    assert s["eval_gen/users"] == 2 and s["eval_gen/users_worse_than_base"] == 1
    assert abs(s["eval_gen/rouge_l_gain_mean"] - ((1.0 - 0.25) + (0.1 - 0.9)) / 2) < 1e-12
    assert worse_than_base(per_user) == ["b"]


def test_own_adapter_answers_far_more_often_than_another_users_or_a_shared_one(quick_run, tmp_path):
    """The quickstart's task through `flora-train generate`: each user's own adapter completes that
    user's held-out prompts with that user's answer far more often than another user's adapter, or
    one adapter shared by all users trained on the same data."""
    run_dir, _ = quick_run
    evals = [json.loads(l) for l in (run_dir / "data" / "eval.jsonl").read_text().splitlines()]
    users = sorted({e["user_id"] for e in evals})
    other = {u: users[(i + 1) % len(users)] for i, u in enumerate(users)}
    shared_data = tmp_path / "shared.jsonl"
    shared_data.write_text("".join(json.dumps(dict(json.loads(l), user_id="everyone")) + "\n"
                                   for l in (run_dir / "data" / "train.jsonl").read_text().splitlines()))
    shared_run = tmp_path / "shared"
    run_training(load_recipe("recipes/quickstart.yaml", [*QUICK, f"run_dir={shared_run}", "data.synthetic=null",
                                                         f"data.train_path={shared_data}", "data.eval_examples_per_user=0",
                                                         f"base.name_or_path={run_dir / 'base_model'}", "base.tiny=null",
                                                         "train.users_per_step=1", "train.examples_per_user=16",
                                                         "eval.at_end=false"]))

    def hit_rate(source, user_of) -> float:
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"user_id": user_of(e["user_id"]), "prompt": e["prompt"]}) + "\n" for e in evals))
        out = tmp_path / "preds.jsonl"
        proc = subprocess.run([sys.executable, "-m", "flora_train.cli", "generate", str(source), "--prompts", str(prompts),
                               "--out", str(out), "--max-new-tokens", "4", "--device", "cpu"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "tokens/s" in proc.stdout
        assert not list(tmp_path.glob(".preds.jsonl*")), "the file written before the rename is left behind"
        preds = [json.loads(l) for l in out.read_text().splitlines()]
        return sum(p["completion"].strip() == e["completion"].strip() for p, e in zip(preds, evals)) / len(evals)

    own = hit_rate(run_dir, lambda u: u)
    others = hit_rate(run_dir, lambda u: other[u])
    shared = hit_rate(shared_run, lambda u: "everyone")
    print(f"own adapter {own:.3f}, another user's {others:.3f}, shared {shared:.3f}")
    assert own > others + 0.3 and own > shared + 0.3, (own, others, shared)

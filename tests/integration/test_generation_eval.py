"""eval.generate: per-user exact match and ROUGE-L of generated completions, with the adapter and
with the base, the gain per user, the users worse than the base, a per-user JSONL and a histogram
of the gains logged to MLflow; on a task the adapters learn, they beat the base."""

import json

from mlflow.tracking import MlflowClient
from rouge_score import rouge_scorer

from flora_train.config import load_recipe
from flora_train.inference import GenerationSettings, generate_batch, load_trained
from flora_train.train.generation_eval import UserGeneration, summarise_generation, worse_than_base
from flora_train.train.run import run_training
from tests.e2e.helpers import SMALL


def test_scores_users_against_the_base_and_logs_the_report(tmp_path):
    run_dir = tmp_path / "run"
    result = run_training(load_recipe("recipes/quickstart.yaml", [
        *SMALL, f"run_dir={run_dir}", "train.epochs=80", "data.synthetic.num_users=16", "train.users_per_step=8",
        "train.compare_shared_baseline=false", "export.format=none", "eval.generate=true", "eval.max_new_tokens=4"]))
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

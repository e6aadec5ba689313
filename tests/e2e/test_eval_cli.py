"""`flora-train eval`: per-user, base-model and shared-adapter rows (the shared row survives a
re-run), another file with --data, users without training data named, users without eval rows
counted."""

import json

import pytest

from tests.e2e.helpers import SMALL, flora_train

pytestmark = pytest.mark.slow


def test_eval_rows_data_and_coverage(tmp_path):
    run_dir = tmp_path / "run"
    trained = flora_train("run", "recipes/quickstart.yaml", *SMALL, f"run_dir={run_dir}", "export.format=none",
                          "tracking.enabled=false")
    for row in ("per-user adapters", "base model", "one shared adapter"):
        assert row in trained.stdout, trained.stdout
    assert (run_dir / "shared_adapter.safetensors").is_file()

    again = flora_train("eval", str(run_dir))
    assert all(row in again.stdout for row in ("per-user adapters", "base model", "one shared adapter")), again.stdout
    evals = [json.loads(l) for l in (run_dir / "data" / "eval.jsonl").read_text().splitlines()]
    mine = [e for e in evals if e["user_id"] in ("user-000001", "user-000002")]
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(e) + "\n" for e in [*mine, dict(mine[0], user_id="newcomer")]))
    scored = flora_train("eval", str(run_dir), "--data", str(other))
    assert "have no training data and are not scored: 'newcomer'" in scored.stderr
    step = json.loads((run_dir / "result.json").read_text())["steps"]
    own = json.loads((run_dir / "eval" / f"summary-step{step}.json").read_text())
    assert own["eval"]["eval/users"] == 24, "the run's own scores stay (--data's go beside them)"
    summary = json.loads(next((run_dir / "eval").glob(f"data-other-*/summary-step{step}.json")).read_text())
    assert summary["eval"]["eval/users"] == 2
    assert summary["eval"]["eval/users_without_training_data"] == 1
    assert summary["eval"]["eval/trained_users_without_eval_rows"] == 24 - 2
    assert summary["eval_base"]["eval_base/users"] == 2 and "eval_shared" in summary

"""End to end through the CLI: run -> MLflow -> export (PEFT, FLoRA) -> eval, and bad input."""

import json
import shutil

import pytest
import torch

from tests.e2e.helpers import REPO, SMALL, flora_train

pytestmark = pytest.mark.slow

HOSTILE = ["../../etc/passwd", "a/b\\c", "ü ñ 用户", "."]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run on synthetic data whose first user ids are hostile strings, with the examples of
    every user packed into shared rows (per-token adapter routing): what it exports must still
    reproduce each user's own logits in PEFT."""
    from flora_train.data import SyntheticTask

    root = tmp_path_factory.mktemp("lora_run")
    task = SyntheticTask(num_users=24, train_examples_per_user=8, eval_examples_per_user=2)
    paths = task.write(root / "data")
    for path in paths:
        rows = [json.loads(l) for l in path.read_text().splitlines()]
        for r in rows:
            i = int(r["user_id"].split("-")[1])
            if i < len(HOSTILE):
                r["user_id"] = HOSTILE[i]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Trained in its own directory with relative paths, as a user types them; every test below reads
    # the run from the repository instead (eval found no data and serving no base there, both
    # having been recorded relative to where the run was started).
    proc = flora_train(
        "run", str(REPO / "recipes/quickstart.yaml"), *SMALL, "run_dir=run", "data.synthetic=null",
        "data.train_path=data/train.jsonl", "data.eval_path=data/eval.jsonl", "adapter.method=lora", "adapter.rank=4",
        "store.optimizer.lr=0.01", "train.compare_shared_baseline=false", "export.format=peft",
        "train.micro_batch_size=null", "train.micro_batch_tokens=96", "train.packing=true", cwd=root,
    )
    (root / "run.stderr").write_text(proc.stderr)
    return root / "run"


def _trained_logits(run_dir, user, ids):
    from flora_train.adapters import AdapterLayout, AdapterSpec, inject_adapters
    from flora_train.base import load_frozen_model
    from flora_train.store.saved import read_saved_rows
    from flora_train.run_dir.checkpoints import checkpoint_chain, latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    saved = AdapterLayout.from_dict(json.loads((ckpt / "layout.json").read_text()))
    model = load_frozen_model(str(run_dir / "base_model"))
    slot, layout = inject_adapters(model, AdapterSpec(saved.spec.method, saved.spec.rank, saved.spec.alpha), [m for m, _, _ in saved.modules])
    assert layout.to_dict() == saved.to_dict()
    saved_users, rows = read_saved_rows(checkpoint_chain(ckpt))
    row = rows[saved_users.index(user)]
    with torch.no_grad(), slot.activate(row[None], torch.zeros(ids.shape[0], dtype=torch.long)):
        return model(input_ids=ids).logits, row


def test_run_tracks_to_embedded_mlflow(lora_run):
    from mlflow.tracking import MlflowClient

    # A run whose data and settings need nothing from the user prints nothing on stderr: no
    # library's log lines (MLflow's INFO lines when it creates the tracking database) or warnings.
    stderr = (lora_run.parent / "run.stderr").read_text()
    assert stderr == "", stderr
    result = json.loads((lora_run / "result.json").read_text())
    assert result["users"] == 24 and result["eval"]["eval/users"] == 24
    client = MlflowClient(tracking_uri=f"sqlite:///{lora_run / 'mlflow.db'}")
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["adapter.method"] == "lora" and run.data.params["adapter.rank"] == "4"
    assert {"train/loss", "train/tokens_per_s", "train/users_touched", "eval/accuracy_mean", "eval/accuracy_p50"} <= set(run.data.metrics)
    # Packed rows compute no padding, as planned before the first step.
    assert run.data.metrics["plan/real_token_share"] == run.data.metrics["plan/planned_real_token_share"] == 1.0
    assert run.data.metrics["train/padded_tokens"] == 0
    assert not any(HOSTILE[0] in k or "user-0000" in k for k in run.data.metrics), "never a metric key per user"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "recipe.yaml" in artifacts and "export" in artifacts
    assert (lora_run / "mlartifacts").is_dir()


def test_peft_export_reproduces_flora_train_logits(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = lora_run / "export" / "peft"
    index = json.loads((out / "index.json").read_text())
    assert set(HOSTILE) <= set(index) and len(index) == 24
    for user, folder in index.items():
        assert (out / folder).resolve().parent == out.resolve(), user
    ids = torch.randint(3, 200, (2, 9))
    for user in (HOSTILE[0], "user-000010"):
        ours, _ = _trained_logits(lora_run, user, ids)
        base = AutoModelForCausalLM.from_pretrained(str(lora_run / "base_model"))
        peft_model = PeftModel.from_pretrained(base, str(out / index[user])).eval()
        with torch.no_grad():
            theirs = peft_model(input_ids=ids).logits
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        plain = base.get_base_model()(input_ids=ids).logits if hasattr(base, "get_base_model") else None
        assert plain is None or not torch.allclose(plain, ours)


def test_flora_format_export_loads_back(lora_run, tmp_path):
    from flora_train.export.flora import load_flora_adapter

    flora_train("export", str(lora_run), "--format", "flora", "--users", f"{HOSTILE[2]},user-000007", "--out", str(tmp_path / "f"))
    index = json.loads((tmp_path / "f" / "index.json").read_text())
    assert sorted(index) == sorted([HOSTILE[2], "user-000007"])
    layout, row = load_flora_adapter(tmp_path / "f" / index["user-000007"])
    _, trained = _trained_logits(lora_run, "user-000007", torch.ones(1, 2, dtype=torch.long))
    assert torch.equal(row, trained)
    assert json.loads((tmp_path / "f" / "manifest.json").read_text())["base_model"] == str(lora_run / "base_model")
    # A copy of the run exports its own base (the checkpoint records the original's folder).
    shutil.copytree(lora_run, tmp_path / "copy", ignore=shutil.ignore_patterns("data_cache", "export", "mlflow*"))
    flora_train("export", str(tmp_path / "copy"), "--format", "flora", "--users", "user-000007", "--out", str(tmp_path / "g"))
    assert json.loads((tmp_path / "g" / "manifest.json").read_text())["base_model"] == str(tmp_path / "copy" / "base_model")


def test_export_and_eval_errors(lora_run, tmp_path):
    proc = flora_train("export", str(lora_run), "--format", "flora", "--users", "user-00010", "--out", str(tmp_path), check=False)
    assert proc.returncode == 2 and "unknown user(s) not in this run: 'user-00010' (did you mean 'user-000010'?)" in proc.stderr
    proc = flora_train("export", str(tmp_path / "nope"), "--format", "flora", "--out", str(tmp_path), check=False)
    assert proc.returncode == 2 and f"{tmp_path / 'nope'}: no such folder; export reads a run directory" in proc.stderr
    # eval --data: a missing file is named by the flag (it said data.train_path), and a file of no user
    # this run trained is one line (it was a KeyError traceback after printing a table of nan).
    stranger = tmp_path / "stranger.jsonl"
    stranger.write_text(json.dumps({"user_id": "zz", "prompt": "a ?", "completion": " b"}) + "\n")
    for data, message in [(tmp_path / "nope.jsonl", f"--data: data file not found: {tmp_path / 'nope.jsonl'}"),
                          (stranger, f"--data {stranger}: none of its 1 user(s) trained in this run ('zz'); nothing to evaluate")]:
        proc = flora_train("eval", str(lora_run), "--data", str(data), check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"flora-train: error: {message}"


def test_eval_logs_to_a_run_nested_under_the_training_run(lora_run):
    from mlflow.tracking import MlflowClient

    proc = flora_train("eval", str(lora_run))
    assert "per-user adapters" in proc.stdout
    result = json.loads((lora_run / "result.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{lora_run / 'mlflow.db'}")
    trained = client.get_run(result["mlflow_run_id"])
    (history,) = [client.get_metric_history(trained.info.run_id, "eval/accuracy_mean")]
    assert len(history) == 1, "eval adds nothing to the training run"
    (child,) = client.search_runs([trained.info.experiment_id], f"tags.mlflow.parentRunId = '{trained.info.run_id}'")
    assert child.data.metrics["eval/accuracy_mean"] == pytest.approx(history[0].value)
    assert child.data.tags["flora_train.kind"] == "eval" and trained.info.status == "FINISHED"
    # Another file's scores go beside the run's own, which stay as they were (they were overwritten:
    # `users` then showed no held-out loss for every user the file did not hold).
    own = {p: p.read_bytes() for p in (lora_run / "eval").glob("*.jsonl")}
    subset = lora_run.parent / "subset.jsonl"
    rows = [json.loads(line) for line in (lora_run.parent / "data" / "eval.jsonl").read_text().splitlines()]
    subset.write_text("".join(json.dumps(r) + "\n" for r in rows if r["user_id"] in ("user-000005", HOSTILE[2])))
    proc = flora_train("eval", str(lora_run), "--data", str(subset))
    assert own and {p: p.read_bytes() for p in (lora_run / "eval").glob("*.jsonl")} == own
    (scores,) = (lora_run / "eval").glob("data-subset-*/per_user-step*.jsonl")
    assert [json.loads(line)["user_id"] for line in scores.read_text().splitlines()] == sorted(["user-000005", HOSTILE[2]])
    assert f"per-user scores in {scores.parent}" in proc.stdout


def test_recipe_typo_fails_before_any_work(tmp_path):
    proc = flora_train("run", "recipes/quickstart.yaml", f"run_dir={tmp_path / 'r'}", "train.epoch=3", check=False)
    assert proc.returncode == 2
    assert "unknown key 'train.epoch' (did you mean 'train.epochs'?)" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_bad_data_row_names_file_and_line(tmp_path):
    data = tmp_path / "d.jsonl"
    good = [json.dumps({"user_id": f"u{i % 3}", "prompt": "q ?", "completion": " red"}) for i in range(6)]
    bad = ['{"user_id": "u1", "prompt": ', '["a list"]', '{"user_id": "u\\nv", "prompt": "a", "completion": "b"}',
           '{"user_id": "u1", "prompt": "x"}']
    data.write_text("\n".join(good[:4] + bad + good[4:]) + "\n")
    args = ["run", "recipes/quickstart.yaml", *SMALL, f"run_dir={tmp_path / 'r'}", "data.synthetic=null", f"data.train_path={data}", "tracking.enabled=false"]
    proc = flora_train(*args, check=False)
    assert proc.returncode == 2 and f"4 bad rows: {data}:5: malformed JSON" in proc.stderr
    proc = flora_train(*args, "data.on_bad_row=skip", "train.compare_shared_baseline=false")
    # Each skipped row is counted and the ones not shown are counted by reason (it showed three, as if all).
    assert f"skipped 4 bad rows: {data}:5: malformed JSON" in proc.stdout
    assert "; and 1 more (missing completion 1)\n" in proc.stdout, proc.stdout
    assert "nothing evaluated: the data holds no held-out examples (set data.eval_path" in proc.stdout  # (it said nothing)
    # A missing file is one line too (it was SourceError's traceback, a type the CLI did not list).
    proc = flora_train(*(a for a in args if not a.startswith("data.train_path=")), f"data.train_path={tmp_path / 'nope.jsonl'}",
                       f"run_dir={tmp_path / 'r2'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"flora-train: error: data.train_path: data file not found: {tmp_path / 'nope.jsonl'}"


def test_zero3_in_one_process_needs_parameter_offload(tmp_path):
    args = ["run", "recipes/quickstart.yaml", *SMALL, "tracking.enabled=false", "train.compare_shared_baseline=false",
            "export.format=none", "base.zero_stage=3"]
    proc = flora_train(*args, f"run_dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 2 and "base.zero_stage=3 on a world of one process partitions nothing" in proc.stderr
    assert not (tmp_path / "r").exists()
    flora_train(*args, f"run_dir={tmp_path / 'offload'}", "base.offload_params=cpu")
    result = json.loads((tmp_path / "offload" / "result.json").read_text())
    assert result["base"]["zero_stage"] == 3 and result["base"]["world_size"] == 1
    assert result["eval"]["eval/users"] == 24


def test_peft_export_is_what_vllm_and_autopeft_load(lora_run, tmp_path):
    """Keys end in lora_A.weight / lora_B.weight under base_model.model., target modules are name
    suffixes, no modules_to_save, and base_model_name_or_path is loadable by AutoPeftModelForCausalLM
    (or the id the recipe names in export.base_model_id)."""
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    out = lora_run / "export" / "peft"
    folder = out / json.loads((out / "index.json").read_text())["user-000010"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert not config.get("modules_to_save")
    keys = load_file(str(folder / "adapter_model.safetensors")).keys()
    assert keys and all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    ids = torch.randint(3, 200, (2, 9))
    ours, _ = _trained_logits(lora_run, "user-000010", ids)
    with torch.no_grad():
        theirs = AutoPeftModelForCausalLM.from_pretrained(str(folder)).eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    flora_train("export", str(lora_run), "--format", "peft", "--users", "user-000010", "--out", str(tmp_path / "v"),
                "--base-model-id", "org/served-model")
    served = json.loads(next((tmp_path / "v").glob("*/adapter_config.json")).read_text())
    assert served["base_model_name_or_path"] == "org/served-model"

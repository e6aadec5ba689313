"""A machine that cannot reach the Hugging Face hub (a network namespace of its own, loopback only,
as root in CI), with a base named by its hub id: read from the cache when it is there, one error
at once when it is not; no minute of retries either way."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.e2e.helpers import REPO, SMALL

pytestmark = pytest.mark.slow
COMMIT = "0" * 40


def _offline(*args, env):
    return subprocess.run(["unshare", "-n", sys.executable, "-m", "flora_train.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_hub_id_offline_reads_the_cache_or_says_so_at_once(tmp_path, tiny_llama_dir):
    """Before: an id not in the cache failed after huggingface_hub had retried the hub for most of a
    minute, a warning a try; one in the cache loaded it, but transformers' probe for a PEFT adapter
    in the repo still retried the hub for 20 s (it is not given local_files_only)."""
    from flora_train.data import SyntheticTask

    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / COMMIT)
    task = SyntheticTask(num_users=8, train_examples_per_user=4, eval_examples_per_user=1)
    train, held_out = task.write(tmp_path / "data")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env.pop("HF_HUB_OFFLINE", None)
    recipe = ["recipes/quickstart.yaml", *SMALL, "base.tiny=null", "data.synthetic=null", f"data.train_path={train}",
              "tracking.enabled=false", "train.compare_shared_baseline=false", "train.max_steps=2"]
    cached = _offline("run", *recipe, f"run_dir={tmp_path / 'run'}", "base.name_or_path=org/tiny", env=env)
    assert cached.returncode == 0, cached.stderr[-3000:]
    assert "trained 8 users for 2 steps" in cached.stdout and "Retry" not in cached.stderr
    missing = _offline("run", *recipe, f"run_dir={tmp_path / 'other'}", "base.name_or_path=org/absent", env=env)
    assert missing.returncode == 2 and "Retry" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [
        "flora-train: error: cannot load the tokenizer of model 'org/absent': it is not a local folder nor in the "
        "Hugging Face cache, and huggingface.co cannot be reached from this machine; download it where there is "
        "network and name its folder in base.name_or_path (or copy the cache, $HF_HOME)"]
    # Generating from the run where the cache is gone is told of --base (the way on there), not of a
    # recipe key; with --base it generates.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"user_id": "user-000001", "prompt": "favourite colour ?"}\n')
    gen = ["generate", str(tmp_path / "run"), "--prompts", str(prompts), "--out", str(tmp_path / "out.jsonl"),
           "--max-new-tokens", "2"]
    gone = _offline(*gen, env={**env, "HF_HOME": str(tmp_path / "empty")})
    assert gone.returncode == 2 and gone.stderr.strip().splitlines()[-1] == (
        f"flora-train: error: {tmp_path / 'run' / 'checkpoints' / 'step-00000002'}: its base is the hub id 'org/tiny', "
        "which is not in the Hugging Face cache, and huggingface.co cannot be reached from this machine: name the "
        "base's folder with --base PATH")
    # With --base it generates, and eval scores: the run recorded the hub id, not its files, so the
    # folder is taken as that model with a warning (both were refused as "not the base").
    moved = _offline(*gen, "--base", str(tiny_llama_dir), env={**env, "HF_HOME": str(tmp_path / "empty")})
    assert moved.returncode == 0 and "generated" in moved.stdout, moved.stderr[-2000:]
    assert "was trained on the hub id 'org/tiny', whose files were not recorded" in moved.stderr
    scored = _offline("eval", str(tmp_path / "run"), "--base", str(tiny_llama_dir), "--data", str(held_out),
                      env={**env, "HF_HOME": str(tmp_path / "empty")})
    assert scored.returncode == 0 and "per-user adapters" in scored.stdout, scored.stderr[-2000:]

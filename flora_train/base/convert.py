"""`flora-train base convert`: a GGUF base once into a safetensors folder.

transformers loads (and dequantises) a GGUF file whole in every process, outside DeepSpeed's
``zero.Init``: each ZeRO-3 rank would hold the whole base, and each run pays the conversion again
(~25 s for SmolLM2-135M). A plain Hugging Face folder loads in a second and partitions at load.
``save_pretrained`` of the GGUF-loaded model itself fails (it keeps GGUF-specific state), so the
weights are copied into a model built from the same config.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flora_train.base.loading import DTYPES, ModelLoadError, load_frozen_model, load_tokenizer
from flora_train.files import replaced_folder


PROBE = "The capital of France is Paris. 12 + 30 = 42."


def check_same_logits(want: torch.nn.Module, got: torch.nn.Module, input_ids: torch.Tensor, what: str) -> None:
    """``got`` gives ``want``'s logits on ``input_ids``, bit for bit (``ModelLoadError`` if not)."""
    with torch.no_grad():
        a, b = want(input_ids=input_ids).logits, got(input_ids=input_ids).logits
    if a.shape != b.shape or not torch.equal(a, b):
        diff = float((a - b).abs().max()) if a.shape == b.shape else float("nan")
        raise ModelLoadError(f"{what}: its logits differ from the source model's on a probe (max |diff| {diff:.3g}, "
                             f"shapes {tuple(a.shape)} and {tuple(b.shape)})")


def convert_gguf(folder: str, gguf_file: str, out: Path, dtype: str = "float32") -> Path:
    from transformers import AutoModelForCausalLM

    if out.exists() and any(out.iterdir()):
        raise ModelLoadError(f"--out {out} exists and is not empty; choose a new folder")
    model = load_frozen_model(folder, dtype, gguf_file)
    tokenizer = load_tokenizer(folder, gguf_file)
    config = model.config
    # The GGUF loader records a "quantization_config" (quant_method gguf). Left in the folder, it
    # makes transformers load it through its GGUF quantizer, outside zero.Init: every ZeRO-3 rank
    # would hold the whole base again. The weights written here are plain, so it goes.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, torch_dtype=DTYPES[dtype])
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ModelLoadError(f"{folder}/{gguf_file}: the converted model does not take these weights: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    # Written and checked beside --out, then renamed into place: a failure (a full disk, a check
    # that fails) leaves no half-written folder that a run could load or that refuses the next try.
    try:
        with replaced_folder(out, "converting") as staging:
            with torch.no_grad():
                plain.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            # The folder is checked as a run will load it: its logits must be the GGUF model's, bit for bit.
            ids = torch.tensor([tokenizer(PROBE)["input_ids"]])
            check_same_logits(model, load_frozen_model(str(staging), dtype), ids, f"the converted folder {out}")
    except OSError as exc:
        raise ModelLoadError(f"--out {out}: writing the converted model failed ({exc}); nothing was left "
                             "there") from None
    return out

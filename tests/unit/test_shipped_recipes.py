"""Every shipped recipe validates, and the Llama 3.2 recipes' target modules resolve on a model of
the same architecture and sizes built from its published config on the meta device (no weights,
no download): every projection of every layer is adapted, with the row size the method implies."""

from pathlib import Path

import pytest
import torch

from flora_train.adapters import AdapterSpec, inject_adapters
from flora_train.config import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
# meta-llama/Llama-3.2-1B's config.json (the sizes that matter for the adapters' layout).
LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                   max_position_embeddings=131072, rope_theta=500000.0)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(recipe):
    cfg = load_recipe(recipe)
    assert cfg.run_dir and cfg.adapter.target_modules


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.name.startswith("llama-3.2-1b")], ids=lambda p: p.name)
def test_llama_32_targets_resolve(recipe):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = load_recipe(recipe)
    assert cfg.base.name_or_path == "meta-llama/Llama-3.2-1B"
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_32_1B))
    a = cfg.adapter
    _, layout = inject_adapters(model, AdapterSpec(a.method.value, a.rank, a.alpha), list(a.target_modules))
    assert len(layout.modules) == 7 * 16  # q, k, v, o, gate, up, down in each of the 16 layers
    h, kv, ff = 2048, 8 * 64, 8192
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, ff),
              "up_proj": (h, ff), "down_proj": (ff, h)}
    per_layer = sum((a.rank * (i + o)) for i, o in shapes.values())  # FLoRA a [r, out] + b [r, in]; LoRA A [r, in] + B [out, r]
    assert layout.row_size == 16 * per_layer
    assert {m.rsplit(".", 1)[1]: (i, o) for m, i, o in layout.modules} == shapes

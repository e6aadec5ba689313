"""What a user costs the store, printed by `flora-train validate`: the adapter's row and the
optimizer's state for it, per user and for the population, from the recipe alone (the model is
built on the meta device: no weights are read)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from flora_train.adapters import AdapterLayout, AdapterSpec, inject_adapters
from flora_train.base.loading import load_config
from flora_train.store.optimizers import OptimizerHyper


@dataclass(frozen=True)
class Footprint:
    row_size: int
    adapter_bytes: int
    state_bytes: int
    users: int | None  # the recipe's population when it says (synthetic data); else None

    @property
    def per_user(self) -> int:
        return self.adapter_bytes + self.state_bytes


def _meta_model(cfg: DictConfig) -> Any:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    b = cfg.base
    if b.tiny is not None:
        t = b.tiny
        if t.architecture == "gpt2":
            config = GPT2Config(vocab_size=t.vocab_size, n_embd=t.hidden_size, n_inner=t.intermediate_size,
                                n_layer=t.num_layers, n_head=t.num_heads, n_positions=t.max_position_embeddings)
        else:
            config = LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                                 num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                                 num_key_value_heads=t.num_kv_heads, max_position_embeddings=t.max_position_embeddings)
    else:  # what is on this machine only: a hub id is read from the cache, never downloaded
        config = load_config(str(b.name_or_path), b.gguf_file, b.trust_remote_code, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=b.trust_remote_code)


def layout_for(cfg: DictConfig) -> AdapterLayout:
    a = cfg.adapter
    targets = a.target_modules if isinstance(a.target_modules, str) else list(a.target_modules)
    ff = None if a.feedforward_modules is None else tuple(a.feedforward_modules)
    _, layout = inject_adapters(_meta_model(cfg), AdapterSpec(a.method.value, a.rank, a.alpha, feedforward_modules=ff), targets)
    return layout


def footprint(cfg: DictConfig) -> Footprint:
    layout = layout_for(cfg)
    o = cfg.store.optimizer
    hyper = OptimizerHyper(name=o.name.value, state_dtype=o.state_dtype.value, segments=layout.module_starts())
    syn = cfg.data.synthetic
    return Footprint(layout.row_size, 4 * layout.row_size, hyper.state_bytes(layout.row_size),
                     syn.num_users if syn is not None else None)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


def describe(cfg: DictConfig, fp: Footprint) -> str:
    o = cfg.store.optimizer
    opt = OptimizerHyper(name=o.name.value, state_dtype=o.state_dtype.value).label()
    text = (f"# per user: adapter {_size(fp.adapter_bytes)} ({fp.row_size:,} floats) + optimizer state "
            f"{_size(fp.state_bytes)} ({opt}) = {_size(fp.per_user)}")
    counts = [fp.users] if fp.users else []
    for n in counts + [10**6, 10**8]:
        text += f"\n#   {n:>11,} users: {_size(fp.per_user * n)}"
    return text

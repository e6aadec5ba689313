"""Build a small causal LM and its tokenizer locally, saved in the Hugging Face folder format.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on the run's own training text,
the model is initialised from a config with a fixed seed. Both are written with
``save_pretrained`` and then loaded back through the same code path as any real model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from flora_train.errors import warn
from flora_train.files import replaced_folder

SPECIALS = ["<pad>", "<s>", "</s>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _model_config(arch: str, cfg: dict, vocab: int, tokenizer) -> object:
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_layers"],
            num_attention_heads=cfg["num_heads"],
            num_key_value_heads=cfg["num_kv_heads"],
            max_position_embeddings=cfg["max_position_embeddings"],
            tie_word_embeddings=False,
            **ids,
        )
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab,
            n_embd=cfg["hidden_size"],
            n_inner=cfg["intermediate_size"],
            n_layer=cfg["num_layers"],
            n_head=cfg["num_heads"],
            n_positions=cfg["max_position_embeddings"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    raise ValueError(f"base.tiny.architecture must be llama or gpt2, got {arch!r}")


def pretrain(model, tokenizer, texts: list[str], steps: int, seed: int, lr: float = 3e-3, batch_size: int = 64) -> None:
    """Trains the whole tiny model as a causal LM on the corpus, users mixed and unnamed.

    This stands in for pretraining: the base learns the shared format of the data (what kind
    of answer follows a question, where text ends) but cannot learn any user's rule, because
    nothing in the text says which user wrote it.
    """
    from flora_train.data.tokenize import IGNORE, collate

    eos = tokenizer.eos_token_id
    room = model.config.max_position_embeddings - 1  # a text past the positions is cut (GPT-2's table has no row there)
    encoded = [{"input_ids": ids[:room] + [eos], "labels": ids[:room] + [eos]} for ids in tokenizer(list(texts))["input_ids"]]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        pick = torch.randint(len(encoded), (batch_size,), generator=g).tolist()
        batch = collate([encoded[i] for i in pick], tokenizer.pad_token_id)
        batch["labels"][batch["attention_mask"] == 0] = IGNORE
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def _save(model: torch.nn.Module, directory: Path) -> None:
    """The folder ``save_pretrained`` writes (config, generation config, ``model.safetensors``
    with tied weights once), without its first call's import of DeepSpeed (1 s in every process
    that builds a tiny model: most of the test suite's runs)."""
    from flora_train.files import save_model_weights

    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)
    save_model_weights(model, directory / "model.safetensors", metadata={"format": "pt"})


STAMP = "flora_tiny.json"


def tiny_fingerprint(cfg: dict, texts: list[str]) -> str:
    """What a tiny model is made from: its config and the corpus its tokenizer and pretraining read."""
    fingerprint = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for t in texts:
        fingerprint.update(t.encode())
        fingerprint.update(b"\x00")
    return fingerprint.hexdigest()


def built_from(directory: Path) -> dict | None:
    """The stamp of the tiny model built in ``directory`` (``fingerprint``, ``config``), or None."""
    stamp = directory / STAMP
    try:
        return json.loads(stamp.read_text()) if stamp.is_file() else None
    except (OSError, ValueError):
        return None


def _file_digests(directory: Path) -> dict[str, str]:
    """Each file of a built tiny model (small: read whole) and its content's digest."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file() and p.name != STAMP}


def build_tiny_model(directory: Path, cfg: dict, texts: list[str]) -> Path:
    """Writes (or reuses, when config and corpus match) a tiny model folder; returns its path."""
    from transformers import AutoModelForCausalLM

    fingerprint = tiny_fingerprint(cfg, texts)
    stamp = built_from(directory) or {}
    if stamp.get("fingerprint") == fingerprint:
        built, now = stamp.get("files", {}), _file_digests(directory)  # (a stamp from before digests: none)
        damaged = sorted(name for name, digest in built.items() if now.get(name) != digest)
        if not damaged:
            return directory
        # Derived from the recipe and the data: built again, the same (seeded), so checkpoints still fit it.
        warn(f"{directory}: the tiny base built here is damaged ({', '.join(damaged)} changed or gone since it "
             "was built); building it again")
    tokenizer = train_tokenizer(texts, cfg["vocab_size"])
    config = _model_config(cfg["architecture"], cfg, len(tokenizer), tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        model = AutoModelForCausalLM.from_config(config)
        if cfg.get("pretrain_steps", 0):
            pretrain(model, tokenizer, texts, cfg["pretrain_steps"], seed=cfg["seed"])
    # Built beside and renamed into place: a reader (serve, generate) never loads half a model, and
    # a full disk leaves no partial folder.
    with replaced_folder(directory, "building") as staging:
        _save(model, staging)
        tokenizer.save_pretrained(staging)
        files = _file_digests(staging)
        (staging / STAMP).write_text(json.dumps({"fingerprint": fingerprint, "config": cfg, "files": files}))
    return directory

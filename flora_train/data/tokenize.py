"""Tokenise examples with the base model's tokenizer; loss on completion tokens only.

Prompt and completion are tokenised separately (the prompt with the tokenizer's special tokens,
the completion without, then EOS), so the label mask falls exactly on the completion.
Sequences longer than ``max_length`` are bad rows, never silently truncated: truncating would
cut off the very tokens the loss is on.
"""

from __future__ import annotations

from typing import Any

import datasets
import torch

from flora_train.data.loading import BadRows

IGNORE = -100


def tokenize_examples(ds: datasets.Dataset, tokenizer: Any, max_length: int, add_eos: bool, bad: BadRows) -> datasets.Dataset:
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    has_text = "text" in ds.column_names

    def encode(batch: dict[str, list]) -> dict[str, list]:
        ids, labels = [], []
        if has_text:
            # Labels are the inputs: position t is predicted from positions < t (shifted in the loss).
            for enc in tokenizer(batch["text"])["input_ids"]:
                ids.append(enc + eos)
                labels.append(enc + eos)
        else:
            prompts = tokenizer(batch["prompt"])["input_ids"]
            completions = tokenizer(batch["completion"], add_special_tokens=False)["input_ids"]
            for p, c in zip(prompts, completions):
                ids.append(p + c + eos)
                labels.append([IGNORE] * len(p) + c + eos)
        return {"input_ids": ids, "labels": labels}

    out = ds.map(encode, batched=True, remove_columns=[c for c in ("text", "prompt", "completion") if c in ds.column_names])
    keep = []
    for i, (ids, labels, source, user) in enumerate(zip(out["input_ids"], out["labels"], out["source"], out["user_id"])):
        if len(ids) > max_length:
            bad.report(source, "too_long", f"user {user!r}: {len(ids)} tokens > data.max_length={max_length}")
        elif not any(t != IGNORE for t in labels[1:]):
            bad.report(source, "no_target", f"user {user!r}: no tokens to learn from after tokenisation")
        else:
            keep.append(i)
    return out if len(keep) == len(out) else out.select(keep)


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads a list of tokenised examples into ``input_ids``, ``attention_mask``, ``labels``."""
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

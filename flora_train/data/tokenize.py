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


def _chat_ids(messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[int]] | None:
    """A conversation's tokens through the chat template, and labels that are the tokens of each
    assistant turn (what the template adds for it after the generation prompt) and IGNORE elsewhere.
    None when the template does not render the conversation turn by turn as a prefix of the whole."""
    def render(turns: list[dict[str, str]], prompt: bool) -> list[int]:
        out = tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=prompt)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    ids = render(messages, False)
    labels = [IGNORE] * len(ids)
    for k, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start, end = len(render(messages[:k], True)), len(render(messages[: k + 1], False))
        if ids[:end] != render(messages[: k + 1], False) or start > end:
            return None
        labels[start:end] = ids[start:end]
    return ids, labels


def tokenize_examples(ds: datasets.Dataset, tokenizer: Any, max_length: int, add_eos: bool, bad: BadRows) -> datasets.Dataset:
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    has_text = "text" in ds.column_names
    if "messages" in ds.column_names:
        return _tokenize_chat(ds, tokenizer, max_length, bad)

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


def _tokenize_chat(ds: datasets.Dataset, tokenizer: Any, max_length: int, bad: BadRows) -> datasets.Dataset:
    import json

    from flora_train.data.loading import DataError

    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.messages_column: chat rows need the tokenizer's chat template, and this base's tokenizer "
                        "has none; use prompt/completion rows, or a base with a chat template")
    ids, labels, keep = [], [], []
    for i, (raw, source, user) in enumerate(zip(ds["messages"], ds["source"], ds["user_id"])):
        rendered = _chat_ids(json.loads(raw), tokenizer)
        if rendered is None:
            bad.report(source, "template_not_prefix", f"user {user!r}: the chat template does not render this "
                       "conversation turn by turn (its assistant turns cannot be located)")
        elif len(rendered[0]) > max_length:
            bad.report(source, "too_long", f"user {user!r}: {len(rendered[0])} tokens > data.max_length={max_length}")
        else:
            ids.append(rendered[0])
            labels.append(rendered[1])
            keep.append(i)
    out = ds.select(keep).remove_columns(["messages"])
    return out.add_column("input_ids", ids).add_column("labels", labels)


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

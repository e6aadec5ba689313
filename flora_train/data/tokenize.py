"""Tokenise examples with the base model's tokenizer; loss on completion tokens only.

Prompt and completion are tokenised separately (the prompt with the tokenizer's special tokens,
the completion without, then EOS), so the label mask falls exactly on the completion.
Sequences longer than ``max_length`` are bad rows, never silently truncated: truncating would
cut off the very tokens the loss is on.
"""

from __future__ import annotations

import json
from typing import Any

import datasets
import torch

from flora_train.chat_template import ChatTemplateRefused, apply_chat_template
from flora_train.data.bad_rows import BadRows

IGNORE = -100


def _chat_ids(messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[int]] | None:
    """A conversation's tokens through the chat template, and labels that are the tokens of each
    assistant turn (what the template adds for it after the generation prompt) and IGNORE elsewhere.
    None when the template does not render the conversation turn by turn as a prefix of the whole."""
    def render(turns: list[dict[str, str]], prompt: bool) -> list[int]:
        out = apply_chat_template(tokenizer, turns, tokenize=True, add_generation_prompt=prompt)
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


TOKENIZED = datasets.Features({
    "user_id": datasets.Value("string"),
    "source": datasets.Value("string"),
    "input_ids": datasets.Sequence(datasets.Value("int32")),
    "labels": datasets.Sequence(datasets.Value("int32")),
})


def tokenize_examples(ds: datasets.Dataset, tokenizer: Any, max_length: int, add_eos: bool, bad: BadRows,
                      context: int | None = None) -> datasets.Dataset:
    """Columns ``user_id``, ``source``, ``input_ids`` and ``labels`` (int32); rows too long or with
    nothing to learn from are bad rows. ``context``: the base's positions (max_position_embeddings);
    a row past them is too long whatever ``max_length`` says (a learned position table has no row
    there, and rotary positions there were never trained). One batched ``datasets.map`` pass writes
    Arrow directly, so no column of the result is ever a Python list of every example."""
    limit = max_length if context is None else min(max_length, context)
    too_long = (f"data.max_length={max_length}" if limit == max_length else
                f"the base's context of {context} tokens (max_position_embeddings; data.max_length={max_length})")
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    kind = "messages" if "messages" in ds.column_names else "text" if "text" in ds.column_names else "prompt"
    if kind == "messages" and not getattr(tokenizer, "chat_template", None):
        from flora_train.data.bad_rows import DataError

        raise DataError("data.messages_column: chat rows need the tokenizer's chat template, and this base's tokenizer "
                        "has none; use prompt/completion rows, or a base with a chat template")

    def chat(raw: str) -> tuple[list[int], list[int]] | None | ChatTemplateRefused:
        try:
            return _chat_ids(json.loads(raw), tokenizer)
        except ChatTemplateRefused as exc:
            return exc

    def encoded(batch: dict[str, list]) -> list[tuple[list[int], list[int]] | None | ChatTemplateRefused]:
        if kind == "messages":
            return [chat(raw) for raw in batch["messages"]]
        if kind == "text":
            # Labels are the inputs: position t is predicted from positions < t (shifted in the loss).
            return [(enc + eos, enc + eos) for enc in tokenizer(batch["text"])["input_ids"]]
        prompts = tokenizer(batch["prompt"])["input_ids"]
        completions = tokenizer(batch["completion"], add_special_tokens=False)["input_ids"]
        return [(p + c + eos, [IGNORE] * len(p) + c + eos) for p, c in zip(prompts, completions)]

    # With on_bad_row: error, rows too long are gathered and refused once after the pass: the first
    # alone would be fixed by a max_length that the next longer row refuses again.
    long_rows: list[tuple[int, str, str]] = []

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"user_id": [], "source": [], "input_ids": [], "labels": []}
        for pair, source, user in zip(encoded(batch), batch["source"], batch["user_id"]):
            if isinstance(pair, ChatTemplateRefused):
                bad.report(source, "template_refused", f"user {user!r}: {pair}")
            elif pair is None:
                bad.report(source, "template_not_prefix", f"user {user!r}: the chat template does not render this "
                           "conversation turn by turn (its assistant turns cannot be located)")
            elif len(pair[0]) > limit:
                if bad.policy == "error":
                    long_rows.append((len(pair[0]), source, user))
                else:
                    bad.report(source, "too_long", f"user {user!r}: {len(pair[0])} tokens > {too_long}")
            elif not any(t != IGNORE for t in pair[1][1:]):
                bad.report(source, "no_target", f"user {user!r}: no tokens to learn from after tokenisation")
            else:
                for name, value in zip(("user_id", "source", "input_ids", "labels"), (user, source, *pair)):
                    out[name].append(value)
        return out

    # In memory and uncached: the function reports bad rows as it goes, so it must really run.
    out = ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names, features=TOKENIZED,
                 load_from_cache_file=False, keep_in_memory=True)
    bad.refuse()
    if long_rows:
        _refuse_long_rows(long_rows, too_long, max_length, context)
    return out


def _refuse_long_rows(rows: list[tuple[int, str, str]], too_long: str, max_length: int, context: int | None) -> None:
    """One error for every row too long: the first, how many more, the longest, and what keeps them."""
    from flora_train.data.bad_rows import DataError

    tokens, source, user = rows[0]
    message = f"{source}: user {user!r}: {tokens} tokens > {too_long}"
    longest = max(rows, key=lambda row: row[0])
    if len(rows) > 1:
        more = f"{len(rows) - 1} more row{'s' if len(rows) > 2 else ''} too long"
        at = f", the longest {longest[0]} tokens at {longest[1]}" if longest is not rows[0] else ""
        message += f", and {more}{at}"
    them = "them" if len(rows) > 1 else "it"
    if context is None or longest[0] <= context:
        fix = f"set data.max_length={longest[0]} to keep {them}, or data.on_bad_row=skip to skip {them}"
    elif max_length < context:
        fix = (f"set data.max_length={context}, the base's context, to keep those that fit it, and "
               "data.on_bad_row=skip to skip the rest")
    else:
        fix = f"set data.on_bad_row=skip to skip {them}"
    raise DataError(f"{message} ({fix})")


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads a list of tokenised examples into ``input_ids``, ``attention_mask``, ``labels``
    (``batching.pad`` as a dict, for callers that hand the tensors to a model themselves)."""
    from flora_train.data.batching import pad

    batch = pad([(e["input_ids"], e["labels"]) for e in examples], pad_id)
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}

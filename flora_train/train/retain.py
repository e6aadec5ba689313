"""``train.retain`` with ``targets: base``: the retain examples' targets become the frozen base's own
greedy answers, generated once at start, so that what a user's adapter is asked to keep is the
base's behaviour itself (not another style of answer from the file)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from flora_train.data.examples import IGNORE, TokenizedExamples
from flora_train.train.general_eval import greedy_answers, prompts_of


def base_targets(model: torch.nn.Module, slot: Any, row_init: Callable[[list[str]], torch.Tensor], tokenizer: Any,
                 retain: TokenizedExamples, batch_size: int, max_new_tokens: int, device: torch.device,
                 synced: bool = False) -> TokenizedExamples:
    """The retain prompts with the base's answers as targets (prompts the base answers with
    nothing are dropped). Deterministic: greedy decoding of a frozen base."""
    prompts = prompts_of(retain)
    answers = greedy_answers(model, slot, row_init, tokenizer, prompts, batch_size, max_new_tokens, device, synced)
    return TokenizedExamples.from_rows(
        {"user_id": retain.user(i), "input_ids": p + a, "labels": [IGNORE] * len(p) + a, "source": retain.source(i)}
        for i, (p, a) in enumerate(zip(prompts, answers)) if a)

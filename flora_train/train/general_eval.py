"""Does a user's adapter still answer general questions as the base does? (``eval.general_path``)

The base answers each general prompt once, greedily (up to ``eval.max_new_tokens``, its EOS
included). Each user's adapter is then scored, teacher-forced, on the base's answer: an example
counts as agreeing when the adapter's argmax is the base's token at every position, which is
exactly "greedy decoding with the adapter writes the base's answer". The loss is the adapter's
negative log-likelihood of the base's answer (0 would be a perfect copy). One batched forward
per user and prompt, no generation per user.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from flora_train import dist as fdist
from flora_train.data.examples import IGNORE, TokenizedExamples
from flora_train.inference.generate import GenerationSettings, generate_tokens

if TYPE_CHECKING:
    from flora_train.train.session import Session


def prompts_of(examples: TokenizedExamples) -> list[list[int]]:
    """Each example's prompt: its tokens before the first target."""
    out = []
    for i in range(len(examples)):
        labels = examples.labels(i)
        first = int((labels != IGNORE).argmax())
        out.append(examples.input_ids(i)[:first].tolist())
    return out


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, slot: Any, row_init: Callable[[list[str]], torch.Tensor], tokenizer: Any,
                   prompts: list[list[int]], batch_size: int, max_new_tokens: int, device: torch.device,
                   synced: bool = False) -> list[list[int]]:
    """The frozen base's greedy answer to each prompt, up to and with its EOS. Every rank generates
    all of them (a few dozen prompts), together, so ZeRO-3's per-layer gathers stay in step."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    rows = row_init(["__base__"]).to(device)  # every user's untrained row is the identity
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        new, _ = generate_tokens(model, slot, rows, torch.zeros(len(batch), dtype=torch.long, device=device), batch, pad,
                                 settings, synced_gpus=synced)
        for tokens in new:
            answer = []
            for t in tokens:
                answer.append(t)
                if t == eos:
                    break
            out.append(answer)
    return out


def base_answers(session: Session, general: TokenizedExamples) -> list[tuple[list[int], list[int]]]:
    """(prompt, the base's greedy answer) per general example."""
    prompts = prompts_of(general)
    answers = greedy_answers(session.model, session.slot, session.store.row_init, session.tokenizer, prompts,
                             session.cfg.eval.batch_size, session.cfg.eval.max_new_tokens, session.device,
                             fdist.is_distributed() and session.zero is not None)
    return list(zip(prompts, answers))


def general_examples(users: list[str], answers: list[tuple[list[int], list[int]]]) -> TokenizedExamples:
    """Every (user, general prompt) pair, with the base's answer as the target."""
    return TokenizedExamples.from_rows(
        {"user_id": u, "input_ids": p + a, "labels": [IGNORE] * len(p) + a, "source": f"general prompt {k}"}
        for u in users for k, (p, a) in enumerate(answers) if a)

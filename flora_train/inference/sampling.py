"""Per-request token choice and log-probabilities, for a batch whose requests each have their own
settings: greedy or sampled, temperature, top-k, top-p, presence and frequency penalties, and a
seeded generator of their own, so the same seed gives the same tokens whatever else is batched.

Log-probabilities are the model's own (``log_softmax`` of the raw logits, before temperature,
penalties or truncation), as OpenAI and vLLM report them: a score of the text, not of the sampler.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class TokenLogprob:
    token: int
    logprob: float | None  # None: the prompt's first token, which nothing predicts
    top: list[tuple[int, float]]  # the most likely tokens at this position, best first


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return g


def penalised(logits: torch.Tensor, generated: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties: ``logit - presence * [seen] - frequency * count`` over generated tokens."""
    if not generated or (presence == 0 and frequency == 0):
        return logits
    ids, counts = torch.tensor(generated, device=logits.device).unique(return_counts=True)
    out = logits.clone()
    out[ids] -= presence + frequency * counts.to(logits.dtype)
    return out


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> int:
    """One token from ``logits [vocab]``; ``temperature == 0`` is greedy."""
    if temperature == 0:
        return int(logits.argmax())
    scores = logits.float() / temperature
    if 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1:
        ordered, order = scores.sort(descending=True)
        probs = ordered.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop = probs.cumsum(-1) - probs >= top_p
        scores = scores.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Each position's log-probability of ``tokens [n]`` under ``logits [n, vocab]``, and its
    ``top`` most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens.view(-1, 1)).squeeze(1).tolist()
    if top:
        values, ids = logp.topk(top, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(int(t), lp, tp) for t, lp, tp in zip(tokens.tolist(), chosen, tops)]


__all__ = ["TokenLogprob", "logprobs_of", "new_generator", "penalised", "sample"]

"""Per-request token choice and log-probabilities, for a batch whose requests each have their own
settings: greedy or sampled, temperature, top-k, top-p, presence and frequency penalties, logit
bias, and a seeded generator of their own, so the same seed gives the same tokens whatever else is
batched.

Log-probabilities are the model's own (``log_softmax`` of the raw logits, before temperature,
penalties, bias or truncation), as OpenAI and vLLM report them: a score of the text, not of the sampler.
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


def penalised(logits: torch.Tensor, generated: list[int], presence: float, frequency: float,
              bias: tuple[tuple[int, float], ...] = ()) -> torch.Tensor:
    """OpenAI's penalties and ``logit_bias``: ``logit - presence * [seen] - frequency * count + bias``,
    the penalties over the tokens generated so far."""
    penalties = generated and (presence != 0 or frequency != 0)
    if not penalties and not bias:
        return logits
    out = logits.clone()
    if penalties:
        ids, counts = torch.tensor(generated, device=logits.device).unique(return_counts=True)
        out[ids] -= presence + frequency * counts.to(logits.dtype)
    if bias:
        ids = torch.tensor([t for t, _ in bias], device=logits.device)
        out[ids] += torch.tensor([b for _, b in bias], device=logits.device, dtype=logits.dtype)
    return out


def sample_rows(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
                generators: list[torch.Generator]) -> list[int]:
    """One token per row of ``logits [rows, vocab]``, each row with its own settings and generator
    (``temperature == 0``: greedy). Truncation is one batched pass over the rows sorted once: top-k
    keeps the ``k`` best, top-p the smallest prefix whose mass reaches ``p`` (the token crossing it
    included); then each row draws from its own generator, so a row's token never depends on the
    other rows."""
    rows, vocab = logits.shape
    device = logits.device
    scale = torch.tensor([t if t > 0 else 1.0 for t in temperature], device=device).unsqueeze(1)
    ordered, order = (logits.float() / scale).sort(dim=-1, descending=True)
    keep = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=device).unsqueeze(1)
    ordered = ordered.masked_fill(torch.arange(vocab, device=device).unsqueeze(0) >= keep, float("-inf"))
    probs = ordered.softmax(-1)
    mass = torch.tensor(top_p, device=device).unsqueeze(1)
    probs = ordered.masked_fill(probs.cumsum(-1) - probs >= mass, float("-inf")).softmax(-1)
    out = []
    for i in range(rows):
        if temperature[i] <= 0:
            out.append(int(order[i, 0]))
        else:
            out.append(int(order[i, torch.multinomial(probs[i], 1, generator=generators[i])]))
    return out


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


__all__ = ["TokenLogprob", "logprobs_of", "new_generator", "penalised", "sample_rows"]

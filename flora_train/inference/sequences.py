"""The serving engine's state, apart from its scheduling: a running sequence (its request, adapter
row, generator, text so far), a group of newcomers being prefilled together (their padded prompts,
KV cache and echoed prompt log-probabilities), the engine's counters, and the adapter rows of a
forward's sequences."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flora_train.inference.kv_cache import SlotKV
from flora_train.inference.request import Request
from flora_train.inference.adapter_cache import AdapterCache
from flora_train.inference.sampling import TokenLogprob, logprobs_of
from flora_train.inference.text_stream import TextStream


@dataclass(eq=False)
class Sequence:
    req: Request
    adapters: AdapterCache
    slot: int
    generator: torch.Generator
    text: TextStream
    generated: list[int] = field(default_factory=list)
    last_token_at: float = 0.0
    ended: bool = False  # its Done or Failed was sent
    released: bool = False  # its adapter pin was given back

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.adapters.release(self.slot)


@dataclass
class PrefillGroup:
    seqs: list[Sequence]
    ids: torch.Tensor  # [rows, width] left-padded prompts
    mask: torch.Tensor
    kv: SlotKV
    offset: int = 0
    echo: dict[int, list[TokenLogprob]] = field(default_factory=dict)  # row -> its prompt's logprobs
    carry: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> the last chunk's last logits

    def collect_echo(self, logits: torch.Tensor, a: int, b: int) -> None:
        """Each echoed prompt token's log-probability given the tokens before it (the first one's is
        None), from this chunk's logits and the previous chunk's last column."""
        width = self.ids.shape[1]
        for i, s in enumerate(self.seqs):
            if not s.req.echo:
                continue
            start = width - len(s.req.prompt_ids)
            out = self.echo.setdefault(i, [])
            for col in range(max(a, start), b):
                if col == start:
                    out.append(TokenLogprob(int(self.ids[i, col]), None, []))
                    continue
                scores = logits[i, col - 1 - a] if col > a else self.carry[i]
                out.extend(logprobs_of(scores.view(1, -1), self.ids[i, col].view(1), s.req.logprobs or 0))
            self.carry[i] = logits[i, -1]


@dataclass
class EngineStats:
    steps: int = 0  # decode steps
    prefill_chunks: int = 0
    requests: int = 0  # finished (any reason)
    new_tokens: int = 0
    largest_batch: int = 0  # sequences in one decode step
    most_users: int = 0  # distinct adapters in one decode step
    joined_running: int = 0  # requests that joined a batch already decoding
    dropped: int = 0  # cancelled or disconnected before finishing
    failed: int = 0
    busy_s: float = 0.0


def step_rows(seqs: list[Sequence], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [distinct adapters, row_size], index [len(seqs)])`` for ``slot.activate``: each
    distinct (cache version, slot) once, so sequences on an older version keep its rows."""
    keys = list(dict.fromkeys((id(s.adapters), s.slot) for s in seqs))
    where = {k: i for i, k in enumerate(keys)}
    tables = {id(s.adapters): s.adapters.table for s in seqs}
    rows = torch.stack([tables[a][slot] for a, slot in keys])
    index = torch.tensor([where[(id(s.adapters), s.slot)] for s in seqs], device=device)
    return rows, index


__all__ = ["EngineStats", "PrefillGroup", "Sequence", "step_rows"]

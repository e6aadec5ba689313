"""How a step's examples become micro-batches, and how a micro-batch becomes tensors.

Three policies, one per recipe setting:

- by count (``train.micro_batch_size``): examples in plan order, every rank's share cut into the
  same number of micro-batches; each is padded to its longest member.
- by tokens (``train.micro_batch_tokens``): examples grouped by length, longest first, so a
  micro-batch holds examples of similar length and at most ``tokens`` computed tokens (rows x
  padded width). Padding shrinks, and memory is bounded by the budget, not by the longest
  example of the step.
- packed (``train.packing``): examples of any users concatenated into one row of at most
  ``tokens`` tokens (first fit in plan order), positions restarting at each example and
  attention kept inside it (``base/packed_attention.py``). No padding at all; each token carries
  its example, and through it its user (the adapter slot's per-token index).

A step's gradient is the sum over its micro-batches and every example's loss is normalised by its
own user's target tokens in the whole step, so how examples are grouped changes nothing a user
gets beyond float rounding. Every rank computes every rank's grouping from the same plan and the
examples' lengths (read from the Arrow offsets, no tokens), so all ranks run the same number of
micro-batches (ZeRO-3 gathers parameters collectively): a rank with less work gets empty ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from flora_train.data.tokenize import IGNORE

Pair = tuple[str, int]  # (user, example index)
# What a micro-batch costs beyond its tokens, in tokens: a forward and backward's fixed work (module
# calls, kernel launches, the head's gather). Measured on the CPU bench (tiny Llama 256x4): a few ms,
# about 128 tokens' worth; length grouping trades padding against this.
MICRO_BATCH_COST = 128


def split_even(items: list, parts: int) -> list[tuple]:
    """``items`` cut into ``parts`` contiguous runs whose lengths differ by at most one."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + q + (1 if k < r else 0)
        out.append(tuple(items[start:end]))
        start = end
    return out


@dataclass(frozen=True)
class MicroBatching:
    """``examples``: at most this many examples a micro-batch (None: no count limit; needs
    ``tokens``); ``tokens``: at most this many computed tokens a micro-batch; ``packing``: examples
    share rows (needs ``tokens``, the row's length)."""

    examples: int | None = 64
    tokens: int | None = None
    packing: bool = False

    def __post_init__(self) -> None:
        if self.examples is None and self.tokens is None:
            raise ValueError("micro-batches need a size: examples, tokens or both")
        if self.packing and self.tokens is None:
            raise ValueError("packing needs a token budget (the packed row's length)")
        for name in ("examples", "tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"micro-batch {name} must be >= 1, got {value}")

    def cut(self, pairs: Sequence[Pair], lengths: np.ndarray) -> list[tuple[Pair, ...]]:
        """One rank's share of a step as micro-batches (a pure function of the pairs and lengths)."""
        pairs = list(pairs)
        if self.tokens is None:
            assert self.examples is not None
            return [tuple(pairs[k : k + self.examples]) for k in range(0, len(pairs), self.examples)]
        cap = self.examples or len(pairs) or 1
        if self.packing:
            return self._pack(pairs, lengths, cap)
        # Longest first, ties in plan order: the grouping depends on the plan and the lengths alone.
        order = sorted(range(len(pairs)), key=lambda k: (-int(lengths[pairs[k][1]]), k))
        return self._group(pairs, order, lengths, cap)

    def _group(self, pairs: list[Pair], order: list[int], lengths: np.ndarray, cap: int) -> list[tuple[Pair, ...]]:
        """Consecutive runs of the length order, cut where padding plus a fixed cost per micro-batch
        is least (each run holds ``count x its longest <= tokens``): a small dynamic program over
        the cut points. Greedy filling to the budget put the shortest examples of a run beside its
        longest (58% real on log-normal lengths); the cost of a micro-batch beyond its tokens
        (``MICRO_BATCH_COST``) keeps it from cutting every example apart."""
        width = np.array([int(lengths[pairs[k][1]]) for k in order], dtype=np.int64)
        n = len(width)
        best = np.zeros(n + 1, dtype=np.float64)
        cut = np.zeros(n + 1, dtype=np.int64)
        budget = int(self.tokens)  # type: ignore[arg-type]
        for j in range(1, n + 1):
            # Runs i..j-1; width is descending, so width[i] is the run's longest.
            first = max(0, j - cap)
            i = np.arange(first, j)
            count = j - i
            ok = count * width[first:j] <= budget
            ok[-1] = True  # one example alone always fits (data.max_length <= the budget is validated)
            cost = best[first:j] + count * width[first:j] + MICRO_BATCH_COST
            cost[~ok] = np.inf
            k = int(np.argmin(cost))
            best[j], cut[j] = cost[k], first + k
        runs = []
        j = n
        while j > 0:
            runs.append(order[cut[j]:j])
            j = cut[j]
        return [tuple(pairs[k] for k in run) for run in reversed(runs)]

    def _pack(self, pairs: list[Pair], lengths: np.ndarray, cap: int) -> list[tuple[Pair, ...]]:
        """First fit in plan order into rows of ``tokens``: a user's examples stay side by side in
        as few rows as fit them, so a row holds few runs of one user's tokens, and the segment
        kernels (``adapters/methods/runs.py``) work run by run. Longest first, as before, filled
        the rows as tightly but spread each user over every row of its step: on the bench's
        real-text lengths (32 users, a 4,096-token budget) 236 runs in 16 rows against 142 in as
        many rows, and packed LoRA r8 trained 7,690 real tokens/s against 7,800, FLoRA r1 7,793
        against 7,851 (medians of four epochs each, alternating in one process)."""
        rows: list[list[int]] = []
        room: list[int] = []
        for k in range(len(pairs)):
            need = int(lengths[pairs[k][1]])
            for r, free in enumerate(room):
                if free >= need and len(rows[r]) < cap:
                    rows[r].append(k)
                    room[r] -= need
                    break
            else:
                rows.append([k])
                room.append(self.tokens - need)  # type: ignore[operator]
        return [tuple(pairs[j] for j in sorted(row)) for row in rows]

    def align(self, shares: list[list[Pair]], lengths: np.ndarray) -> list[tuple[tuple[Pair, ...], ...]]:
        """Every rank's share as the same number of micro-batches."""
        if self.tokens is None:
            # By count: each share split evenly over the most micro-batches any rank needs.
            assert self.examples is not None
            n_micro = max(1, max(-(-len(s) // self.examples) for s in shares))
            return [tuple(split_even(s, n_micro)) for s in shares]
        cuts = [self.cut(s, lengths) for s in shares]
        n_micro = max(1, max(len(c) for c in cuts))
        return [tuple(c) + ((),) * (n_micro - len(c)) for c in cuts]


@dataclass
class Batch:
    """A micro-batch's tensors. Padded: one example a row, ``attention_mask`` marks real tokens.
    Packed: examples side by side in rows, ``position_ids`` restart at each, ``example`` says
    which example (of the micro-batch) each token belongs to, ``cu_seqlens`` where each starts
    in the flattened tokens (flash-attention's varlen convention)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    examples: int
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    example: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    lengths: list[int] = field(default_factory=list)

    @property
    def packed(self) -> bool:
        return self.example is not None

    @property
    def real_tokens(self) -> int:
        return int(sum(self.lengths))

    @property
    def computed_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device) -> "Batch":
        return Batch(**{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                        for k, v in self.__dict__.items()})

    def token_index(self, per_example: torch.Tensor) -> torch.Tensor:
        """``per_example [examples]`` values spread to what the adapter slot indexes: one per row
        when padded, one per token when packed."""
        return per_example if self.example is None else per_example[self.example]


def pad(examples: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> Batch:
    """``(input_ids, labels)`` pairs right-padded into one row each."""
    width = max(len(ids) for ids, _ in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        k = len(ids)
        input_ids[i, :k] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        labels[i, :k] = torch.as_tensor(np.asarray(lab, dtype=np.int64))
        mask[i, :k] = 1
    return Batch(input_ids, labels, n, attention_mask=mask, lengths=[len(ids) for ids, _ in examples])


def pack(examples: list[tuple[np.ndarray, np.ndarray]]) -> Batch:
    """``(input_ids, labels)`` pairs concatenated into one row. Each example's first label is
    IGNORE: the token before it (the previous example's last) must not learn to predict it, and
    unpacked, the first token is never a target either."""
    lengths = [len(ids) for ids, _ in examples]
    ids = np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in examples])
    labels = np.concatenate([np.asarray(lab, dtype=np.int64) for _, lab in examples])
    starts = np.concatenate([[0], np.cumsum(lengths)])
    labels[starts[:-1]] = IGNORE
    example = np.repeat(np.arange(len(examples)), lengths)
    positions = np.arange(len(ids)) - starts[:-1][example]
    return Batch(torch.from_numpy(ids)[None], torch.from_numpy(labels)[None], len(examples),
                 position_ids=torch.from_numpy(positions)[None], example=torch.from_numpy(example)[None],
                 cu_seqlens=torch.from_numpy(starts.astype(np.int32)), max_seqlen=max(lengths), lengths=lengths)

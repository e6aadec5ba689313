"""How much of the base's compute the recipe's micro-batches spend on padding, before training.

The share of real tokens among the tokens the base computes follows from the plan, the examples'
lengths and the micro-batch policy alone, so it is known before any step runs: ``flora-train
validate`` and the start of a run compute it over the first epoch and warn, naming the keys to set,
when padding would take more than a third of the compute.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np

from flora_train.data.batching import MicroBatching, Pair
from flora_train.data.planner import BatchPlanner

WASTE_LIMIT = 1 / 3  # padding above this share of the computed tokens is worth a warning
PLANNED_STEPS = 1_000  # steps an estimate reads (a big run's first epoch is millions of examples)


def planned_steps(planner: BatchPlanner) -> list[list[Pair]]:
    """The first ``PLANNED_STEPS`` steps of the plan as ``(user, example)`` pairs."""
    return [[(u, i) for u, ex in p.groups for i in ex] for p in itertools.islice(planner.steps(1), PLANNED_STEPS)]


def real_token_share(steps: Iterable[Sequence[Pair]], lengths: np.ndarray, batching: MicroBatching) -> float:
    """Real tokens over computed tokens (padding included) of ``steps`` cut by ``batching`` on one rank."""
    real = computed = 0
    for pairs in steps:
        for mb in batching.cut(pairs, lengths):
            sizes = lengths[[i for _, i in mb]]
            real += int(sizes.sum())
            computed += int(sizes.sum()) if batching.packing else len(mb) * int(sizes.max())
    return real / computed if computed else 1.0


def suggested_budget(lengths: np.ndarray, batching: MicroBatching, max_length: int) -> int:
    """A token budget computing about as many real tokens a micro-batch as the count does today
    (a power of two, at least ``data.max_length`` so every example fits)."""
    per_batch = (batching.examples or 64) * float(np.mean(lengths)) if len(lengths) else max_length
    return max(max_length, 1 << max(0, int(np.ceil(np.log2(max(per_batch, 1))))))


def padding_report(planner: BatchPlanner, lengths: np.ndarray, batching: MicroBatching,
                   max_length: int) -> tuple[float, str | None]:
    """The planned share of real tokens, and a one-paragraph warning naming the keys to set (None
    when padding takes at most a third)."""
    steps = planned_steps(planner)
    share = real_token_share(steps, lengths, batching)
    if share >= 1 - WASTE_LIMIT or not len(lengths):
        return share, None
    budget = batching.tokens or suggested_budget(lengths, batching, max_length)
    grouped = real_token_share(steps, lengths, MicroBatching(None, budget, False))
    packed = real_token_share(steps, lengths, MicroBatching(None, budget, True))
    now = (f"train.micro_batch_tokens={batching.tokens}" if batching.tokens is not None
           else f"train.micro_batch_size={batching.examples}")
    p50, p90, p99 = (int(np.percentile(lengths, q)) for q in (50, 90, 99))
    return share, (f"the examples' lengths (median {p50}, p90 {p90}, p99 {p99}, max {int(lengths.max())} tokens) leave "
                   f"{share:.0%} of the tokens the base computes real at {now} (the rest is padding, computed forward "
                   f"and backward): set train.micro_batch_tokens={budget} ({grouped:.0%} real, micro-batches grouped "
                   f"by length) and train.packing=true ({packed:.0%})")

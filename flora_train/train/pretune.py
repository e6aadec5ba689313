"""Kernel choices made before a phase's first step (``adapter.kernel: auto``), so a resume is exact.

The tuner times a method's kernels the first time a shape is met (``adapters/tuning.py``). Met as
the run goes, a shape first seen after a resume is timed in the resumed process, and timing noise
can pick another kernel than the uninterrupted run picked for it: the same adapters to float
rounding, not to the bit. So before its first step a phase walks the micro-batches its first
epoch gives this rank (from the examples' lengths: no token is read), activates the slot with
each one's real index over stand-in rows, and asks every adapted layer shape for its kernel the
way a forward does (``AdaptedLinear.kernel``); then the tuner is frozen, and a shape met later
(another epoch's grouping, an evaluation) takes its nearest measured neighbour's choice. A
resumed run walks the same micro-batches and finds every choice recorded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from flora_train.adapters.functional import kernels_for
from flora_train.adapters.layer import personal_layers
from flora_train.data.planner import StepPlan

if TYPE_CHECKING:
    from flora_train.train.trainer import Trainer

log = logging.getLogger("flora_train")


def _micro_batch_shapes(trainer: "Trainer", plans: Iterable[StepPlan]) -> dict[tuple, tuple[int, torch.Tensor, int]]:
    """Each distinct micro-batch this rank runs in ``plans``: ``(step rows, index, width)``, the
    index as ``AdapterSlot.activate`` gets it (``[examples]`` padded, ``[1, tokens]`` packed)."""
    lengths, packing = trainer.example_lengths, trainer.batching.packing
    seen: dict[tuple, tuple[int, torch.Tensor, int]] = {}
    for plan in plans:
        work = trainer.rank_work(plan)
        position = {u: k for k, u in enumerate(work.user_ids)}
        for mb in work.micro_batches:
            if not mb:  # an idle rank's padding batch: one pad token on the null row
                seen.setdefault(("idle",), (1, torch.zeros(1, dtype=torch.long), 1))
                continue
            pos = [position[u] for u, _ in mb]
            sizes = [int(lengths[i]) for _, i in mb]
            if packing:
                key = ("packed", len(work.user_ids), sum(sizes), len(set(pos)))
                if key not in seen:
                    index = torch.tensor(pos).repeat_interleave(torch.tensor(sizes))[None]
                    seen[key] = (len(work.user_ids), index, sum(sizes))
            else:
                key = ("padded", len(work.user_ids), max(sizes), tuple(pos))
                if key not in seen:
                    seen[key] = (len(work.user_ids), torch.tensor(pos), max(sizes))
    return seen


def pretune_kernels(trainer: "Trainer", plans: Iterable[StepPlan]) -> int:
    """Measures the kernel of every adapted layer shape for every micro-batch of ``plans`` that
    the tuner has no choice for yet, then freezes the tuner. Returns how many it measured."""
    slot = trainer.slot
    spec, tuner = slot.layout.spec, slot.tuner
    if spec.kernel != "auto" or len(kernels_for(spec.method, spec.rank)) < 2:
        return 0
    layers = personal_layers(trainer.model, slot)
    # Stand-ins of each layer shape's weights: under ZeRO-3 a layer holds only its shard of them
    # outside its forward, and the tuner times on synthetic tensors of the shape anyway.
    weights = {key: (torch.zeros(key[0], key[1], dtype=key[3], device=trainer.device),
                     torch.zeros(key[0], dtype=key[3], device=trainer.device) if key[2] else None) for key in layers}
    started, before = time.perf_counter(), len(tuner.timings)
    shapes = _micro_batch_shapes(trainer, plans)
    rows = torch.zeros(1, slot.layout.row_size).expand(max((r for r, _, _ in shapes.values()), default=1), -1)
    tuner.frozen = False
    try:
        with torch.enable_grad(), trainer._autocast():
            for n_rows, index, width in shapes.values():
                with slot.activate(rows[:n_rows], index):
                    x_rows = index.shape[0] if index.dim() == 1 else 1
                    for key, module in layers.items():
                        module.kernel(torch.Size([x_rows, width, key[1]]), *weights[key])
    finally:
        tuner.freeze()
    measured = len(tuner.timings) - before
    if measured:
        log.info("measured %d kernel choices for %d micro-batch shapes in %.1fs before the first step",
                 measured, len(shapes), time.perf_counter() - started)
    return measured

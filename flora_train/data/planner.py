"""The user-aware batch planner: which examples of which users form each step.

Per epoch, each user's examples are shuffled by a generator seeded from (seed, epoch, user) alone
and cut into chunks of ``examples_per_user``; with ``max_examples_per_user`` a user contributes at
most that many examples an epoch (a different window of its shuffled data each epoch, so a power
user's data is all seen over the epochs without drowning everyone else's). Steps are then packed
``users_per_step`` users at a time, always taking the users with the most chunks left (ties in a
seeded order), a user at most once per step. So a step is heterogeneous (many users, few
examples each), every (kept) example is used exactly once per epoch, a user with many chunks is
spread over the whole epoch instead of being left alone in a tail of one-user steps, and a user's
own sequence of batches does not depend on which other users exist. Everything is a pure function of the seed: a step can be
re-planned from its number alone, which is what resuming needs.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StepPlan:
    step: int  # global step number, from 0
    epoch: int
    groups: tuple[tuple[str, tuple[int, ...]], ...]  # (user id, example indices), each user once

    @property
    def user_ids(self) -> list[str]:
        return [u for u, _ in self.groups]

    @property
    def num_examples(self) -> int:
        return sum(len(ex) for _, ex in self.groups)

    def micro_batches(self, size: int) -> list[list[tuple[str, int]]]:
        """The step's ``(user, example)`` pairs cut into micro-batches of at most ``size`` examples."""
        flat = [(u, i) for u, ex in self.groups for i in ex]
        return [flat[k : k + size] for k in range(0, len(flat), size)]


class BatchPlanner:
    def __init__(
        self, user_examples: Mapping[str, Sequence[int]], users_per_step: int, examples_per_user: int, seed: int,
        max_examples_per_user: int | None = None, retain: tuple[int, int, int] | None = None,
        stream: Callable[[str], str] | None = None,
    ) -> None:
        """``retain``: (first index, count, per chunk): ``per chunk`` of the examples
        ``first .. first+count-1`` (user-anonymous, ``train.retain``) are added to each of a user's
        chunks, drawn from (seed, epoch, user, chunk) alone. ``stream(user)``: the name a user's
        shuffles are drawn under (a sweep's variants draw their user's, so each gets the batches
        its user would get alone); the user itself by default."""
        if users_per_step < 1 or examples_per_user < 1:
            raise ValueError("users_per_step and examples_per_user must be >= 1")
        if max_examples_per_user is not None and max_examples_per_user < 1:
            raise ValueError("max_examples_per_user must be >= 1")
        self.max_examples_per_user = max_examples_per_user
        self.retain = retain
        # Kept as given (numpy index arrays for a big run): a user's list is made per epoch only.
        self.user_examples = {u: ex for u, ex in sorted(user_examples.items()) if len(ex)}
        self.users_per_step = users_per_step
        self.examples_per_user = examples_per_user
        self.seed = seed
        self.stream = stream
        self._epoch_cache: tuple[int, list[tuple[tuple[str, tuple[int, ...]], ...]]] | None = None

    def restricted(self, users: Sequence[str]) -> "BatchPlanner":
        """The same plan settings over ``users`` only (a phase that trains some users). A user's
        own batches depend only on the seed, so they are the ones it would get in any plan."""
        keep = set(users)
        return BatchPlanner({u: ex for u, ex in self.user_examples.items() if u in keep}, self.users_per_step,
                            self.examples_per_user, self.seed, self.max_examples_per_user, self.retain, self.stream)

    def user_chunks(self, user: str, epoch: int) -> list[tuple[int, ...]]:
        """The user's batches in this epoch, in order (depends only on seed, epoch and user)."""
        ex = self.user_examples[user]
        examples = ex.tolist() if hasattr(ex, "tolist") else list(ex)
        user = self.stream(user) if self.stream is not None else user
        cap = self.max_examples_per_user
        if cap is not None and len(examples) > cap:
            # One fixed shuffle of the user's data, read in windows of ``cap``: epoch e takes the
            # e-th window (wrapping), so every example comes round.
            random.Random(f"{self.seed}/cap/{user}").shuffle(examples)
            start = (epoch * cap) % len(examples)
            examples = (examples + examples)[start : start + cap]
        random.Random(f"{self.seed}/{epoch}/{user}").shuffle(examples)
        k = self.examples_per_user
        chunks = [tuple(examples[i : i + k]) for i in range(0, len(examples), k)]
        if self.retain is None:
            return chunks
        first, count, per = self.retain
        return [c + tuple(first + j for j in random.Random(f"{self.seed}/retain/{epoch}/{user}/{n}").sample(range(count), min(per, count)))
                for n, c in enumerate(chunks)]

    def _epoch(self, epoch: int) -> list[tuple[tuple[str, tuple[int, ...]], ...]]:
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        chunks = {u: self.user_chunks(u, epoch) for u in self.user_examples}
        rng = random.Random(f"{self.seed}/{epoch}")
        order = list(chunks)
        rng.shuffle(order)
        # A max-heap on chunks left (ties in the seeded order): each step takes the users_per_step
        # users with most left, so the users with many chunks are spread over the whole epoch.
        heap = [(-len(chunks[u]), tie, u) for tie, u in enumerate(order) if chunks[u]]
        heapq.heapify(heap)
        taken = {u: 0 for u in chunks}
        steps: list[tuple[tuple[str, tuple[int, ...]], ...]] = []
        while heap:
            picked = [heapq.heappop(heap) for _ in range(min(self.users_per_step, len(heap)))]
            steps.append(tuple((u, chunks[u][taken[u]]) for _, _, u in picked))
            for left, tie, u in picked:
                taken[u] += 1
                if left + 1 < 0:
                    heapq.heappush(heap, (left + 1, tie, u))
        self._epoch_cache = (epoch, steps)
        return steps

    def occupancy(self, epochs: int = 1) -> dict[str, float]:
        """How full the steps are: examples per step over what a step can hold,
        ``users_per_step * examples_per_user`` or, with fewer users than ``users_per_step``, every
        user's ``examples_per_user`` (mean and the worst step), and the share of steps with a single
        user. A run of fewer users is not made fuller by any setting: it is not a skew to warn of."""
        users = min(self.users_per_step, len(self.user_examples))
        target = users * (self.examples_per_user + (self.retain[2] if self.retain else 0))
        fill = [sum(len(c) for _, c in groups) / target for e in range(epochs) for groups in self._epoch(e)]
        alone = [len(groups) == 1 for e in range(epochs) for groups in self._epoch(e)]
        if not fill:
            return {"occupancy_mean": 0.0, "occupancy_min": 0.0, "single_user_steps": 0.0}
        return {"occupancy_mean": sum(fill) / len(fill), "occupancy_min": min(fill), "single_user_steps": sum(alone) / len(alone)}

    def epoch_lengths(self, epochs: int) -> list[int]:
        """Steps in each of the first ``epochs`` epochs (the plan before any ``max_steps``)."""
        return [len(self._epoch(e)) for e in range(epochs)]

    def steps_per_epoch(self) -> int:
        return len(self._epoch(0))

    def total_steps(self, epochs: int, max_steps: int | None = None) -> int:
        # Epochs past max_steps are never planned (each is a pass over every user: seconds at 10^6).
        total = 0
        for e in range(epochs):
            if max_steps is not None and total >= max_steps:
                break
            total += len(self._epoch(e))
        return min(total, max_steps) if max_steps is not None else total

    def steps(self, epochs: int, max_steps: int | None = None, start: int = 0) -> Iterator[StepPlan]:
        """Steps ``start, start+1, ...`` of the plan (``start`` > 0 resumes mid-run)."""
        step = 0
        for epoch in range(epochs):
            for groups in self._epoch(epoch):
                if max_steps is not None and step >= max_steps:
                    return
                if step >= start:
                    yield StepPlan(step, epoch, groups)
                step += 1

    def user_step_counts(self, epochs: int) -> dict[str, int]:
        """How many steps each user takes in ``epochs`` (what per-user LR schedules span): one for
        each chunk of its examples, ``ceil(min(examples, max_examples_per_user) / examples_per_user)``
        an epoch, counted without planning a step. The plan before any ``train.max_steps``, which
        only cuts it: a run cut short and resumed follows the schedules of one never cut."""
        cap, k = self.max_examples_per_user, self.examples_per_user
        return {u: epochs * -(-(len(ex) if cap is None else min(len(ex), cap)) // k)
                for u, ex in self.user_examples.items()}

"""The user-aware batch planner: which examples of which users form each step.

Per epoch, each user's examples are shuffled by a generator seeded from (seed, epoch, user) alone
and cut into chunks of ``examples_per_user``. Chunks are then dealt round by round (every user's
first chunk, then every user's second, ...), shuffled within a round, and packed
``users_per_step`` users to a step (a user appears at most once per step). So a step is heterogeneous (many users, few examples each),
every example is used exactly once per epoch, and a user's own sequence of batches does not
depend on which other users exist. Everything is a pure function of the seed: a step can be
re-planned from its number alone, which is what resuming needs.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
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
        self, user_examples: Mapping[str, Sequence[int]], users_per_step: int, examples_per_user: int, seed: int
    ) -> None:
        if users_per_step < 1 or examples_per_user < 1:
            raise ValueError("users_per_step and examples_per_user must be >= 1")
        self.user_examples = {u: list(ex) for u, ex in sorted(user_examples.items()) if ex}
        self.users_per_step = users_per_step
        self.examples_per_user = examples_per_user
        self.seed = seed
        self._epoch_cache: tuple[int, list[tuple[tuple[str, tuple[int, ...]], ...]]] | None = None

    def user_chunks(self, user: str, epoch: int) -> list[tuple[int, ...]]:
        """The user's batches in this epoch, in order (depends only on seed, epoch and user)."""
        examples = list(self.user_examples[user])
        random.Random(f"{self.seed}/{epoch}/{user}").shuffle(examples)
        k = self.examples_per_user
        return [tuple(examples[i : i + k]) for i in range(0, len(examples), k)]

    def _epoch(self, epoch: int) -> list[tuple[tuple[str, tuple[int, ...]], ...]]:
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        chunks = {u: self.user_chunks(u, epoch) for u in self.user_examples}
        rng = random.Random(f"{self.seed}/{epoch}")
        dealt: list[tuple[str, tuple[int, ...]]] = []
        for r in range(max((len(c) for c in chunks.values()), default=0)):
            round_users = [u for u, c in chunks.items() if len(c) > r]
            rng.shuffle(round_users)
            dealt.extend((u, chunks[u][r]) for u in round_users)
        steps: list[tuple[tuple[str, tuple[int, ...]], ...]] = []
        current: dict[str, tuple[int, ...]] = {}
        for user, chunk in dealt:
            # A user coming back within a step (at a round boundary) starts a new step instead of
            # merging chunks: each user's batches stay exactly its chunks, whoever else exists.
            if len(current) == self.users_per_step or user in current:
                steps.append(tuple(current.items()))
                current = {}
            current[user] = chunk
        if current:
            steps.append(tuple(current.items()))
        self._epoch_cache = (epoch, steps)
        return steps

    def steps_per_epoch(self) -> int:
        return len(self._epoch(0))

    def total_steps(self, epochs: int, max_steps: int | None = None) -> int:
        total = sum(len(self._epoch(e)) for e in range(epochs))
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

    def user_step_counts(self, epochs: int, max_steps: int | None = None) -> dict[str, int]:
        """How many steps each user takes in the whole plan (drives per-user LR schedules)."""
        counts: dict[str, int] = {}
        for plan in self.steps(epochs, max_steps):
            for u in plan.user_ids:
                counts[u] = counts.get(u, 0) + 1
        return counts

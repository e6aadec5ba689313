"""Step statistics aggregated between log lines (aggregates only: never one metric key per user)."""

from __future__ import annotations

import torch

from flora_train import dist as fdist
from flora_train.store.sharded import ShardedAdapterStore
from flora_train.train.trainer import StepStats


class Meter:
    """Aggregates step stats between log lines (aggregates only; no per-user metric keys)."""

    def __init__(self, store: ShardedAdapterStore) -> None:
        self.store = store
        self.reset()

    def reset(self) -> None:
        self.steps, self.seconds, self.tokens, self.users, self.examples = 0, 0.0, 0, 0, 0
        self.computed_tokens = 0
        self.loss_sum, self.skipped = 0.0, 0
        self.touched: set[str] = set()

    def add(self, st: StepStats) -> None:
        self.steps += 1
        self.seconds += st.seconds
        self.tokens += st.tokens
        self.computed_tokens += st.computed_tokens
        self.users += st.users
        self.examples += st.examples
        self.loss_sum += st.loss if st.loss == st.loss else 0.0
        self.skipped += len(st.skipped_users)
        self.touched.update(st.user_losses)

    def store_counters(self) -> dict[str, float]:
        """The store's traffic summed over ranks, totals since the start of this process.
        Collective: every rank calls it at the same step."""
        counters = {**self.store.counters.as_dict(), **self.store.transfers()}
        counters["cache_hits"], counters["cache_misses"] = self.store.cache_stats()
        values = fdist.all_reduce(torch.tensor(list(counters.values()), dtype=torch.float64))
        return {f"store/{k}": float(v) for k, v in zip(counters, values.tolist())}

    def metrics(self) -> dict[str, float]:
        s = max(self.seconds, 1e-9)
        return {**self.store_counters(),
            "train/loss": self.loss_sum / max(self.steps, 1),
            "train/tokens_per_s": self.tokens / s,
            # Real tokens over the tokens the base computed (padding included): how much of the
            # compute trained anything (train.micro_batch_tokens and train.packing raise it).
            "plan/real_token_share": self.tokens / max(self.computed_tokens, 1),
            "train/padded_tokens": float(self.computed_tokens - self.tokens),
            "train/users_per_s": self.users / s,
            "train/examples_per_s": self.examples / s,
            "train/users_per_step": self.users / max(self.steps, 1),
            "train/users_touched": float(len(self.touched)),
            "train/skipped_user_updates": float(self.skipped),
        }

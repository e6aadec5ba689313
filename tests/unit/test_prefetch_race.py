"""The hot-row cache under the owner placement's background prefetch: while the prefetch thread
reads the next step's rows through the cache (evicting and writing back), the main thread reads
step counters and updates the current step's rows in the same cache. Many steps through a tiny
cache with the prefetch on must give bitwise the table of the same steps with no prefetch."""

import random

import torch

from flora_train.store import AdapterStore, OptimizerHyper
from flora_train.store.sharded import ShardedAdapterStore
from flora_train.store.sharding import ShardPlan

ROW = 50_000


def _init(ids):
    return torch.stack([torch.full((ROW,), 1.0 + (sum(map(ord, u)) % 97) / 97) for u in ids])


def _run(tmp_path, name: str, prefetch: bool, steps: int = 150) -> torch.Tensor:
    users = [f"user{i:03d}" for i in range(48)]
    local = AdapterStore(ROW, _init, OptimizerHyper(), "disk", "cpu", directory=tmp_path / name, cache_rows=8)
    store = ShardedAdapterStore(local, ShardPlan.balanced({u: 1 for u in users}, 1), "owner")
    rng = random.Random(0)
    plan = [rng.sample(users, 4) for _ in range(steps + 1)]
    for step in range(steps):
        rows = store.fetch(plan[step], requires_grad=True)
        if prefetch:
            store.prefetch(plan[step + 1], exclude=plan[step])
        g = torch.Generator().manual_seed(step)
        rows.values.grad = torch.randn(rows.values.shape, generator=g)
        owned = store.reduce_grads(rows)
        counters = store.steps(owned.user_ids)  # read while the prefetch may still be evicting
        store.apply(owned, torch.full((len(owned.user_ids),), 0.01) * (1 + counters.float() % 3))
    local.cache.flush()
    return torch.cat([local.table.gather(n, torch.arange(len(users))).reshape(len(users), -1).float()
                      for n in ("rows", "step", "exp_avg", "exp_avg_sq")], dim=1)


def test_prefetch_through_a_tiny_cache_changes_nothing(tmp_path):
    want = _run(tmp_path, "plain", prefetch=False)
    for attempt in range(2):
        assert torch.equal(_run(tmp_path, f"prefetch{attempt}", prefetch=True), want), attempt

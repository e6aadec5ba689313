"""Independence: N users trained jointly in heterogeneous batches end with the same adapters as
each user trained alone on its own batches with the same optimizer (float32 tolerance)."""

import dataclasses

import pytest
import torch

from flora_train.config import load_recipe
from flora_train.data import StepPlan, SyntheticTask
from flora_train.store import AdapterStore
from flora_train.store.sharded import ShardedAdapterStore
from flora_train.store.sharding import ShardPlan
from flora_train.train.session import train_settings
from flora_train.train.session import make_row_init, prepare_session
from flora_train.train.shared import train_shared_phase
from flora_train.train.trainer import Trainer
from flora_train.tracking import Tracker


def _session(tmp_path, model_dir, method, micro, extra=()):
    train, _ = SyntheticTask(num_users=6, train_examples_per_user=7, eval_examples_per_user=0, seed=3).write(tmp_path / "data")
    cfg = load_recipe(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"base.name_or_path={model_dir}",
            f"data.train_path={train}",
            f"adapter.method={method}",
            "adapter.rank=2",
            # One kernel on both sides: kernels differ in where float32 sums happen, and auto's
            # timing-based choice could differ between the joint and the alone batches.
            f"adapter.kernel={ {'flora': 'stacked', 'lora': 'bmm', 'ia3': 'fused'}[method] }",
            "adapter.target_modules=all-linear",
            "train.users_per_step=4",
            "train.examples_per_user=2",
            f"train.micro_batch_size={micro}",
            "train.epochs=3",
            "store.optimizer.lr=0.02",
            "store.optimizer.schedule=cosine",
            "store.optimizer.warmup_steps=2",
            "store.optimizer.weight_decay=0.01",
            "tracking.enabled=false",
            "store.tier=disk",  # the joint run reads through the disk tier and its prefetch; alone runs use host RAM
            *extra,
        ],
    )
    return prepare_session(cfg)


# Float32 batches of different shapes round differently, and Adam turns a rounding-level
# difference in a near-zero gradient into a visible step; float64 compute shows the invariant
# itself is exact, float32 that it holds at training precision.
# The rows are float32 whatever the base computes in. Alone, a user's examples form a uniform block
# (its rows are used as they are); jointly they may be gathered per example: the same sums, rounded
# to float32 in another order, and AdamW's normalisation magnifies a last-bit difference in a
# near-zero gradient to ~1e-5. float64 still checks several times tighter than float32.
TOLERANCE = {torch.float32: dict(rtol=1e-3, atol=5e-5), torch.float64: dict(rtol=1e-4, atol=2e-5)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("method", ["flora", "lora", "ia3"])
def test_joint_equals_alone(tmp_path, tiny_llama_dir, method, dtype):
    s = _session(tmp_path, tiny_llama_dir, method, micro=3)  # micro-batches cut across users: accumulation
    s.model.to(dtype)
    totals = s.user_total_steps()
    plans = list(s.planner.steps(epochs=3))
    assert max(len(p.user_ids) for p in plans) == 4
    joint = Trainer(s.model, s.slot, s.store, s.train, train_settings(s), totals, s.pad_id, s.device)
    joint.fit(plans)
    users = sorted(totals)
    trained = s.store.read(users)
    init = make_row_init(s.layout, s.cfg.store.init_seed)(users)
    assert (trained - init).abs().max() > 1e-3, "training must move the adapters"
    for k, user in enumerate(users):
        local = AdapterStore(s.layout.row_size, make_row_init(s.layout, s.cfg.store.init_seed), s.store.hyper)
        alone_store = ShardedAdapterStore(local, ShardPlan.balanced({user: 1}, 1))
        own = [StepPlan(p.step, p.epoch, ((user, dict(p.groups)[user]),)) for p in plans if user in p.user_ids]
        alone = Trainer(s.model, s.slot, alone_store, s.train, train_settings(s), totals, s.pad_id, s.device)
        alone.fit(own)
        torch.testing.assert_close(alone_store.read([user])[0], trained[k], **TOLERANCE[dtype])
        assert int(alone_store.steps([user])[0]) == int(s.store.steps([user])[0]) == len(own)


@pytest.mark.parametrize("method,batching", [("flora", "packing"), ("lora", "packing"), ("ia3", "tokens")])
def test_packed_or_length_grouped_joint_run_equals_each_user_alone_padded(tmp_path, tiny_llama_dir, method, batching):
    """Jointly with examples of every user packed into shared rows (per-token adapter routing,
    attention kept inside each example), or grouped by length under a token budget; alone in
    padded micro-batches of plan order. float64: the grouping changes nothing a user gets."""
    extra = ["data.max_length=40", "train.micro_batch_tokens=40"] + (["train.packing=true"] if batching == "packing" else [])
    s = _session(tmp_path, tiny_llama_dir, method, micro=3, extra=extra)
    s.model.to(torch.float64)
    assert s.model.config._attn_implementation == ("flora_packed" if batching == "packing" else "sdpa")
    totals = s.user_total_steps()
    plans = list(s.planner.steps(epochs=3))
    settings = train_settings(s)
    joint = Trainer(s.model, s.slot, s.store, s.train, settings, totals, s.pad_id, s.device)
    stats = joint.fit(plans)
    # The budget holds (40 tokens a micro-batch), and packing computes no padding at all.
    lengths = s.train.lengths()
    works = [joint.rank_work(p) for p in plans]
    assert all(len(mb) * max(lengths[i] for _, i in mb) <= 40 or batching == "packing" for w in works for mb in w.micro_batches if mb)
    assert max(len(w.micro_batches) for w in works) > 1
    if batching == "packing":
        assert all(sum(lengths[i] for _, i in mb) <= 40 for w in works for mb in w.micro_batches)
        assert all(st.computed_tokens == st.tokens for st in stats)
    users = sorted(totals)
    trained = s.store.read(users)
    padded = dataclasses.replace(settings, micro_batch_tokens=None, packing=False)
    for k, user in enumerate(users):
        local = AdapterStore(s.layout.row_size, make_row_init(s.layout, s.cfg.store.init_seed), s.store.hyper)
        alone_store = ShardedAdapterStore(local, ShardPlan.balanced({user: 1}, 1))
        own = [StepPlan(p.step, p.epoch, ((user, dict(p.groups)[user]),)) for p in plans if user in p.user_ids]
        Trainer(s.model, s.slot, alone_store, s.train, padded, totals, s.pad_id, s.device).fit(own)
        torch.testing.assert_close(alone_store.read([user])[0], trained[k], **TOLERANCE[torch.float64])


def test_personal_rows_on_a_frozen_shared_adapter_stay_independent(tmp_path, tiny_llama_dir):
    """``train.shared_phase: first``: the shared phase touches no personal row or step counter; after
    it, users trained jointly on the frozen shared adapter equal each user trained alone on it."""
    s = _session(tmp_path, tiny_llama_dir, "flora", micro=3,
                 extra=["adapter.shared.method=lora", "adapter.shared.rank=2", "adapter.shared.lr=0.05"])
    s.model.to(torch.float64)
    users = sorted(s.user_total_steps())
    before, shared_before = s.store.read(users), s.shared.row.detach().clone()
    losses = train_shared_phase(s, Tracker(False, None, "x", s.run_dir), steps=6)
    assert losses[-1] < losses[0] and s.shared.frozen and s.shared.steps == 6
    assert (s.shared.row - shared_before).abs().max() > 1e-3, "the shared phase must train the shared adapter"
    assert torch.equal(s.store.read(users), before) and int(s.store.steps(users).sum()) == 0
    frozen = s.shared.row.detach().clone()
    totals = s.user_total_steps()
    plans = list(s.planner.steps(epochs=3))
    Trainer(s.model, s.slot, s.store, s.train, train_settings(s), totals, s.pad_id, s.device, shared=s.shared).fit(plans)
    assert torch.equal(s.shared.row, frozen), "a frozen shared adapter never changes"
    trained = s.store.read(users)
    for k, user in enumerate(users[:3]):
        local = AdapterStore(s.layout.row_size, make_row_init(s.layout, s.cfg.store.init_seed), s.store.hyper)
        alone_store = ShardedAdapterStore(local, ShardPlan.balanced({user: 1}, 1))
        own = [StepPlan(p.step, p.epoch, ((user, dict(p.groups)[user]),)) for p in plans if user in p.user_ids]
        Trainer(s.model, s.slot, alone_store, s.train, train_settings(s), totals, s.pad_id, s.device, shared=s.shared).fit(own)
        torch.testing.assert_close(alone_store.read([user])[0], trained[k], **TOLERANCE[torch.float64])
    # The same users on the plain base end elsewhere: the shared adapter is really under them.
    local = AdapterStore(s.layout.row_size, make_row_init(s.layout, s.cfg.store.init_seed), s.store.hyper)
    plain_store = ShardedAdapterStore(local, ShardPlan.balanced({users[0]: 1}, 1))
    own = [StepPlan(p.step, p.epoch, ((users[0], dict(p.groups)[users[0]]),)) for p in plans if users[0] in p.user_ids]
    with s.slot.without_shared():
        Trainer(s.model, s.slot, plain_store, s.train, train_settings(s), totals, s.pad_id, s.device).fit(own)
    assert (plain_store.read([users[0]])[0] - trained[0]).abs().max() > 1e-4

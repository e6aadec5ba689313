"""Ownership and step partition: balanced, stable, every example exactly once, equal micro-batches."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flora_train.store.placement import partition_step
from flora_train.store.sharding import ShardError, ShardPlan

tokens_st = st.dictionaries(st.text("abcdef", min_size=1, max_size=4), st.integers(0, 500), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(tokens=tokens_st, world=st.integers(1, 5))
def test_balanced_plan_is_deterministic_and_within_one_user_of_even(tokens, world):
    plan = ShardPlan.balanced(tokens, world)
    assert plan.owners == ShardPlan.balanced(dict(reversed(list(tokens.items()))), world).owners
    assert set(plan.owners) == set(tokens)
    load = [0] * world
    for u, r in plan.owners.items():
        load[r] += max(tokens[u], 1)
    assert load == plan.load
    # LPT bound: no rank exceeds the average by more than the heaviest user.
    assert max(load) <= sum(load) / world + max(max(t, 1) for t in tokens.values())


def test_new_users_go_to_the_least_loaded_rank_and_nobody_moves():
    plan = ShardPlan.balanced({"a": 100, "b": 10, "c": 10}, 2)
    before = dict(plan.owners)
    assert plan.add_users({"a": 100, "d": 5}) == ["d"]
    assert {u: plan.owners[u] for u in before} == before
    assert plan.owners["d"] == 1


def test_plan_naming_a_dead_rank_is_refused():
    with pytest.raises(ShardError, match="user 'u9' is owned by shard 3"):
        ShardPlan.from_dict({"world": 2, "load": [1, 1], "owners": {"u1": 0, "u9": 3}}, "ckpt/shard_plan.json")
    with pytest.raises(ShardError, match="made for 2 ranks, but the job has 3"):
        ShardPlan.balanced({"a": 1}, 2).check(3)
    with pytest.raises(ShardError, match="no owning rank"):
        ShardPlan(2).owner("ghost")


@settings(max_examples=80, deadline=None)
@given(
    groups=st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(1, 5)), min_size=1, max_size=8, unique_by=lambda g: g[0]),
    world=st.integers(1, 4),
    placement=st.sampled_from(["owner", "fetch"]),
    micro=st.integers(1, 6),
)
def test_partition_covers_each_example_once_with_equal_micro_batch_counts(groups, world, placement, micro):
    pairs, k = [], 0
    for user, n in groups:
        pairs += [(user, k + i) for i in range(n)]
        k += n
    plan = ShardPlan.balanced({u: n for u, n in groups}, world)
    work = partition_step(pairs, world, placement, plan.owners, micro)
    assert sorted(p for w in work for p in w.pairs) == sorted(pairs)
    assert len({len(w.micro_batches) for w in work}) == 1
    assert all(len(mb) <= micro for w in work for mb in w.micro_batches)
    if placement == "owner":
        assert all(plan.owners[u] == r for r, w in enumerate(work) for u, _ in w.pairs)
    else:
        sizes = [len(w.pairs) for w in work]
        assert max(sizes) - min(sizes) <= 1

"""Store shards on disk: re-partitioning onto another world size, and damaged shard sets refused
with the shard and user named, leaving the live store untouched."""

import json

import pytest
import torch

from flora_train.store import AdapterStore, OptimizerHyper
from flora_train.store.sharded import ShardedAdapterStore
from flora_train.store.saved import iter_shards, read_saved_rows
from flora_train.store.sharding import ShardError, ShardPlan

ROW = 3
USERS = [f"u{i}" for i in range(7)]


def _init(ids):
    return torch.stack([torch.full((ROW,), float(int(u[1:]) if u[1:].isdigit() else -1)) for u in ids])


def _store(plan: ShardPlan) -> ShardedAdapterStore:
    return ShardedAdapterStore(AdapterStore(ROW, _init, OptimizerHyper()), plan)


def _fake_world(tmp_path, world: int) -> ShardPlan:
    """Shards as ``world`` ranks would write them (each rank's store built under a one-rank view)."""
    plan = ShardPlan.balanced({u: 10 + i for i, u in enumerate(USERS)}, world)
    for rank in range(world):
        local = AdapterStore(ROW, _init, OptimizerHyper())
        local.add_users(plan.users_of(rank))
        s = ShardedAdapterStore(local, ShardPlan.balanced({u: 1 for u in plan.users_of(rank)}, 1))
        s.rank, s.world = rank, world
        s.save_shard(tmp_path, {})
    (tmp_path / "shard_plan.json").write_text(json.dumps(plan.to_dict()))
    return plan


def test_shards_saved_by_three_ranks_load_into_one(tmp_path):
    _fake_world(tmp_path, 3)
    ids, rows = read_saved_rows([tmp_path])
    assert sorted(ids) == USERS and torch.equal(rows, _init(ids))
    one = _store(ShardPlan.balanced({"other": 1}, 1))
    plan = ShardPlan.balanced({u: 1 for u in USERS}, 1)
    plan.add_users({"new": 1})
    one.load_shards([tmp_path], plan, fresh={"new"})
    assert torch.equal(one.read(USERS), _init(USERS)) and torch.equal(one.read(["new"]), _init(["new"]))
    assert one.local.registry.ids == plan.users_of(0)  # owners number rows in plan order


def test_damaged_shard_sets_are_refused_and_the_store_is_untouched(tmp_path):
    _fake_world(tmp_path, 3)
    live = _store(ShardPlan.balanced({"keep": 1}, 1))
    before = live.local.state_tensors()
    plan = ShardPlan.balanced({u: 1 for u in USERS}, 1)

    (tmp_path / "users-00001-of-00003.json").rename(tmp_path / "gone.json")
    with pytest.raises(ShardError, match="users-00001-of-00003.json: missing or corrupt user list"):
        live.load_shards([tmp_path], plan)
    (tmp_path / "gone.json").rename(tmp_path / "users-00001-of-00003.json")

    dup = json.loads((tmp_path / "users-00000-of-00003.json").read_text())
    other = json.loads((tmp_path / "users-00002-of-00003.json").read_text())
    (tmp_path / "users-00002-of-00003.json").write_text(json.dumps({"user_ids": other["user_ids"][:-1] + [dup["user_ids"][0]]}))
    with pytest.raises(ShardError, match=f"user '{dup['user_ids'][0]}' is in two shards"):
        list(iter_shards(tmp_path))
    (tmp_path / "users-00002-of-00003.json").write_text(json.dumps(other))

    (tmp_path / "store-00002-of-00003.safetensors").unlink()
    with pytest.raises(ShardError, match="do not form one set of 3"):
        live.load_shards([tmp_path], plan)
    with pytest.raises(ShardError, match="no store shards"):
        live.load_shards([tmp_path / "nowhere"], plan)
    for key, value in live.local.state_tensors().items():
        assert torch.equal(value, before[key]), key
    assert live.local.registry.ids == ["keep"]


def test_a_user_missing_from_every_shard_is_named(tmp_path):
    _fake_world(tmp_path, 2)
    plan = ShardPlan.balanced({u: 1 for u in [*USERS, "stranger"]}, 1)
    with pytest.raises(ShardError, match="no shard holds user 'stranger'"):
        _store(ShardPlan.balanced({"x": 1}, 1)).load_shards([tmp_path], plan)

"""Fetch placement asks owners by user key and the owner resolves it to its own row: a requester
never infers where another rank keeps a row (the old code assumed owners register their users in
plan order, and served another user's row to a store that did not)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flora_train.store import AdapterStore, OptimizerHyper
from flora_train.store.registry import UserRegistry, user_key
from flora_train.store.sharded import ShardedAdapterStore
from flora_train.store.sharding import ShardPlan

ROW = 4


def _row_of(user: str) -> torch.Tensor:
    return torch.full((ROW,), float(int(user.split("-")[1])))


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    users = [f"user-{i}" for i in range(12)]
    plan = ShardPlan.balanced({u: 1 for u in users}, world)
    local = AdapterStore(ROW, lambda ids: torch.stack([_row_of(u) for u in ids]), OptimizerHyper())
    # Every owner registers its users in reverse plan order before the store does.
    local.add_users(list(reversed(plan.users_of(rank))))
    store = ShardedAdapterStore(local, plan, "fetch")
    work = store.work([(u, 0) for u in users], 64)
    rows = store.fetch(work.user_ids)
    got_rows = torch.equal(rows.values.detach(), torch.stack([_row_of(u) for u in work.user_ids]))
    rows.values.grad = torch.ones_like(rows.values)
    owned = store.reduce_grads(rows)
    # Every user is in the step once: each owner gets a gradient of ones for exactly its users, on their rows.
    got_grads = (sorted(owned.user_ids) == sorted(plan.users_of(rank)) and bool((owned.grads == 1).all())
                 and [local.registry.user(int(r)) for r in owned.row_ids] == owned.user_ids)
    ok = torch.tensor([float(got_rows), float(got_grads), float(store.counters.rows_remote)])
    everyone = [torch.zeros(3) for _ in range(world)]
    dist.all_gather(everyone, ok)
    if rank == 0:
        Path(out).write_text(json.dumps([t.tolist() for t in everyone]))
    dist.destroy_process_group()


def test_owners_resolve_keys_whatever_order_they_hold_rows_in():
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.txt"
        mp.spawn(_worker, args=(2, str(Path(tmp) / "init"), str(out)), nprocs=2)
        ranks = json.loads(out.read_text())
    assert all(rows_ok == 1.0 for rows_ok, _, _ in ranks), f"a rank got another user's row: {ranks}"
    assert all(grads_ok == 1.0 for _, grads_ok, _ in ranks), f"an owner got another user's gradient: {ranks}"
    assert all(remote > 0 for _, _, remote in ranks), "the test must move rows between ranks"


def test_keys_resolve_to_rows_and_unknown_keys_are_named():
    reg = UserRegistry(["a", "b", "c"])
    assert reg.rows_for_keys(torch.tensor([user_key("c"), user_key("a")])).tolist() == [2, 0]
    reg.add(["d"])  # keys of users registered after the index was built resolve too
    assert reg.rows_for_keys(torch.tensor([user_key("d")])).tolist() == [3]
    with pytest.raises(KeyError, match="does not hold"):
        reg.rows_for_keys(torch.tensor([user_key("zz")]))
    assert 0 <= user_key("a") < 2**63 and user_key("a") != user_key("b")


def _collision_worker(rank: int, world: int, init_file: str, out: str) -> None:
    # blake2b gives no collision to find; a weak key (the id's length) stands in for one.
    from flora_train.store import registry as registry_module
    from flora_train.store.registry import UserKeyCollision

    registry_module.user_key = len
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        outcome = {}
        for placement in ("owner", "fetch"):
            store = ShardedAdapterStore(AdapterStore(ROW, lambda ids: torch.zeros(len(ids), ROW), OptimizerHyper()),
                                        ShardPlan(world), placement=placement)
            try:
                store.add_users({f"user-{i}": 1 for i in range(4)})  # two a rank, each pair one key
                outcome[placement] = "added"
            except UserKeyCollision as exc:
                outcome[placement] = str(exc)
        Path(f"{out}.{rank}").write_text(json.dumps(outcome))
    finally:
        dist.destroy_process_group()


def test_two_users_with_one_key_are_refused_when_added_not_mid_step():
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        mp.spawn(_collision_worker, args=(2, str(Path(tmp) / "init"), str(out)), nprocs=2)
        outcomes = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    for outcome in outcomes:
        assert outcome["owner"] == "added"  # owner placement sends no keys: nothing to refuse
        assert "have the same 63-bit key" in outcome["fetch"] and "rename one of them" in outcome["fetch"], outcome

"""Storage tiers and the hot-row cache: the same updates give the same table on every tier."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flora_train.store import AdapterStore, OptimizerHyper

ROW = 7


def _init(ids):
    return torch.stack([torch.full((ROW,), float(len(u))) for u in ids])


def _store(tmp_path, tier, cache_rows=0, name="t"):
    return AdapterStore(ROW, _init, OptimizerHyper(), tier, "cpu", directory=tmp_path / name, cache_rows=cache_rows)


def _train(store, users, steps, seed):
    rng = random.Random(seed)
    for _ in range(steps):
        picked = rng.sample(users, k=rng.randint(1, min(6, len(users))))
        rows = store.fetch(picked)
        g = torch.Generator().manual_seed(rng.randrange(1 << 30))
        rows.values.grad = torch.randn(rows.values.shape, generator=g)
        store.apply(rows, torch.full((len(picked),), 0.01))


@settings(max_examples=15, deadline=None)
@given(n_users=st.integers(1, 40), steps=st.integers(1, 12), cache=st.integers(6, 10), seed=st.integers(0, 10**6))
def test_every_tier_and_cache_give_the_same_table(tmp_path_factory, n_users, steps, cache, seed):
    tmp = tmp_path_factory.mktemp("tiers")
    users = [f"user{i}" for i in range(n_users)]
    stores = [_store(tmp, "host"), _store(tmp, "disk", name="d"), _store(tmp, "host", cache, name="hc"), _store(tmp, "disk", cache, name="dc")]
    for s in stores:
        s.add_users(users)
        _train(s, users, steps, seed)
    ref = stores[0].state_tensors()
    for s in stores[1:]:
        got = s.state_tensors()
        for key in ref:
            assert torch.equal(ref[key], got[key]), (type(s.table).__name__, s.cache is not None, key)


def test_cache_counts_hits_and_evicts_least_recently_used(tmp_path):
    s = _store(tmp_path, "disk", cache_rows=2)
    s.add_users(["a", "b", "c"])
    s.read(["a"]), s.read(["b"]), s.read(["a"])  # b is now least recently used
    assert (s.cache.hits, s.cache.misses) == (1, 2)
    s.write(["c"], torch.zeros(1, ROW))  # evicts b
    s.read(["a"])
    assert s.cache.hits == 2
    s.read(["b"])
    assert s.cache.misses == 4
    with pytest.raises(ValueError, match="cache holds 2"):
        s.fetch(["a", "b", "c"])
    assert torch.equal(s.read(["a", "b", "c"])[2], torch.zeros(ROW))  # bulk reads go through the table
    assert torch.equal(s.state_tensors()["rows"][2], torch.zeros(ROW))  # flushed on read-out


def test_disk_store_saves_its_records_without_copying_the_table(tmp_path):
    # A full checkpoint of a disk store hands the writer views of the mapped records, never a copy
    # of a column (at 10^6 users a copy of every strided column was 5 GB of private memory); the
    # file it writes loads back as the store's contents.
    from safetensors.torch import load_file

    from flora_train.store.shard_writer import save_rows

    store = _store(tmp_path, "disk")
    users = [f"u{i}" for i in range(30)]
    store.add_users(users)
    _train(store, users, 5, seed=1)
    assert store.table.log_rows > 0, "the steps' rows sit in the log (else this test shows no compaction)"
    tensors = store.state_tensors()
    records = store.table._records  # after the compaction that handing out whole columns runs
    lo, hi = records.data_ptr(), records.data_ptr() + records.numel()
    for key, t in tensors.items():
        assert lo <= t.data_ptr() < hi, f"{key} is a copy, not a view of the records"
    save_rows(tensors, tmp_path / "store.safetensors")  # what a checkpoint's shard writer is handed
    loaded = load_file(str(tmp_path / "store.safetensors"))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_an_unknown_tier_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"store tier must be one of \('device', 'host', 'disk'\), got 'tape'"):
        _store(tmp_path, "tape")

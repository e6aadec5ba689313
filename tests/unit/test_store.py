"""The adapter store: registry, per-user init, row-wise sparse optimizer, persistence."""

import json

import pytest
import torch

from flora_train.adapters import AdapterLayout, AdapterSpec, user_seed
from flora_train.store import AdapterStore, OptimizerHyper, UserRegistry
from flora_train.store.saved import shard_file
from flora_train.store.sharded import ShardedAdapterStore
from flora_train.store.sharding import ShardPlan


def _layout(method="lora"):
    return AdapterLayout(AdapterSpec(method, rank=2), [("m1", 5, 3), ("m2", 3, 4)])


def _store(layout, hyper=OptimizerHyper(), seed=0, **where):
    def init(ids):
        return layout.init_rows(torch.tensor([user_seed(seed, u) for u in ids], dtype=torch.int64))

    return AdapterStore(layout.row_size, init, hyper, **where)


def test_registry_rows_in_arrival_order():
    reg = UserRegistry(["b", "a", "ü/../x"])
    assert reg.add(["a", "c"]) == ["c"]
    back = reg
    assert back.ids == ["b", "a", "ü/../x", "c"] and back.row("c") == 3
    with pytest.raises(KeyError, match="unknown user 'zz'"):
        back.row("zz")
    with pytest.raises(ValueError):
        reg.add([""])


def test_init_per_method_and_independent_of_order():
    lora = _layout("lora")
    rows = lora.init_rows(torch.tensor([1, 2], dtype=torch.int64))
    a = lora.views(rows, "m1")["lora_a"]
    assert torch.all(lora.views(rows, "m1")["lora_b"] == 0)
    assert a.abs().max() <= 1 / 5**0.5 and a.std() > 0.1
    assert not torch.equal(a[0], a[1])
    flora = _layout("flora")  # rank 2: a = 1, b = 1 ± d, an exact identity mask (test_flora_rank.py)
    views = flora.views(flora.init_rows(torch.tensor([7], dtype=torch.int64)), "m1")
    assert torch.all(views["a"] == 1) and torch.all(views["b"].sum(dim=1) == 2) and not torch.all(views["b"] == 1)
    s1, s2 = _store(lora), _store(lora)
    s1.add_users(["x", "y", "z"])
    s2.add_users(["z"])
    s2.add_users(["q", "y", "x"])
    assert torch.equal(s1.read(["x", "y", "z"]), s2.read(["x", "y", "z"]))


def test_uniform_stream_looks_uniform():
    from flora_train.adapters.seeding import counter_uniform

    u = counter_uniform(torch.tensor([3, 4], dtype=torch.int64), 0, 20000)
    assert u.min() >= 0 and u.max() < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005


PATHS = {"host": {}, "device": {"tier": "device"}, "disk": {"tier": "disk"}, "host+cache": {"cache_rows": 3}}


@pytest.mark.parametrize("name", ["adamw", "adagrad"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_rowwise_step_equals_torch_optimizer_on_that_row(name, path, tmp_path):
    """Bit for bit torch's fused optimizer on every path the rows can live on, and the bytes each
    path moves between the host and the compute device: a host home sends a step's rows and takes
    back their gradients, never the moments (counted on CPU as a GPU would move them)."""
    layout = _layout()
    hyper = OptimizerHyper(name=name, weight_decay=0.01)
    store = _store(layout, hyper, directory=tmp_path, **PATHS[path])
    store.add_users([f"u{i}" for i in range(6)])
    row_bytes = layout.row_size * 4
    moved = {"bytes_h2d": 0, "bytes_d2h": 0}
    # The fused kernel is the one the store runs, so it matches bit for bit; the reference
    # single-tensor implementation differs only by float32 rounding.
    ref = torch.nn.Parameter(store.read(["u3"])[0].clone())
    plain = torch.nn.Parameter(ref.detach().clone())
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adagrad
    kw = dict(lr=0.05, weight_decay=0.01, eps=1e-8)
    opt = cls([ref], fused=True, **kw)
    opt_plain = cls([plain], foreach=False, **kw)
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        grad = torch.randn(layout.row_size, generator=g)
        users = ["u1", "u3"] if step % 2 else ["u3"]
        rows = store.fetch(users)
        full = torch.zeros_like(rows.values)
        full[users.index("u3")] = grad
        full[0] += 1.0 if len(users) == 2 else 0.0
        rows.values.grad = full
        store.apply(rows, torch.full((len(users),), 0.05))
        if path in ("host", "disk"):  # rows up, gradients down: 1x the row each way, the moments stay
            moved = {"bytes_h2d": moved["bytes_h2d"] + len(users) * row_bytes, "bytes_d2h": moved["bytes_d2h"] + len(users) * row_bytes}
        if path != "host+cache":
            assert store.link.transfers.as_dict() == moved
        ref.grad, plain.grad = grad, grad.clone()
        opt.step()
        opt_plain.step()
        assert torch.equal(store.read(["u3"])[0], ref.detach())
        torch.testing.assert_close(store.read(["u3"])[0], plain.detach(), rtol=1e-6, atol=1e-7)
    assert store.steps(["u3", "u1", "u0"]).tolist() == [5, 2, 0]
    if path == "host+cache":  # the cache keeps every column on the device: what it loads crosses whole
        state = sum(max(c.numel, 1) * c.dtype.itemsize for c in store.table.columns.values())  # a row's columns
        # u3 and u1 loaded once each in the steps, u0 by the step-counter read; nothing written back yet
        assert store.link.transfers.as_dict() == {"bytes_h2d": 3 * state, "bytes_d2h": 0}
        store.read(["u0", "u1", "u2", "u3", "u4"])  # a bulk read writes the two changed rows back first
        assert store.link.transfers.as_dict() == {"bytes_h2d": 3 * state, "bytes_d2h": 2 * state}


def test_absent_and_skipped_rows_are_untouched():
    layout = _layout()
    store = _store(layout)
    store.add_users(["a", "b", "c"])
    before = {k: v.clone() for k, v in store.state_tensors().items()}
    rows = store.fetch(["a", "b"])
    rows.values.grad = torch.ones_like(rows.values)
    store.apply(rows, torch.tensor([0.1, 0.1]), keep=torch.tensor([True, False]))
    after = store.state_tensors()
    for key in before:
        assert torch.equal(before[key][1:], after[key][1:]), key  # b skipped, c absent
    assert not torch.equal(before["rows"][0], after["rows"][0])


def _save(store: AdapterStore, folder) -> None:
    """A one-rank checkpoint shard of ``store``, as checkpoints write it."""
    ShardedAdapterStore(store, ShardPlan.balanced({u: 1 for u in store.registry.ids}, 1)).save_shard(folder, {})


def _load(store: AdapterStore, folder) -> AdapterStore:
    users = json.loads((folder / shard_file(0, 1, "users")).read_text())["user_ids"]
    sharded = ShardedAdapterStore(store, ShardPlan.balanced({"placeholder": 1}, 1))
    sharded.load_shards([folder], ShardPlan.balanced({u: 1 for u in users}, 1))
    return store


def test_growth_save_load(tmp_path):
    layout = _layout()
    store = _store(layout)
    for i in range(100):
        store.add_users([f"user{i}"])
    assert len(store) == 100 and store.capacity < 400
    rows = store.fetch(["user5"])
    rows.values.grad = torch.ones_like(rows.values)
    store.apply(rows, torch.tensor([0.1]))
    _save(store, tmp_path)
    other = _load(_store(layout), tmp_path)
    ids = store.registry.ids
    mine, theirs = [store.registry.row(u) for u in ids], [other.registry.row(u) for u in ids]
    for k, v in store.state_tensors().items():
        assert torch.equal(v[mine], other.state_tensors()[k][theirs]), k
    other.add_users(["new"])
    assert other.registry.row("new") == 100


def test_load_refuses_mismatched_shapes(tmp_path):
    store = _store(_layout())
    store.add_users(["a"])
    _save(store, tmp_path)
    with pytest.raises(ValueError, match="shape"):
        _load(_store(_layout("ia3")), tmp_path)


def test_step_cost_follows_rows_in_step_not_table():
    """Only index_select/index_copy on the step's rows: no op touches the whole table."""
    layout = _layout()
    store = _store(layout)
    store.add_users([f"u{i}" for i in range(50_000)])
    table = store.table.column("rows")
    rows = store.fetch(["u7", "u49999"])
    rows.values.grad = torch.ones_like(rows.values)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        store.apply(rows, torch.tensor([0.1, 0.1]))
    # Views cost O(1); index_select/index_copy_ cost O(rows indexed). Anything else on a
    # table-sized input would cost O(table).
    cheap = {"aten::select", "aten::as_strided", "aten::slice", "aten::view", "aten::narrow", "aten::alias",
             "aten::index_select", "aten::index_copy_", "aten::index_copy", "aten::unsqueeze", "aten::expand"}
    big = [e for e in prof.events() if e.name not in cheap
           and any(isinstance(s, list) and s and s[0] >= 50_000 for s in e.input_shapes)]
    assert not big, [(e.name, e.input_shapes) for e in big[:5]]
    assert store.table.column("rows") is table

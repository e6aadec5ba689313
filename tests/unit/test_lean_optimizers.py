"""Lean optimizer state (issue 16): row-wise Adagrad (one accumulator per row and module) equals a
per-row reference written group by group; AdamW with bfloat16 moments is float32 AdamW with its
moments rounded; the per-user bytes each optimizer keeps."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from flora_train.adapters import AdapterLayout, AdapterSpec, user_seed
from flora_train.store import AdapterStore, OptimizerHyper


def _layout():
    return AdapterLayout(AdapterSpec("lora", rank=2), [("m1", 5, 3), ("m2", 3, 4), ("m3", 6, 2)])


def _store(layout, hyper, tier="host", tmp=None):
    def init(ids):
        return layout.init_rows(torch.tensor([user_seed(0, u) for u in ids], dtype=torch.int64))

    return AdapterStore(layout.row_size, init, hyper, tier, directory=tmp)


def _reference(w, acc, g, lr, starts, eps, wd):
    """One user's row-wise Adagrad step, written module by module in float64."""
    w, acc, g = w.double().clone(), acc.double().clone(), g.double()
    bounds = [*starts, w.numel()]
    if wd:
        g = g + wd * w
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        acc[k] += (g[a:b] ** 2).mean()
        w[a:b] -= lr * g[a:b] / (acc[k].sqrt() + eps)
    return w, acc


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), wd=st.sampled_from([0.0, 0.01]), tier=st.sampled_from(["host", "disk"]))
def test_rowwise_adagrad_equals_a_per_row_reference(tmp_path_factory, seed, wd, tier):
    layout = _layout()
    starts = layout.module_starts()
    assert len(starts) == 3
    hyper = OptimizerHyper(name="rowwise_adagrad", eps=1e-8, weight_decay=wd, segments=starts)
    store = _store(layout, hyper, tier, tmp_path_factory.mktemp("t") if tier == "disk" else None)
    users = [f"u{i}" for i in range(5)]
    store.add_users(users)
    assert store.state_tensors()["optim.sum_sq"].shape == (5, 3), "one accumulator per row and module"
    ref = {u: (store.read([u])[0].double(), torch.zeros(3, dtype=torch.float64)) for u in users}
    g = torch.Generator().manual_seed(seed)
    for step in range(4):
        picked = [u for u in users if torch.rand(1, generator=g).item() < 0.6] or ["u0"]
        lrs = torch.rand(len(picked), generator=g) * 0.1 + 0.01  # per-row learning rates
        rows = store.fetch(picked)
        rows.values.grad = torch.randn(rows.values.shape, generator=g)
        untouched = {u: store.read([u])[0].clone() for u in users if u not in picked}
        store.apply(rows, lrs)
        for k, u in enumerate(picked):
            ref[u] = _reference(*ref[u], rows.values.grad[k], float(lrs[k]), starts, 1e-8, wd)
        for u in users:
            # float32 against float64: each step's few roundings, relative to the row's size.
            torch.testing.assert_close(store.read([u])[0].double(), ref[u][0], rtol=1e-5, atol=1e-6)
        for u, before in untouched.items():
            assert torch.equal(store.read([u])[0], before), "rows not in the step are not touched"
    acc = store.state_tensors()["optim.sum_sq"]
    for i, u in enumerate(users):
        torch.testing.assert_close(acc[i].double(), ref[u][1], rtol=1e-5, atol=1e-9)


def test_bfloat16_moments_are_float32_adamw_rounded():
    layout = _layout()
    f32 = _store(layout, OptimizerHyper(name="adamw", weight_decay=0.01))
    b16 = _store(layout, OptimizerHyper(name="adamw", weight_decay=0.01, state_dtype="bfloat16"))
    users = ["a", "b"]
    for s in (f32, b16):
        s.add_users(users)
    assert b16.state_tensors()["optim.exp_avg"].dtype == torch.bfloat16
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(2, layout.row_size, generator=g)
    for s in (f32, b16):
        rows = s.fetch(users)
        rows.values.grad = grad.clone()
        s.apply(rows, torch.full((2,), 0.05))
    # Step 1 reads zero moments either way: the same update, the moments stored rounded.
    assert torch.equal(f32.read(users), b16.read(users))
    for name in ("optim.exp_avg", "optim.exp_avg_sq"):
        assert torch.equal(b16.state_tensors()[name], f32.state_tensors()[name].to(torch.bfloat16))
    for _ in range(10):
        grad = torch.randn(2, layout.row_size, generator=g)
        for s in (f32, b16):
            rows = s.fetch(users)
            rows.values.grad = grad.clone()
            s.apply(rows, torch.full((2,), 0.05))
    # bf16 keeps 8 bits: moments within 2^-8 relative, so each step's move within ~2^-8 of float32's.
    diff = (f32.read(users) - b16.read(users)).abs().max().item()
    assert 0 < diff < 11 * 0.05 * 2**-7, diff


def test_state_bytes_per_user():
    row = 1000
    assert OptimizerHyper("adamw").state_bytes(row) == 8 + 8000
    assert OptimizerHyper("adamw", state_dtype="bfloat16").state_bytes(row) == 8 + 4000
    assert OptimizerHyper("adagrad").state_bytes(row) == 8 + 4000
    assert OptimizerHyper("rowwise_adagrad", segments=(0, 10, 500)).state_bytes(row) == 8 + 12
    assert [OptimizerHyper(n, state_dtype=d).label() for n, d in (("adamw", "bfloat16"), ("adagrad", "float32"))] == [
        "adamw/bfloat16", "adagrad"]
    refusal = r"adagrad keeps its state in float32, not 'bfloat16' \(bfloat16 state is for adamw"
    with pytest.raises(ValueError, match=refusal):
        _store(_layout(), OptimizerHyper("adagrad", state_dtype="bfloat16"))


def test_validate_reports_per_user_bytes_from_the_meta_model(tiny_llama_dir):
    from flora_train.adapters import inject_adapters
    from flora_train.base import load_frozen_model
    from flora_train.config import load_recipe
    from flora_train.store.footprint import describe, footprint

    cfg = load_recipe("recipes/quickstart.yaml", ["base.tiny=null", f"base.name_or_path={tiny_llama_dir}",
                                                  "store.optimizer.name=rowwise_adagrad"])
    fp = footprint(cfg)
    _, real = inject_adapters(load_frozen_model(str(tiny_llama_dir)), AdapterSpec("flora", 1), list(cfg.adapter.target_modules))
    assert fp.row_size == real.row_size and fp.adapter_bytes == 4 * real.row_size
    assert fp.state_bytes == 8 + 4 * len(real.modules)
    text = describe(cfg, fp)
    assert f"{fp.row_size:,} floats" in text and "rowwise_adagrad" in text and "100,000,000 users" in text

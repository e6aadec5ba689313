"""Shared + personal adapters: every example's layer is ``personal_i(shared(W))``, exactly (float64,
forward and backward, every pair of methods), through ``inject_adapters`` on layers that only one
of the two adapts as well as layers both adapt."""

from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flora_train.adapters import AdapterSpec, inject_adapters
from flora_train.adapters.methods import get_method

METHODS = ["flora", "lora", "ia3"]


def _model(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        q_proj=nn.Linear(width, width + 1), act1=nn.Tanh(), down_proj=nn.Linear(width + 1, width - 1, bias=False),
        act2=nn.Tanh(), o_proj=nn.Linear(width - 1, 3))).double()


def _reference(model, layout, shared_layout, rows, shared_row, index, x):
    """Each example through its own dense weights: W_i = personal_i(shared(W)), b_i likewise."""
    outs = []
    for i, user in enumerate(index.tolist()):
        h = x[i]
        for name, module in model.named_children():
            if not hasattr(module, "base_layer"):
                h = module(h)
                continue
            w, b = module.base_layer.weight, module.base_layer.bias
            for lay, row in ((shared_layout, shared_row), (layout, rows[user])):
                if name in lay.slices:
                    tensors = {k: v[0] for k, v in lay.views(row.unsqueeze(0), name).items()}
                    impl = get_method(lay.spec.method)
                    w, b = impl.dense_weight(w, tensors, lay.spec.scaling), impl.dense_bias(b, tensors)
            h = h @ w.T + (b if b is not None else 0)
        outs.append(h)
    return torch.stack(outs)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(METHODS), st.sampled_from(METHODS), st.integers(1, 3), st.integers(1, 4), st.integers(1, 5),
       st.integers(0, 2**31 - 1))
def test_shared_under_personal_equals_dense_per_example(personal, shared, rank, users, batch, seed):
    model = _model(6, seed % 1000)
    spec = AdapterSpec(personal, rank, alpha=3.0, kernel="auto" if personal != "lora" else "bmm", feedforward_modules=("down_proj",))
    shared_spec = AdapterSpec(shared, rank + 1, alpha=5.0, feedforward_modules=("down_proj",))
    # Personal on q/down, shared on down/o: one layer each alone, one under both.
    slot, layout = inject_adapters(model, spec, ["q_proj", "down_proj"], shared=(shared_spec, ["down_proj", "o_proj"], 0))
    g = torch.Generator().manual_seed(seed)
    rows = (1 + 0.3 * torch.randn(users, layout.row_size, generator=g, dtype=torch.float64)).requires_grad_()
    slot.shared.row = (1 + 0.3 * torch.randn(slot.shared.layout.row_size, generator=g, dtype=torch.float64)).requires_grad_()
    index = torch.randint(0, users, (batch,), generator=g)
    x = torch.randn(batch, 2, 6, generator=g, dtype=torch.float64)
    with slot.activate(rows, index):
        y = model(x)
    ref = _reference(model, layout, slot.shared.layout, rows, slot.shared.row, index, x)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    up = torch.randn_like(y)
    got = torch.autograd.grad(y, [rows, slot.shared.row], up)
    want = torch.autograd.grad(ref, [rows, slot.shared.row], up)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_untrained_shared_adapter_is_the_identity_and_base_only_ignores_it():
    model = _model(6, 0)
    reference = _model(6, 0)
    spec = AdapterSpec("flora", 1, feedforward_modules=("down_proj",))
    slot, layout = inject_adapters(model, spec, ["q_proj"], shared=(AdapterSpec("lora", 4, feedforward_modules=("down_proj",)), "all-linear", 7))
    assert set(slot.shared.layout.slices) == {"q_proj", "down_proj", "o_proj"}
    x = torch.randn(3, 2, 6, dtype=torch.float64)
    rows = layout.init_rows(torch.arange(2)).double()
    with slot.activate(rows, torch.tensor([0, 1, 1])):
        torch.testing.assert_close(model(x), reference(x), rtol=1e-12, atol=1e-12)
    slot.shared.row = slot.shared.row + 0.1  # a trained shared adapter changes the output ...
    with slot.activate(rows, torch.tensor([0, 1, 1])):
        assert not torch.allclose(model(x), reference(x))
    with slot.base_only():  # ... but never the plain base's
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    with slot.without_shared(), slot.activate(rows, torch.tensor([0, 1, 1])):
        torch.testing.assert_close(model(x), reference(x), rtol=1e-12, atol=1e-12)


def test_shared_targets_that_match_nothing_name_the_key():
    with pytest.raises(ValueError, match=r"adapter\.shared\.target_modules=\['nope'\] matched no linear layer"):
        inject_adapters(_model(6, 0), AdapterSpec("flora", 1), ["q_proj"], shared=(AdapterSpec("lora", 2), ["nope"], 0))

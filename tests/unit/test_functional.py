"""Each batched op equals the explicit per-example computation with W_i formed densely (float64)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flora_train.adapters import functional as Fa

shapes = st.fixed_dictionaries(
    {
        "users": st.integers(1, 5),
        "batch": st.integers(1, 7),
        "seq": st.integers(1, 5),
        "fan_in": st.integers(1, 12),
        "fan_out": st.integers(1, 12),
        "rank": st.integers(1, 16),
        "bias": st.booleans(),
        "seed": st.integers(0, 2**31 - 1),
    }
)


def _problem(p, method):
    g = torch.Generator().manual_seed(p["seed"])
    r, n_in, n_out, u = p["rank"], p["fan_in"], p["fan_out"], p["users"]

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    seq = 1 if p["seed"] % 3 == 0 else p["seq"]  # often one token a row: a packed row's tokens
    x = rand(p["batch"], seq, n_in).requires_grad_()
    weight = rand(n_out, n_in)
    bias = rand(n_out) if p["bias"] else None
    # Repeated users: the index draws with replacement from u users.
    index = torch.randint(0, u, (p["batch"],), generator=g)
    if p["seed"] % 4 < 2:  # each user's examples adjacent, as the planner and packing put them (runs)
        index = index.sort().values
    if method == "flora":
        adapter = {"a": rand(u, r, n_out), "b": rand(u, r, n_in)}
    elif method == "ia3":
        # PEFT's IA3: a feed-forward output layer scales its input, any other layer its output.
        adapter = {"b": rand(u, 1, n_in)} if p["seed"] % 2 else {"a": rand(u, 1, n_out)}
    else:
        adapter = {"lora_a": rand(u, r, n_in), "lora_b": rand(u, n_out, r)}
    for t in adapter.values():
        t.requires_grad_()
    return x, weight, bias, index, adapter


def _dense_reference(method, x, weight, bias, index, adapter, scaling):
    outs = []
    for i, user in enumerate(index.tolist()):
        tensors = {k: v[user] for k, v in adapter.items()}
        w_i = Fa.dense_adapted_weight(method, weight, tensors, scaling)
        b_i = Fa.dense_adapted_bias(method, bias, tensors)
        y = x[i] @ w_i.T
        outs.append(y + b_i if b_i is not None else y)
    return torch.stack(outs)


def _batched(method, x, weight, bias, index, adapter, scaling, kernel):
    return Fa.adapted_linear(method, kernel, x, weight, bias, adapter, index, scaling)


def _grads(y, tensors, upstream):
    return torch.autograd.grad(y, tensors, upstream, allow_unused=True)


def _check(method, p, kernel):
    x, weight, bias, index, adapter = _problem(p, method)
    scaling = 0.7
    y = _batched(method, x, weight, bias, index, adapter, scaling, kernel)
    ref = _dense_reference(method, x, weight, bias, index, adapter, scaling)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(y)
    tensors = [x, *adapter.values()]
    for got, want in zip(_grads(y, tensors, upstream), _grads(ref, tensors, upstream)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(shapes, st.sampled_from(["stacked", "rankwise", "segment"]))
def test_flora_kernels_match_dense(p, kernel):
    _check("flora", p, kernel)


@settings(max_examples=40, deadline=None)
@given(shapes, st.sampled_from(["fused", "segment"]))
def test_ia3_kernels_match_dense(p, kernel):
    _check("ia3", p, kernel)


@settings(max_examples=40, deadline=None)
@given(shapes, st.sampled_from(["bmm", "segment", "loop"]))
def test_lora_kernels_match_dense(p, kernel):
    _check("lora", p, kernel)


def test_the_segment_kernels_forward_is_the_gathers_bit_for_bit():
    """Only the adapters' gradients are summed in another order (run by run, not token by token):
    a server may take either kernel for a batch and give the same tokens."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 24, generator=g)  # a packed row's tokens: one token a row
    weight = torch.randn(16, 24, generator=g)
    index = torch.tensor([0] * 20 + [2] * 30 + [1] * 14)
    adapters = {"flora": {"a": torch.rand(3, 1, 16, generator=g) + 0.5, "b": torch.rand(3, 1, 24, generator=g) + 0.5},
                "ia3": {"b": torch.rand(3, 1, 24, generator=g) + 0.5}}
    for method, gather in (("flora", "stacked"), ("ia3", "fused")):
        want = Fa.adapted_linear(method, gather, x, weight, None, adapters[method], index, 1.0)
        assert torch.equal(Fa.adapted_linear(method, "segment", x, weight, None, adapters[method], index, 1.0), want)


def test_flora_per_example_tensors_without_index():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    a, b = torch.randn(3, 2, 6, generator=g, dtype=torch.float64), torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    with_index = Fa.flora_linear(x, w, None, a, b, index=torch.arange(3))
    torch.testing.assert_close(Fa.flora_linear(x, w, None, a, b), with_index)


def test_identity_init_is_the_base_layer():
    x, w, bias = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randn(5)
    ones = torch.ones(2, 3, 5), torch.ones(2, 3, 4)
    torch.testing.assert_close(Fa.flora_linear(x, w, bias, *ones), torch.nn.functional.linear(x, w, bias))


def test_flora_rank1_is_one_gemm_of_the_base_shape(monkeypatch):
    calls = []
    real = torch.nn.functional.linear

    def spy(inp, weight, bias=None):
        calls.append(tuple(inp.shape))
        return real(inp, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    x = torch.randn(4, 3, 8)
    Fa.flora_linear(x, torch.randn(6, 8), None, torch.ones(4, 1, 6), torch.ones(4, 1, 8))
    assert calls == [(4, 3, 8)]
    calls.clear()
    Fa.flora_linear(x, torch.randn(6, 8), None, torch.ones(4, 5, 6), torch.ones(4, 5, 8))
    assert calls == [(4, 5, 3, 8)], "rank r must stack the r scaled inputs into one GEMM"
    calls.clear()
    Fa.flora_linear(x, torch.randn(6, 8), None, torch.ones(4, 5, 6), torch.ones(4, 5, 8), kernel="rankwise")
    assert calls == [(4, 3, 8)] * 5, "rankwise runs r GEMMs of the base's shape"


def test_shape_errors_are_clear():
    x = torch.randn(2, 3, 4)
    try:
        Fa.flora_linear(x, torch.randn(5, 4), None, torch.ones(3, 1, 5), torch.ones(3, 1, 4))
    except ValueError as e:
        assert "pass index" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_every_kernel_runs_under_bf16_autocast_with_float32_adapters():
    """Mixed precision as training runs it: float32 activations and rows, bf16 autocast. Every kernel
    (LoRA's add their update into the base output in place, which autocast does not cast) must run,
    stay within bf16 rounding of float32, and give float32 gradients for the rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, generator=g)
    weight = torch.randn(8, 16, generator=g) / 4
    index = torch.tensor([0, 1, 1, 2])
    adapters = {"flora": {"a": torch.rand(3, 2, 8, generator=g) + 0.5, "b": torch.rand(3, 2, 16, generator=g) + 0.5},
                "ia3": {"a": torch.rand(3, 1, 8, generator=g) + 0.5},
                "lora": {"lora_a": torch.randn(3, 2, 16, generator=g) / 4, "lora_b": torch.randn(3, 8, 2, generator=g) / 4}}
    for method, kernels in Fa.KERNELS.items():
        for kernel in kernels:
            params = {k: v.clone().requires_grad_() for k, v in adapters[method].items()}
            want = Fa.adapted_linear(method, kernel, x, weight, None, params, index, 2.0)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = Fa.adapted_linear(method, kernel, x, weight, None, params, index, 2.0)
            torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2, msg=f"{method}/{kernel}")
            got.float().sum().backward()
            assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params.values()), (method, kernel)

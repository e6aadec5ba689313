"""FLoRA beyond rank 1: the untrained adapter is exactly the base, yet its rank components differ,
so a rank-r adapter learns a mask of rank > 1 (with every a_j = b_j = 1 it never could)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flora_train.adapters import AdapterLayout, AdapterSpec, flora_linear


def _layout(rank: int, fan_in: int = 12, fan_out: int = 10) -> AdapterLayout:
    return AdapterLayout(AdapterSpec("flora", rank), [("layer", fan_in, fan_out)])


def _mask(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.transpose(-1, -2) @ b / a.shape[-2]  # mean_j a_jᵀ b_j


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 9), st.integers(0, 2**62), st.integers(1, 40))
def test_untrained_adapter_is_exactly_the_base(rank, seed, fan_in):
    layout = _layout(rank, fan_in=fan_in)
    views = layout.views(layout.init_rows(torch.tensor([seed, seed + 1])), "layer")
    a, b = views["a"].double(), views["b"].double()
    assert torch.equal(b.sum(dim=1), torch.full_like(b[:, 0], float(rank))), "Σ_j b_j must be exactly r"
    assert torch.equal(_mask(a, b), torch.ones(2, 10, fan_in, dtype=torch.float64))
    g = torch.Generator().manual_seed(seed % 2**31)
    x, w, bias = (torch.randn(2, 3, fan_in, generator=g, dtype=torch.float64), torch.randn(10, fan_in, generator=g, dtype=torch.float64),
                  torch.randn(10, generator=g, dtype=torch.float64))
    for kernel in ("stacked", "rankwise"):
        got = flora_linear(x, w, bias, a, b, kernel=kernel)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, w, bias), rtol=1e-12, atol=1e-12)


def test_components_differ_and_depend_on_the_user_only():
    layout = _layout(4)
    rows = layout.init_rows(torch.tensor([1, 2, 1]))
    b = layout.views(rows, "layer")["b"]
    assert torch.equal(rows[0], rows[2]) and not torch.equal(rows[0], rows[1])
    for j in range(4):
        for k in range(j + 1, 4):
            assert not torch.equal(b[0, j], b[0, k]), (j, k)
    assert torch.all(layout.init_rows(torch.tensor([5]))[:, :10] == 1), "a starts at exactly 1"
    assert torch.all(_layout(1).init_rows(torch.tensor([5])) == 1), "rank 1 is the plain identity"


def _train_rank4_mask(a0: torch.Tensor, b0: torch.Tensor, steps: int = 300) -> torch.Tensor:
    """Adam on a rank-4 FLoRA adapter of one layer, fitting a target whose mask has rank 2."""
    g = torch.Generator().manual_seed(0)
    n_in, n_out = b0.shape[-1], a0.shape[-1]
    w = torch.randn(n_out, n_in, generator=g)
    u, v = torch.randn(2, n_out, generator=g), torch.randn(2, n_in, generator=g)
    target_mask = 1 + 0.5 * (u.T @ v) / 2
    x = torch.randn(256, n_in, generator=g)
    y = x @ (w * target_mask).T
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = torch.optim.Adam([a, b], lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        loss = (flora_linear(x[None], w, None, a, b)[0] - y).pow(2).mean()
        loss.backward()
        opt.step()
    return _mask(a, b)[0].detach()


def _significant(mask: torch.Tensor) -> int:
    s = torch.linalg.svdvals(mask.double())
    return int((s > 1e-3 * s[0]).sum())


def test_rank4_learns_a_mask_of_rank_above_one():
    layout = _layout(4)
    views = layout.views(layout.init_rows(torch.tensor([11])), "layer")
    assert _significant(_train_rank4_mask(views["a"], views["b"])) >= 2
    # The symmetric start (every a_j = b_j = 1) stays rank 1 however long it trains: the defect fixed.
    ones = torch.ones_like(views["a"]), torch.ones_like(views["b"])
    assert _significant(_train_rank4_mask(*ones)) == 1

"""The loss at target positions: the same numbers as full-logit cross-entropy, without full-size
float32 logits."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flora_train.base import load_frozen_model
from flora_train.data.tokenize import IGNORE
from flora_train.train.loss import cross_entropy_rows, example_losses, target_logits, token_losses


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 70), st.integers(2, 50), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_chunked_cross_entropy_is_cross_entropy(rows, vocab, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=g)
    upstream = torch.randn(rows, generator=g, dtype=torch.float64)
    got = cross_entropy_rows(logits, targets, chunk)
    want = F.cross_entropy(logits, targets, reduction="none")
    torch.testing.assert_close(got, want.float())  # float32 rows, as the loss is kept
    (g_got,) = torch.autograd.grad(got, logits, upstream.float())
    (g_want,) = torch.autograd.grad(want, logits, upstream)
    # The chunks compute in float32: softmax(x) - onehot lies in [-1, 1], so each gradient is off by
    # a few float32 roundings of |upstream| (64 ulps is ample, and far below any wrong formula).
    bound = 64 * torch.finfo(torch.float32).eps * float(upstream.abs().max()) if rows else 0.0
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=bound)


def test_bf16_logits_get_bf16_gradients_from_float32_math():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 300, generator=g).bfloat16().requires_grad_()
    targets = torch.randint(0, 300, (37,), generator=g)
    got = cross_entropy_rows(logits, targets, chunk=8)
    ref = logits.detach().float().requires_grad_()
    want = F.cross_entropy(ref, targets, reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.float(), ref.grad, rtol=1e-2, atol=1e-3)  # one bf16 rounding


def test_target_logits_are_the_full_logits_at_targets(tiny_llama_dir, tiny_gpt2_dir):
    for model_dir in (tiny_llama_dir, tiny_gpt2_dir):
        model = load_frozen_model(str(model_dir)).double()
        ids = torch.randint(3, 200, (3, 8))
        labels = ids.clone()
        labels[0, :5] = IGNORE  # a prompt without loss
        labels[1, :] = IGNORE  # an example with no target at all
        attention = torch.ones_like(ids)
        full = model(input_ids=ids, attention_mask=attention).logits
        t = target_logits(model, ids, attention, labels)
        mask = labels[:, 1:] != IGNORE
        assert t.logits.shape == (int(mask.sum()), full.shape[-1])
        torch.testing.assert_close(t.logits, full[:, :-1][mask], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(example_losses(t), token_losses(full, labels).sum(dim=1).float())


def _largest_float32_logits(fn, vocab: int) -> int:
    """The largest float32 tensor over the vocabulary (elements) any op makes while ``fn`` runs,
    forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() and t.shape[-1] == vocab:
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    with Largest():
        fn()
    return Largest.biggest


def test_no_full_size_float32_logits_in_a_bf16_step(tiny_llama_dir):
    """Under bf16 autocast the old loss made a float32 copy of every position's logits (and kept a
    float32 log-softmax of them); the trainer's loss makes none larger than one chunk."""
    from flora_train.adapters import AdapterSpec, inject_adapters
    from flora_train.train import loss as L

    model = load_frozen_model(str(tiny_llama_dir))
    slot, layout = inject_adapters(model, AdapterSpec("flora", 1), ["q_proj", "v_proj"])
    vocab = model.config.vocab_size
    ids = torch.randint(3, 200, (4, 40))
    labels = ids.clone()
    labels[:, :30] = IGNORE  # a prompt: 9 targets per example
    full = 4 * 39 * vocab
    rows = layout.init_rows(torch.arange(4)).requires_grad_()

    def step(new: bool) -> None:
        with slot.activate(rows, torch.arange(4)), torch.autocast("cpu", dtype=torch.bfloat16):
            if new:
                loss = example_losses(target_logits(model, ids, torch.ones_like(ids), labels)).sum()
            else:
                loss = token_losses(model(input_ids=ids).logits, labels).sum()
            loss.backward()

    old_peak = _largest_float32_logits(lambda: step(False), vocab)
    L.CHUNK, chunk = 16, L.CHUNK
    try:
        new_peak = _largest_float32_logits(lambda: step(True), vocab)
    finally:
        L.CHUNK = chunk
    assert old_peak >= full, "the full-logit loss makes a full float32 copy (the defect)"
    assert new_peak <= 16 * vocab < full, new_peak

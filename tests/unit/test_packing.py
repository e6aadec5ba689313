"""Token budgets and packing: how a step becomes micro-batches, and packed ≡ padded.

The exactness test runs real transformers models (Llama with grouped-query attention, GPT-2) in
float64: each example's target logits and each user's row gradient from packed rows (per-token
adapter routing, ``flora_packed`` attention) equal the padded computation's, for random lengths,
users, methods and kernels, with and without a shared adapter under the personal rows."""

import importlib.util
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flora_train.adapters import AdapterSpec, inject_adapters
from flora_train.adapters import functional as Fa
from flora_train.base import packed_attention
from flora_train.base.packed_attention import example_lengths, use_packed_attention
from flora_train.data.batching import MicroBatching, pack, pad
from flora_train.store.placement import partition_step
from flora_train.train.loss import batch_target_logits, example_losses

KERNELS = Fa.KERNELS


def _model(arch: str, seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=50, max_position_embeddings=64))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=64))
    return model.double().eval()


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["llama", "gpt2"]), st.sampled_from(sorted(KERNELS)), st.integers(1, 3),
       st.lists(st.integers(2, 12), min_size=1, max_size=7), st.integers(1, 3), st.booleans(), st.integers(0, 2**31 - 1))
def test_packed_rows_equal_padded_rows_forward_and_backward(arch, method, rank, lengths, users, shared, seed):
    g = torch.Generator().manual_seed(seed)
    kernel = KERNELS[method][seed % len(KERNELS[method])]
    model = _model(arch, seed % 997)
    spec = AdapterSpec(method, rank, alpha=2.0, kernel=kernel)
    shared_spec = (AdapterSpec("lora", 2, alpha=4.0), "all-linear", 0) if shared else None
    slot, layout = inject_adapters(model, spec, "all-linear", shared=shared_spec)
    if shared:
        slot.shared.row = (0.2 * torch.randn(slot.shared.layout.row_size, generator=g, dtype=torch.float64))
    rows = (1 + 0.3 * torch.randn(users, layout.row_size, generator=g, dtype=torch.float64)).requires_grad_()
    examples = []
    for n in lengths:
        ids = torch.randint(0, 50, (n,), generator=g).numpy()
        labels = ids.copy()
        labels[: int(torch.randint(0, n - 1, (1,), generator=g))] = -100  # a prompt the loss skips (the last token stays)
        examples.append((ids, labels))
    user_of = torch.randint(0, users, (len(examples),), generator=g)
    weights = torch.rand(len(examples), generator=g, dtype=torch.float64)

    def run(batch):
        with slot.activate(rows, batch.token_index(user_of)):
            t = batch_target_logits(model, batch)
            per_example = example_losses(t)
            grad, = torch.autograd.grad((per_example.double() * weights).sum(), rows)
        return t, per_example, grad

    padded = run(pad(examples, pad_id=0))
    use_packed_attention(model, torch.device("cpu"), half_precision=False)
    packed = run(pack(examples))
    # The same target logits in the same order (examples in order, positions in order).
    torch.testing.assert_close(packed[0].logits, padded[0].logits, rtol=1e-9, atol=1e-9)
    assert torch.equal(packed[0].example, padded[0].example) and torch.equal(packed[0].targets, padded[0].targets)
    torch.testing.assert_close(packed[1], padded[1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(packed[2], padded[2], rtol=1e-9, atol=1e-9)


def test_packed_attention_on_cpu_reads_each_key_head_for_its_query_group(monkeypatch):
    """Grouped-query attention on the CPU hands SDPA the model's own key and value heads
    (``enable_gqa``) instead of copies repeated per query head (kept for the backward, too)."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[1], k.shape[1], v.shape[1], kw.get("enable_gqa")))
        return sdpa(q, k, v, **kw)

    model = _model("llama", 0)  # 4 query heads, 2 key/value heads
    use_packed_attention(model, torch.device("cpu"), half_precision=False)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    g = torch.Generator().manual_seed(0)
    examples = [(ids, ids) for ids in (torch.randint(0, 50, (n,), generator=g).numpy() for n in (5, 3))]
    batch_target_logits(model, pack(examples))
    assert seen == [(4, 2, 2, True)] * 4  # two examples, two layers


def test_cuda_half_precision_packs_through_torchs_varlen_attention(monkeypatch):
    """Where flash-attention runs (CUDA, bf16/fp16) and the ``flash_attn`` package is not installed,
    packing takes PyTorch's ``varlen_attn``: picked on a CUDA device in half precision only (not
    with attention dropout, which it lacks), called as its signature reads, and equal to
    ``flora_packed`` forward and backward. The kernel needs a GPU: here a CPU stand-in with its
    signature and contract (per-example causal attention over the bounds) takes its place."""
    real = packed_attention.torch_varlen()
    assert real is not None  # torch 2.13 has it
    assert importlib.util.find_spec("flash_attn") is None  # else transformers' flash_attention_2 is chosen
    calls = []

    def stand_in(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        inspect.signature(real).bind(q, k, v, cu_q, cu_k, max_q, max_k, **kw)  # what PyTorch's takes
        assert q.dim() == 3 and q.is_contiguous() and cu_q.dtype == torch.int32 and cu_q is cu_k
        bounds = cu_q.tolist()
        assert max_q == max_k == max(e - s for s, e in zip(bounds, bounds[1:])) and kw["window_size"] == (-1, 0)
        calls.append(kw)
        return torch.cat([F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                                         scale=kw["scale"], enable_gqa=kw["enable_gqa"]).transpose(0, 1)
                          for s, e in zip(bounds, bounds[1:])])

    monkeypatch.setattr(packed_attention, "torch_varlen", lambda: stand_in)
    model = _model("llama", 0)  # 4 query heads, 2 key/value heads
    assert use_packed_attention(model, torch.device("cpu"), half_precision=True) == "flora_packed"
    assert use_packed_attention(model, torch.device("cuda"), half_precision=False) == "flora_packed"
    model.config.attention_dropout = 0.1
    assert use_packed_attention(model, torch.device("cuda"), half_precision=True) == "flora_packed"
    model.config.attention_dropout = 0.0
    assert use_packed_attention(model, torch.device("cuda"), half_precision=True) == "flora_varlen"
    slot, layout = inject_adapters(model, AdapterSpec("flora", 2, kernel="segment"), "all-linear")
    g = torch.Generator().manual_seed(0)
    rows = (1 + 0.3 * torch.randn(2, layout.row_size, generator=g, dtype=torch.float64)).requires_grad_()
    examples = [(ids, ids) for ids in (torch.randint(0, 50, (n,), generator=g).numpy() for n in (5, 9, 2, 7))]
    batch = pack(examples)

    def run(attention):
        model.set_attn_implementation(attention)
        with slot.activate(rows, batch.token_index(torch.tensor([0, 1, 1, 0]))):
            logits = batch_target_logits(model, batch).logits
        grad, = torch.autograd.grad(logits.square().sum(), rows)
        return logits, grad

    varlen, packed = run("flora_varlen"), run("flora_packed")
    assert len(calls) == 2 and all(c["enable_gqa"] for c in calls)  # one call a layer, grouped-query heads
    torch.testing.assert_close(varlen[0], packed[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(varlen[1], packed[1], rtol=1e-12, atol=1e-12)
    # Under autocast (how train.precision runs half precision) rotary embeddings hand attention
    # float32 queries and keys beside bf16 values; the kernel (a custom op: autocast does not cast its
    # inputs) takes one half dtype, so flora_varlen casts them to autocast's.
    model.float()
    rows32 = rows.detach().float().requires_grad_()
    dtypes = []

    def typed(q, k, v, *args, **kw):
        dtypes.append((q.dtype, k.dtype, v.dtype))
        return stand_in(q, k, v, *args, **kw)

    monkeypatch.setattr(packed_attention, "torch_varlen", lambda: typed)
    model.set_attn_implementation("flora_varlen")
    index = batch.token_index(torch.tensor([0, 1, 1, 0]))
    with torch.autocast("cpu", dtype=torch.bfloat16), slot.activate(rows32, index):
        half = batch_target_logits(model, batch).logits
    assert dtypes == [(torch.bfloat16,) * 3] * 2, dtypes
    # bf16 rounds each matmul's inputs to 2^-8 relative; activations are of order 1 after each norm,
    # so two layers move these logits (|x| < 0.3) by a few 2^-8 at most (measured: 0.0013).
    torch.testing.assert_close(half.double(), packed[0], rtol=0, atol=4 * 2**-8)


def test_a_packed_row_keeps_examples_apart_and_restarts_positions():
    batch = pack([(np.array([5, 6, 7]), np.array([5, 6, 7])), (np.array([8, 9]), np.array([-100, 9]))])
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert batch.example.tolist() == [[0, 0, 0, 1, 1]]
    # The first token of each example is never a target: no example learns from the one before it.
    assert batch.labels.tolist() == [[-100, 6, 7, -100, 9]]
    assert batch.cu_seqlens.tolist() == [0, 3, 5] and batch.max_seqlen == 3
    assert batch.real_tokens == batch.computed_tokens == 5
    assert batch.token_index(torch.tensor([4, 2])).tolist() == [[4, 4, 4, 2, 2]]
    assert example_lengths(batch.cu_seqlens) == [3, 2]


@pytest.mark.parametrize("attention", ["flora_packed", "flash_attention_2"])
def test_a_packed_forward_builds_no_mask(attention):
    """Both attentions that read a packed row's bounds get no mask: transformers builds none from
    the ones the packed forward passes (flash-attention then takes its varlen path over the bounds,
    which needs a GPU to run; its mask decision is transformers' code and runs here). Without them
    it would build a [tokens, tokens] block-diagonal mask from the restarting positions."""
    from transformers.masking_utils import create_causal_mask

    model = _model("llama", 0)
    use_packed_attention(model, torch.device("cpu"), half_precision=False)  # registers flora_packed
    model.config._attn_implementation = attention
    batch = pack([(np.arange(5), np.arange(5)), (np.arange(3), np.arange(3))])
    embeds = model.get_input_embeddings()(batch.input_ids)
    ones = torch.ones_like(batch.input_ids)
    assert create_causal_mask(model.config, embeds, ones, None, position_ids=batch.position_ids) is None
    if attention == "flora_packed":  # the trap it avoids: no mask, and the positions make one
        mask = create_causal_mask(model.config, embeds, None, None, position_ids=batch.position_ids)
        assert mask is not None and not bool(mask[0, 0, 5, 4])  # example 2 cannot see example 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=60), st.integers(40, 160), st.one_of(st.none(), st.integers(1, 9)),
       st.booleans(), st.integers(1, 3))
def test_micro_batches_hold_every_example_once_under_the_budget(lengths, budget, cap, packing, world):
    pairs = [(f"u{k % 5}", k) for k in range(len(lengths))]
    lengths = np.array(lengths)
    batching = MicroBatching(cap, budget, packing)
    owners = {f"u{k}": k % world for k in range(5)}
    work = partition_step(pairs, world, "owner", owners, batching, lengths)
    assert len({len(w.micro_batches) for w in work}) == 1, "every rank runs the same number of micro-batches"
    seen = [p for w in work for p in w.pairs]
    assert sorted(seen) == sorted(pairs)
    for rank, w in enumerate(work):
        assert all(owners[u] == rank for u, _ in w.pairs)
        for mb in w.micro_batches:
            if not mb:
                continue
            sizes = [int(lengths[i]) for _, i in mb]
            computed = sum(sizes) if packing else len(mb) * max(sizes)
            assert computed <= budget and (cap is None or len(mb) <= cap)
            if packing:  # a row's examples in plan order
                assert [i for _, i in mb] == sorted(i for _, i in mb)
        real = sum(int(lengths[i]) for _, i in w.pairs)
        used = [mb for mb in w.micro_batches if mb]
        # Grouped by length: each micro-batch's examples are no shorter than the next one's.
        if not packing and used:
            for a, b in zip(used, used[1:]):
                assert min(int(lengths[i]) for _, i in a) >= max(int(lengths[i]) for _, i in b)
        assert real <= sum(budget for _ in used)
    again = partition_step(pairs, world, "owner", owners, batching, lengths)
    assert again == work, "a pure function of the step and the lengths"


def test_count_micro_batches_are_as_before():
    pairs = [("a", 0), ("a", 1), ("b", 2), ("b", 3), ("c", 4)]
    work = partition_step(pairs, 1, "owner", {"a": 0, "b": 0, "c": 0}, 2)
    assert work[0].micro_batches == ((("a", 0), ("a", 1)), (("b", 2), ("b", 3)), (("c", 4),))


def test_a_token_budget_needs_lengths_and_a_size():
    with pytest.raises(ValueError, match="lengths"):
        partition_step([("a", 0)], 1, "owner", {"a": 0}, MicroBatching(None, 64))
    with pytest.raises(ValueError, match="size"):
        MicroBatching(None, None)
    with pytest.raises(ValueError, match="packing"):
        MicroBatching(8, None, True)

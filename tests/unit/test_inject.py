"""inject_adapters on Hugging Face causal LMs (Llama, GPT-2), an encoder-decoder (T5) and plain torch."""

import pytest
import torch
from torch import nn

from flora_train.adapters import AdaptedLinear, AdapterSpec, inject_adapters, match_target_modules
from flora_train.base import load_frozen_model


def _random_rows(layout, users, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    init = layout.init_rows(torch.arange(users, dtype=torch.int64))
    return init + scale * torch.randn(init.shape, generator=g)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_base_unchanged(model, before):
    after = {k.replace("base_layer.", ""): v for k, v in model.state_dict().items()}
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def _per_example_equals_alone(model, slot, layout, inputs, users=3):
    """Each example's output with a mixed batch equals running that example alone on its adapter."""
    rows = _random_rows(layout, users).double()
    batch = inputs["input_ids"].shape[0]
    index = torch.arange(batch) % users
    with slot.activate(rows, index):
        mixed = model(**inputs).logits
    for i in range(batch):
        single = {k: v[i : i + 1] for k, v in inputs.items()}
        with slot.activate(rows[index[i] : index[i] + 1], torch.zeros(1, dtype=torch.long)):
            alone = model(**single).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-9, atol=1e-9)
    return mixed


@pytest.mark.parametrize("method", ["flora", "lora", "ia3"])
def test_llama_identity_at_init_and_per_example(tiny_llama_dir, method):
    model = load_frozen_model(str(tiny_llama_dir)).double()
    before = _snapshot(model)
    ids = torch.randint(3, 100, (4, 7))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    base_logits = model(**inputs).logits
    slot, layout = inject_adapters(model, AdapterSpec(method=method, rank=2), ["q_proj", "v_proj", "down_proj"])
    assert len(layout.modules) == 2 * 3
    assert all(not p.requires_grad for p in model.parameters())
    init = layout.init_rows(torch.arange(4, dtype=torch.int64)).double()
    with slot.activate(init, torch.arange(4)):
        torch.testing.assert_close(model(**inputs).logits, base_logits, rtol=1e-9, atol=1e-9)
    mixed = _per_example_equals_alone(model, slot, layout, inputs)
    assert not torch.allclose(mixed, base_logits), "trained-looking adapters must change the output"
    _assert_base_unchanged(model, before)


def test_gradients_reach_rows_only(tiny_llama_dir):
    model = load_frozen_model(str(tiny_llama_dir))
    slot, layout = inject_adapters(model, AdapterSpec("flora", 1), "all-linear")
    assert "lm_head" not in {m for m, _, _ in layout.modules}
    rows = layout.init_rows(torch.arange(2, dtype=torch.int64)).requires_grad_()
    ids = torch.randint(3, 100, (2, 5))
    with slot.activate(rows, torch.tensor([0, 1])):
        model(input_ids=ids).logits.sum().backward()
    assert rows.grad is not None and rows.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_gpt2_conv1d(tiny_gpt2_dir):
    model = load_frozen_model(str(tiny_gpt2_dir)).double()
    before = _snapshot(model)
    names = match_target_modules(model, ["c_attn", "c_proj", "c_fc"])
    assert any(n.endswith("mlp.c_proj") for n in names) and any(n.endswith("attn.c_proj") for n in names)
    slot, layout = inject_adapters(model, AdapterSpec("lora", 4), ["c_attn", "c_proj", "c_fc"])
    ids = torch.randint(3, 100, (3, 6))
    _per_example_equals_alone(model, slot, layout, {"input_ids": ids})
    _assert_base_unchanged(model, before)


def test_t5_encoder_decoder():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, dropout_rate=0.0)
    ).double().eval()
    slot, layout = inject_adapters(model, AdapterSpec("flora", 2), ["q", "k", "v", "o", "wi", "wo"])
    assert any("encoder" in m for m, _, _ in layout.modules) and any("EncDecAttention" in m for m, _, _ in layout.modules)
    inputs = {"input_ids": torch.randint(0, 64, (3, 5)), "decoder_input_ids": torch.randint(0, 64, (3, 4))}
    _per_example_equals_alone(model, slot, layout, inputs)


def test_plain_module_and_2d_inputs():
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=r"adapter.feedforward_modules: ia3 needs the feed-forward output layers"):
        inject_adapters(net, AdapterSpec("ia3"), r"\d")  # a plain module has no architecture to look up
    slot, layout = inject_adapters(net, AdapterSpec("ia3", feedforward_modules=("2",)), r"\d")
    assert set(layout.slices["0"]) == {"a"} and set(layout.slices["2"]) == {"b"}
    assert isinstance(net[0], AdaptedLinear) and isinstance(net[2], AdaptedLinear)
    x = torch.randn(4, 6, dtype=torch.float64)
    rows = _random_rows(layout, 2).double()
    index = torch.tensor([0, 1, 1, 0])
    with slot.activate(rows, index):
        y = net(x)
    assert y.shape == (4, 3)
    for i in range(4):
        with slot.activate(rows[index[i] : index[i] + 1], torch.zeros(1, dtype=torch.long)):
            torch.testing.assert_close(net(x[i : i + 1]), y[i : i + 1])
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p, b) and not p.requires_grad


def test_no_match_and_double_injection_are_errors():
    net = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="matched no linear layer"):
        inject_adapters(net, AdapterSpec(), ["q_proj"])
    inject_adapters(net, AdapterSpec(), ["0"])
    with pytest.raises(ValueError, match="already"):
        inject_adapters(net, AdapterSpec(), ["0"])


def test_targets_that_name_nothing_or_the_output_head_are_refused(tiny_llama_dir):
    """[q_proj, v_porj] adapted q_proj alone without a word; lm_head (or a regex reaching it) was
    injected and the first step ended in a traceback (the loss runs the head on the scored tokens of
    all users at once); an IA3 feed-forward layer outside the targets scaled nothing."""
    from flora_train.adapters.inject import TargetModulesError, check_feedforward

    for targets, message in [
        (["q_proj", "v_porj"], "adapter.target_modules: 'v_porj' matched no linear layer of this model; its linear "
                               "layers end in ['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj',"),
        (["q_proj", "lm_head"], "adapter.target_modules selects the output head (lm_head), which is not adapted per user"),
        (".*", "adapter.target_modules selects the output head (lm_head)"),
    ]:
        with pytest.raises(TargetModulesError) as error:
            inject_adapters(load_frozen_model(str(tiny_llama_dir)), AdapterSpec("lora", 2), targets)
        assert str(error.value).startswith(message), str(error.value)
    ia3 = AdapterSpec("ia3", feedforward_modules=("down_proj",))
    with pytest.raises(TargetModulesError, match=r"adapter.feedforward_modules: 'down_proj' is no adapted layer"):
        check_feedforward(load_frozen_model(str(tiny_llama_dir)), ia3, ["q_proj", "v_proj"], "adapter")
    # A trained layout records PEFT's whole list, down_proj too, for a run that adapts q and v: it loads.
    inject_adapters(load_frozen_model(str(tiny_llama_dir)), ia3, ["q_proj", "v_proj"])
    model = load_frozen_model(str(tiny_llama_dir))  # what PEFT's all-linear takes: every linear layer but the head
    _, layout = inject_adapters(model, AdapterSpec("lora", 2), "all-linear")
    assert "lm_head" not in layout.slices and len(layout.slices) == 7 * model.config.num_hidden_layers


def test_batch_mismatch_is_reported():
    net = nn.Sequential(nn.Linear(2, 2))
    slot, layout = inject_adapters(net, AdapterSpec(), ["0"])
    rows = layout.init_rows(torch.zeros(1, dtype=torch.int64))
    with slot.activate(rows, torch.zeros(3, dtype=torch.long)), pytest.raises(RuntimeError, match="adapter index"):
        net(torch.randn(2, 2))


def test_forward_outside_activate_is_an_error_unless_base_only():
    """Before, a forward that forgot ``slot.activate`` silently ran the plain base."""
    net = nn.Sequential(nn.Linear(3, 4)).double()
    want = net(torch.ones(2, 3, dtype=torch.float64))
    slot, _ = inject_adapters(net, AdapterSpec(), ["0"])
    with pytest.raises(RuntimeError, match=r"0: forward outside AdapterSlot.activate"):
        net(torch.ones(2, 3, dtype=torch.float64))
    with slot.base_only():
        assert torch.equal(net(torch.ones(2, 3, dtype=torch.float64)), want)

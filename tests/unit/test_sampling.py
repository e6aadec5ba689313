"""The server's token choice: OpenAI's penalties and logit_bias against their definition, and
sample_rows' greedy, top-k, top-p and per-row generators (a row's token never depends on the rows
batched with it)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flora_train.inference import GenerationSettings
from flora_train.inference.openai_api import logit_bias_of
from flora_train.inference.sampling import new_generator, penalised, sample_rows

VOCAB = 12


@settings(max_examples=60, deadline=None)
@given(logits=st.lists(st.floats(-20, 20), min_size=VOCAB, max_size=VOCAB),
       generated=st.lists(st.integers(0, VOCAB - 1), max_size=10),
       presence=st.floats(-2, 2), frequency=st.floats(-2, 2),
       bias=st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-100, 100), max_size=4))
def test_penalties_and_bias_are_openais_definition(logits, generated, presence, frequency, bias):
    x = torch.tensor(logits, dtype=torch.float64)
    got = penalised(x, generated, presence, frequency, tuple(sorted(bias.items())))
    for t in range(VOCAB):
        count = generated.count(t)
        want = logits[t] - presence * (count > 0) - frequency * count + bias.get(t, 0.0)
        # float64, terms of at most 142 summed in another order: a few ulps (2.8e-14 each) apart
        assert got[t].item() == pytest.approx(want, abs=1e-12), t
    assert torch.equal(x, torch.tensor(logits, dtype=torch.float64)), "the model's logits are left as they were"


def test_greedy_top_k_1_and_a_tiny_top_p_take_the_best_token():
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1).tolist()
    gens = [new_generator(i, torch.device("cpu")) for i in range(5)]
    assert sample_rows(logits, [0.0] * 5, [0] * 5, [1.0] * 5, gens) == best
    assert sample_rows(logits, [1.5] * 5, [1] * 5, [1.0] * 5, gens) == best
    assert sample_rows(logits, [1.5] * 5, [0] * 5, [1e-6] * 5, gens) == best


def test_a_rows_draw_is_its_own_whatever_is_batched_with_it():
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(1))
    temps, ks, ps = [0.7, 1.0, 0.0, 1.3, 1.0, 0.9], [0, 5, 0, 3, 0, 0], [1.0, 0.9, 1.0, 1.0, 0.5, 0.8]
    batched = sample_rows(logits, temps, ks, ps, [new_generator(100 + i, torch.device("cpu")) for i in range(6)])
    for i in range(6):
        alone = sample_rows(logits[i : i + 1], temps[i : i + 1], ks[i : i + 1], ps[i : i + 1],
                            [new_generator(100 + i, torch.device("cpu"))])
        assert alone == [batched[i]], i


def test_top_k_and_top_p_draw_only_inside_their_sets():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    probs = logits.softmax(-1)[0]
    gen = new_generator(7, torch.device("cpu"))
    drawn_k = {sample_rows(logits, [1.0], [3], [1.0], [gen])[0] for _ in range(300)}
    assert drawn_k == {0, 1, 2}  # the three best, each drawn in 300 tries
    p = float(probs[0] + probs[1]) - 1e-6  # the first two tokens' mass just reaches p: the second crosses it
    drawn_p = {sample_rows(logits, [1.0], [0], [p], [gen])[0] for _ in range(300)}
    assert drawn_p == {0, 1}


def test_logit_bias_is_checked_by_name():
    assert logit_bias_of({"7": 5.0, "2": -100}, VOCAB) == ((2, -100.0), (7, 5.0))
    for key in ("abc", "12", "-1", "1.5"):
        with pytest.raises(ValueError, match=rf"logit_bias: key '{key}' is not a token id of this model \(0..11\)"):
            logit_bias_of({key: 1.0}, VOCAB)
    with pytest.raises(ValueError, match="biases in"):
        GenerationSettings(logit_bias=((3, 150.0),))

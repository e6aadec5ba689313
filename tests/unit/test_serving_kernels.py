"""Serving never times kernels on a live request: the engine's shapes are measured at start-up,
then the tuner is frozen and an unseen shape takes its nearest measured neighbour's kernel."""

import torch

from flora_train.adapters import AdapterSpec, inject_adapters, user_seed
from flora_train.adapters.functional import kernels_for
from flora_train.adapters.tuning import KernelKey, KernelTuner
from flora_train.base import load_frozen_model
from flora_train.inference.kernels import serving_shapes, tune_for_serving


def test_start_up_measures_the_engines_shapes_and_requests_measure_nothing(tiny_llama_dir, monkeypatch):
    import threading

    from flora_train.adapters import tuning

    # Timed off the main thread, as the engine runs the kernels (a second OpenMP team makes each
    # operator there wait for a wake-up): measured on the main thread they were chosen for other costs.
    where, real = set(), tuning.time_kernel
    monkeypatch.setattr(tuning, "time_kernel",
                        lambda *a, **k: where.add(threading.current_thread().name) or real(*a, **k))
    model = load_frozen_model(str(tiny_llama_dir))
    slot, layout = inject_adapters(model, AdapterSpec("lora", 4, kernel="auto"), ["q_proj", "v_proj", "down_proj"])
    shapes = serving_shapes(max_batch=4, prefill_tokens=16)
    assert (4, 4, 1) in shapes and (1, 1, 16) in shapes and (4, 2, 4) in shapes  # decode, and prefill of 16 // b tokens
    report = tune_for_serving(model, slot, max_batch=4, prefill_tokens=16, autocast_dtype=None)
    distinct_layers = len({(m.weight.shape, m.bias is None) for m in model.modules() if hasattr(m, "adapter_name")})
    assert report["measured"] == distinct_layers * len(shapes) and slot.tuner.frozen
    assert where and all(name.startswith("flora-kernel-tuner") for name in where), where
    measured = dict(slot.tuner.timings)
    rows = layout.init_rows(torch.tensor([user_seed(0, u) for u in "ab"], dtype=torch.int64))
    # 3 sequences of 5 tokens, two of one user: a shape bucket start-up did not measure.
    with torch.no_grad(), slot.activate(rows, torch.tensor([0, 0, 1])):
        model(input_ids=torch.ones(3, 5, dtype=torch.long))
    assert slot.tuner.timings == measured  # nothing was timed on the request
    assert slot.tuner.unmeasured and set(slot.tuner.unmeasured.values()) <= set(kernels_for("lora", 4))


def test_a_frozen_tuner_answers_from_the_nearest_measured_shape():
    tuner = KernelTuner()

    def key(batch, users, tokens):
        return KernelKey("lora", 4, 8, 8, batch, users, tokens, "float32", "cpu", False)

    for (b, u, t), choice in {(1, 1, 1): "first", (16, 16, 1): "second"}.items():
        tuner.choices[key(b, u, t).text()], tuner._keys[key(b, u, t).text()] = choice, key(b, u, t)
    tuner.freeze()
    candidates = ("first", "second", "third")
    assert tuner._nearest(key(8, 8, 1), candidates) == "second" and tuner._nearest(key(2, 1, 1), candidates) == "first"
    assert tuner._nearest(KernelKey("lora", 4, 8, 16, 2, 1, 1, "float32", "cpu", False), candidates) == "first"  # no neighbour

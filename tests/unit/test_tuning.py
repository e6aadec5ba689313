"""adapter.kernel=auto: the fastest measured kernel is kept, once per shape bucket, and persisted."""

import time

import pytest
import torch

from flora_train.adapters import AdapterSpec, inject_adapters
from flora_train.adapters import tuning
from flora_train.adapters.functional import kernels_for
from flora_train.adapters.tuning import KernelTuner, bucket
from flora_train.errors import UserError


def test_bucket_is_the_next_power_of_two():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 64, 65)] == [1, 2, 4, 4, 8, 64, 128]


def test_the_fastest_kernel_is_chosen_once_per_bucket(monkeypatch, tmp_path):
    fake = {"bmm": 3.0, "segment": 1.0, "loop": 2.0}
    calls = []

    def timed(method, kernel, weight, bias, rank, batch, users, tokens, backward, repeats, scaling, give_up_after):
        calls.append((kernel, batch, users, tokens, backward))
        return fake[kernel]

    monkeypatch.setattr(tuning, "time_kernel", timed)
    path = tmp_path / "kernels" / "rank-0.json"
    tuner = KernelTuner(path)
    w = torch.randn(16, 8)
    assert tuner.choose("lora", 4, w, None, torch.Size([6, 5, 8]), users=3) == "segment"
    assert sorted(c[0] for c in calls) == ["bmm", "loop", "segment"]
    assert {c[1:] for c in calls} == {(8, 4, 8, True)}, "measured at the bucket's shape"
    # Same bucket (batch 7 -> 8, users 4, tokens 7 -> 8): no new measurement.
    assert tuner.choose("lora", 4, w, None, torch.Size([7, 7, 8]), users=4) == "segment"
    assert len(calls) == 3
    # Inference is its own bucket.
    fake.update(bmm=0.5)
    with torch.no_grad():
        assert tuner.choose("lora", 4, w, None, torch.Size([6, 5, 8]), users=3) == "bmm"
    assert len(calls) == 6 and calls[-1][-1] is False
    # Persisted as made; a resumed process reads the choices back and measures nothing.
    calls.clear()
    again = KernelTuner(path)
    assert again.choose("lora", 4, w, None, torch.Size([6, 5, 8]), users=3) == "segment"
    assert calls == [] and not again.timings
    # Torn (a disk fault): named, a user's error (one line from the CLI), not json's traceback.
    path.write_text('{"lora')
    with pytest.raises(UserError, match=r"rank-0.json: not a kernel choice file .*delete it to measure again"):
        KernelTuner(path)


def test_a_rank_that_leaves_one_kernel_is_never_measured(monkeypatch):
    monkeypatch.setattr(tuning, "time_kernel", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setattr(tuning, "kernels_for", lambda method, rank: ("stacked",))
    assert KernelTuner().choose("flora", 1, torch.randn(4, 4), None, torch.Size([2, 3, 4]), 2) == "stacked"
    # At rank 1 FLoRA's stacked kernel is its rankwise one; the segment kernels scale runs of users.
    assert kernels_for("flora", 1) == ("stacked", "segment") and kernels_for("ia3", 1) == ("fused", "segment")
    assert kernels_for("flora", 4) == ("stacked", "rankwise", "segment")


def test_kernels_are_measured_on_the_training_thread_and_leave_the_random_state(monkeypatch):
    """Measured on a thread of their own, kernels of many small operators took 2.3x their time on
    the training thread (a second OpenMP team stops libgomp spinning), and the auto choice at
    packed shapes was the slower kernel. The measurement also drew from the global generator,
    which a checkpointed recomputation replays."""
    import threading

    seen = []
    real = tuning.time_kernel
    monkeypatch.setattr(tuning, "time_kernel", lambda *a, **k: seen.append(threading.get_ident()) or real(*a, **k))
    weight = torch.randn(8, 8)
    state = torch.random.get_rng_state()
    KernelTuner(repeats=1).choose("flora", 1, weight, None, torch.Size([16, 1, 8]), 4)
    assert seen and set(seen) == {threading.get_ident()}
    assert torch.equal(torch.random.get_rng_state(), state)


def test_real_measurement_picks_a_kernel_of_the_method():
    tuner = KernelTuner(repeats=1)
    w = torch.randn(32, 16)
    chosen = tuner.choose("flora", 4, w, None, torch.Size([4, 3, 16]), users=4)
    (timings,) = tuner.timings.values()
    assert chosen in timings and set(timings) == {"stacked", "rankwise", "segment"}
    assert chosen == min(timings, key=timings.get) and all(t > 0 for t in timings.values())


def test_a_corrupt_choice_file_is_named(tmp_path):
    path = tmp_path / "rank-0.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="rank-0.json: not a kernel choice file"):
        KernelTuner(path)


def test_auto_layers_compute_what_every_fixed_kernel_computes():
    torch.manual_seed(0)
    x = torch.randn(6, 5, 8, dtype=torch.float64)
    index = torch.tensor([0, 0, 1, 2, 2, 2])
    outs = {}
    for kernel in ("auto", "bmm", "segment", "loop"):
        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Linear(12, 8)).double()
        slot, layout = inject_adapters(net, AdapterSpec("lora", 2, kernel=kernel), ["0", "1"])
        rows = torch.randn(3, layout.row_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        with slot.activate(rows, index):
            outs[kernel] = net(x)
    for kernel in ("bmm", "segment", "loop"):
        torch.testing.assert_close(outs["auto"], outs[kernel], rtol=1e-12, atol=1e-12)


def test_a_kernel_of_another_method_is_refused():
    with pytest.raises(ValueError, match="adapter.kernel: bmm does not compute flora"):
        AdapterSpec("flora", 2, kernel="bmm")


def test_measuring_inside_a_checkpointed_forward_leaves_no_trace():
    """The first forward measures; the checkpointed recomputation must find the same saved tensors."""
    x = torch.randn(6, 5, 8, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 0, 1, 2, 2, 2])
    grads = {}
    for kernel in ("auto", "bmm"):
        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Linear(12, 8)).double()
        slot, layout = inject_adapters(net, AdapterSpec("lora", 2, kernel=kernel), ["0", "1"])
        rows = torch.randn(3, layout.row_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        rows.requires_grad_(True)
        with slot.activate(rows, index):
            y = torch.utils.checkpoint.checkpoint(net, x, use_reentrant=False)
            y.square().sum().backward()
        grads[kernel] = rows.grad
        if kernel == "auto":
            assert len(slot.tuner.timings) == 2, "both layers' shapes were measured during the forward"
    torch.testing.assert_close(grads["auto"], grads["bmm"], rtol=1e-10, atol=1e-10)


def test_uniform_user_blocks_skip_the_gather_and_compute_the_same():
    """Users 0,0,1,1,2,2 (the planner's packing): rows are used as they are, no per-example gather."""
    x = torch.randn(6, 5, 8, dtype=torch.float64)
    grouped = torch.tensor([0, 0, 1, 1, 2, 2])
    order = {"grouped": torch.arange(6), "spread": torch.tensor([0, 5, 1, 2, 3, 4])}
    for method, kernel in (("lora", "segment"), ("flora", "rankwise"), ("ia3", "fused")):
        results = {}
        for name, perm in order.items():
            index = grouped[perm]
            torch.manual_seed(1)
            net = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Linear(12, 8)).double()
            slot, layout = inject_adapters(net, AdapterSpec(method, 2, kernel=kernel, feedforward_modules=("1",)), ["0", "1"])
            rows = torch.randn(3, layout.row_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
            rows.requires_grad_(True)
            inputs = x[perm]  # the spread batch: the same (example, user) pairs in another order
            with slot.activate(rows, index):
                assert (slot.block == 2) == (name == "grouped")
                y = net(inputs)
                y.square().sum().backward()
            results[name] = (y[torch.argsort(perm)], rows.grad)
        for got, want in zip(results["grouped"], results["spread"]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_kernel_far_behind_is_not_timed_to_the_end():
    from flora_train.adapters.tuning import median_seconds

    runs = []

    def slow():
        runs.append(1)
        time.sleep(0.02)

    assert median_seconds(slow, torch.device("cpu"), repeats=3, give_up_after=0.005) >= 0.02
    assert len(runs) == 1, "a warm-up slower than the limit ends the measurement"
    runs.clear()
    median_seconds(slow, torch.device("cpu"), repeats=3)
    assert len(runs) == 4


def test_later_candidates_are_cut_off_at_three_times_the_best(monkeypatch):
    limits = {}

    def timed(method, kernel, weight, bias, rank, batch, users, tokens, backward, repeats, scaling, give_up_after):
        limits[kernel] = give_up_after
        return {"bmm": 2.0, "segment": 1.0, "loop": 5.0}[kernel]

    monkeypatch.setattr(tuning, "time_kernel", timed)
    KernelTuner().choose("lora", 4, torch.randn(16, 8), None, torch.Size([6, 5, 8]), users=3)
    assert limits == {"bmm": float("inf"), "segment": 6.0, "loop": 3.0}

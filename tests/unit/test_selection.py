"""Per-user selection in the store (``train.select: best``, ``train.patience``) against a plain
replay of its definition, on every tier; and the per-user validation split."""

import math

import datasets
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flora_train.store import AdapterStore, OptimizerHyper
from flora_train.store.selection import BEST_STEP, STOPPED_AT
from flora_train.data import DataError
from flora_train.data.cache import in_memory
from flora_train.train.data_setup import hold_out_fraction, rejoin_validation

ROW = 5


def _reference(history: list[tuple[int, torch.Tensor, float]], patience: int | None):
    """(kept row, its step, stopped after) from the definition: the first validation's row, then any
    strictly lower finite loss; stopped once `patience` validations with a loss brought nothing better."""
    kept, step, best, stale, stopped = None, None, math.nan, 0, None
    for k, (at, row, loss) in enumerate(history):
        if k == 0 or (math.isfinite(loss) and (not math.isfinite(best) or loss < best)):
            if k == 0 or math.isfinite(loss):
                kept, step, best, stale = row, at, loss, 0
        elif math.isfinite(loss):
            stale += 1
        if patience is not None and stopped is None and stale >= patience:
            stopped = at
    return kept, step, stopped


losses = st.one_of(st.just(math.nan), st.floats(0.5, 3.0, width=32))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(losses, min_size=3, max_size=3), min_size=1, max_size=7), st.sampled_from([None, 1, 2, 3]),
       st.sampled_from(["host", "disk", "cache"]), st.integers(0, 1000), st.sampled_from(["best", "last"]))
def test_validations_keep_each_users_best_row_and_stop_it(tmp_path_factory, rounds, patience, tier, seed, select):
    """Under ``train.select: last`` (patience alone) the same users stop, and each is served its last
    row: it served the kept (best) row before, against what ``select: last`` says."""
    users = ["a", "b", "c"]
    g = torch.Generator().manual_seed(seed)
    store = AdapterStore(ROW, lambda ids: torch.ones(len(ids), ROW), OptimizerHyper(), "disk" if tier == "disk" else "host",
                         directory=tmp_path_factory.mktemp("t") if tier == "disk" else None,
                         cache_rows=3 if tier == "cache" else 0, select=select)
    store.add_users(users)
    history: dict[str, list] = {u: [] for u in users}
    for k, round_losses in enumerate(rounds):
        rows = torch.randn(3, ROW, generator=g)
        store.write(users, rows)  # a step changed them
        step = 10 * k
        store.validated(users, torch.tensor(round_losses), step, patience)
        for i, u in enumerate(users):
            history[u].append((step, rows[i].clone(), float(torch.tensor(round_losses[i]))))
    served = store.read(users, served=True)
    state = store.state_tensors()
    for i, u in enumerate(users):
        kept, step, stopped = _reference(history[u], patience)
        assert torch.equal(served[i], kept if select == "best" else rows[i]), (u, history[u])
        assert int(state[BEST_STEP][i]) == step
        assert int(state[STOPPED_AT][i]) == (0 if stopped is None else stopped + 1)
    assert sorted(store.stopped()) == sorted(u for u in users if _reference(history[u], patience)[2] is not None)
    assert torch.equal(store.read(users), rows)  # training reads its own row, never the kept one


def test_a_user_never_validated_is_served_its_row():
    store = AdapterStore(ROW, lambda ids: torch.full((len(ids), ROW), 2.0), OptimizerHyper(), select="best")
    store.add_users(["x"])
    assert torch.equal(store.read(["x"], served=True), torch.full((1, ROW), 2.0))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=6), st.floats(0.05, 0.6), st.integers(0, 99))
def test_validation_split_per_user(counts, fraction, seed):
    users = [f"u{k}" for k, n in enumerate(counts) for _ in range(n)]
    train, held = hold_out_fraction(users, fraction, seed)
    assert sorted(train + held) == list(range(len(users)))
    for k, n in enumerate(counts):
        mine = sum(users[i] == f"u{k}" for i in held)
        want = int(n * fraction)
        assert mine == (want if 0 < want < n else 0)
    # A user's draw does not depend on the other users.
    alone = ["u0"] * counts[0]
    _, held_alone = hold_out_fraction(alone, fraction, seed)
    assert held_alone == [i for i in held if users[i] == "u0"]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=5), st.floats(0.05, 0.6), st.integers(0, 99), st.randoms())
def test_the_shared_adapter_gets_the_validation_split_back_in_its_original_order(counts, fraction, seed, rnd):
    """``rejoin_validation`` undoes ``hold_out_fraction``: each user's examples in the order the
    unsplit data had them (what makes the shared phase's plan the one a run without selection makes)."""
    users = [f"u{k}" for k, n in enumerate(counts) for _ in range(n)]
    rnd.shuffle(users)  # users interleaved, as rows of a real file are
    table = datasets.Dataset.from_dict({"user_id": users, "source": ["train"] * len(users),
                                        "input_ids": [[i, i + 1] for i in range(len(users))],
                                        "labels": [[i, i + 1] for i in range(len(users))]})
    keep, held = hold_out_fraction(users, fraction, seed)
    train, validation = in_memory(table.select(keep)), in_memory(table.select(held))
    joined, by_user = rejoin_validation(train, validation, fraction, seed)
    for u in set(users):
        assert [int(joined.input_ids(i)[0]) for i in by_user[u]] == [i for i, v in enumerate(users) if v == u]
    if held:  # a cache written with another fraction is named, not silently misread
        with pytest.raises(DataError, match="validation examples"):
            rejoin_validation(train, validation, fraction / 10 if fraction > 0.1 else 0.9, seed)


@pytest.mark.parametrize("select, sweep, joint", [("best", [], False), ("best", [0.1, 0.2], False), ("last", [], False),
                                                 ("best", [], True)])
def test_a_user_without_validation_examples_takes_no_step_when_it_keeps_its_identity_row(select, sweep, joint,
                                                                                          caplog):
    """Under select: best a user with no validation example keeps its identity row: its steps (each
    variant's, under a sweep) were computed and thrown away. Under last it trains to the end; with
    a joint shared adapter its steps train that adapter, and stay. The warning says which (in the
    joint mode it said they train to the end, as under last)."""
    from types import SimpleNamespace

    from flora_train.data.planner import StepPlan
    from flora_train.train.selection import Validator
    from flora_train.train.sweep import variant

    train = SimpleNamespace(select=SimpleNamespace(value=select), patience=None if select == "best" else 2,
                            validate_every_steps=0, epochs=1, shared_phase=SimpleNamespace(value="joint"))
    adapter = SimpleNamespace(shared=SimpleNamespace(method="lora") if joint else None)
    names = [variant(u, k) for u in "abc" for k in range(len(sweep))] if sweep else list("abc")
    planner = SimpleNamespace(epoch_lengths=lambda epochs: [4], user_examples={n: [0] for n in names})
    session = SimpleNamespace(cfg=SimpleNamespace(train=train, adapter=adapter), users=lambda: ["a", "b", "c"],
                              validation=SimpleNamespace(users=lambda: ["a", "c"]),
                              phase_plan=SimpleNamespace(phase=SimpleNamespace(start_step=0, index=0), planner=planner))
    plan = StepPlan(0, 0, tuple((n, (i,)) for i, n in enumerate(names)))
    with caplog.at_level("WARNING", logger="flora_train"):
        training = Validator(session).training(plan)
    fate = {"last": "train to the end", "best": "keep the identity row (the shared adapter, or the base)"}[select]
    fate += "; their steps train the shared adapter" if joint else " and take no step" if select == "best" else ""
    assert f"1 user(s) have too few examples to spare one for validation and {fate}" in caplog.text
    assert "'b'" in caplog.text
    trained = sorted({n.split("@")[0] for n in training.user_ids})
    left_out = select == "best" and not joint
    assert trained == (["a", "c"] if left_out else ["a", "b", "c"])
    only_b = StepPlan(1, 0, tuple(g for g in plan.groups if g[0].startswith("b")))
    assert (Validator(session).training(only_b) is None) == left_out

"""Rows checked with file:line errors, completion-only labels, the planner, the synthetic task
(each file format's reading: test_data_formats.py)."""

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flora_train.data import IGNORE, BadRows, BatchPlanner, Columns, DataError, SyntheticTask, load_examples, tokenize_examples
from tests.unit.data_helpers import GOOD, write_jsonl


BAD_LINES = [
        ('{"user_id": "a", "prompt": "x"', "malformed"),
        (json.dumps({"prompt": "x", "completion": "y"}), "missing_user"),
        (json.dumps({"user_id": "", "prompt": "x", "completion": "y"}), "missing_user"),
        (json.dumps({"user_id": "a", "prompt": "x", "completion": "  "}), "empty_completion"),
        (json.dumps({"user_id": "a", "prompt": "x", "completion": 3}), "wrong_type_completion"),
        (json.dumps({"user_id": "a", "prompt": "x"}), "missing_completion"),
        (json.dumps({"user_id": "a", "prompt": "x", "completion": None}), "missing_completion"),
        (json.dumps(["not", "an", "object"]), "not_an_object"),
        (json.dumps({"user_id": "a\u0000b", "prompt": "x", "completion": "y"}), "invalid_user"),
        # Before, these were users no --users list could name (one id per line), so never forgettable.
        (json.dumps({"user_id": "new\nline", "prompt": "x", "completion": "y"}), "invalid_user"),
        (json.dumps({"user_id": "car\rriage", "prompt": "x", "completion": "y"}), "invalid_user"),
        (json.dumps({"user_id": "tab\tbed", "prompt": "x", "completion": "y"}), "invalid_user"),
        (json.dumps({"user_id": "del\u007f", "prompt": "x", "completion": "y"}), "invalid_user"),
        # Before, an integer id was turned into "42" silently, merging it with the string id "42".
        (json.dumps({"user_id": 42, "prompt": "x", "completion": "y"}), "wrong_type_user"),
        (json.dumps({"user_id": 4.0, "prompt": "x", "completion": "y"}), "wrong_type_user"),
        # Half a UTF-16 pair, as JSON may escape it: a UnicodeEncodeError traceback from Arrow before.
        (json.dumps({"user_id": "a", "prompt": "x\ud800", "completion": "y"}), "lone_surrogate"),
        (json.dumps({"user_id": "b\udfff", "prompt": "x", "completion": "y"}), "lone_surrogate"),
]


@pytest.mark.parametrize("line, reason", BAD_LINES)
def test_bad_rows_name_file_and_line_or_are_counted(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(DataError, match=r"d\.jsonl:3: "):
        load_examples(path, "auto", Columns(), BadRows("error"))
    bad = BadRows("skip")
    ds = load_examples(path, "auto", Columns(), bad)
    assert len(ds) == 2 and bad.counts == {reason: 1} and "d.jsonl:3" in bad.examples[0]


def test_the_bad_rows_of_a_file_are_refused_together(tmp_path):
    """Each bad row stopped the read alone, so a file with several took a try per row to fix. They
    are gathered and named in one error: the first three by file and line, and how many in all."""
    # (Not the rows that name a setting to change instead: an integer user id, a row without the user column.)
    lines = [line for line, reason in BAD_LINES if reason != "wrong_type_user" and ("user_id" in line or "[" in line)]
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, *lines, GOOD])
    with pytest.raises(DataError) as error:
        load_examples(path, "auto", Columns(), BadRows("error"))
    message = str(error.value)
    assert message.startswith(f"{len(lines)} bad rows: {path}:2: malformed JSON"), message
    assert f"; {path}:3: missing or invalid user id column 'user_id' (got '')" in message
    assert f"; {path}:4: user 'a': empty 'completion'" in message
    # The rest by reason (a run that skips them printed three and stopped, as if they were all).
    rest = Counter(reason for line, reason in BAD_LINES if line in lines[3:])
    by_reason = ", ".join(f"{reason.replace('_', ' ')} {n}" for reason, n in sorted(rest.items()))
    assert by_reason.startswith("invalid user 5, lone surrogate 2, missing completion 2, not an object 1"), by_reason
    hint = " (set data.on_bad_row=skip to skip such rows)"
    assert message.endswith(f"; and {len(lines) - 3} more ({by_reason}){hint}"), message
    skipped = BadRows("skip")
    load_examples(path, "auto", Columns(), skipped)
    assert skipped.summary() == message.removesuffix(hint)


def test_a_lone_surrogate_is_named_and_a_file_name_that_is_not_utf8_reads(tmp_path):
    """A file whose name is not UTF-8 (Python reads it with surrogate escapes) ended every read in a
    UnicodeEncodeError traceback: its rows' source could not be stored."""
    import os

    path = write_jsonl(tmp_path / os.fsdecode(b"caf\xe9.jsonl"), [GOOD, json.dumps(
        {"user_id": "a", "prompt": "x", "completion": "y\ud800z"}), GOOD])
    with pytest.raises(DataError) as error:
        load_examples(path, "auto", Columns(), BadRows("error"))
    assert f"{path}:2: user 'a': column 'completion' holds a lone UTF-16 surrogate '\\ud800' at character 1" in str(error.value)
    ds = load_examples(path, "auto", Columns(), BadRows("skip"))
    assert len(ds) == 2 and ds[0]["source"] == f"{tmp_path}/caf\ufffd.jsonl:1"


@pytest.mark.parametrize("row, fix", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "the row's turns are in 'messages': set data.messages_column=messages"),
    ({"text": "some words"}, "the row is plain text: set data.text_column=text"),
    ({"question": "q", "answer": "a"}, "the row's columns are 'answer', 'question': set data.prompt_column and "
     "data.completion_column (or data.text_column) to them"),
    ({"prompt": "x"}, "set data.on_bad_row=skip to skip such rows"),  # a row missing its data: skipping is the way out
])
def test_rows_read_under_the_wrong_columns_name_the_key_to_set(tmp_path, row, fix):
    """Chat rows read as prompt/completion said only 'missing column 'prompt' (set
    data.on_bad_row=skip ...)': skipping would drop every row. The error names the key instead."""
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"user_id": "a", **row})])
    with pytest.raises(DataError) as error:
        load_examples(path, "auto", Columns(), BadRows("error"))
    assert str(error.value).startswith(f"{path}:1: user 'a': missing column '"), str(error.value)
    assert str(error.value).endswith(f"({fix})"), str(error.value)


def test_a_file_whose_user_column_has_another_name_names_the_key(tmp_path):
    """A file keyed by 'user' said only "missing or invalid user id column 'user_id' (got None) (set
    data.on_bad_row=skip ...)": skipping would drop every row. A row that has the column, empty,
    is a bad row (skipping is the way out)."""
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"user": "a", "prompt": "p", "completion": " c"})])
    with pytest.raises(DataError) as error:
        load_examples(path, "auto", Columns(), BadRows("error"))
    assert str(error.value) == (f"{path}:1: missing or invalid user id column 'user_id' (got None) (the row has no "
                                "'user_id' column; its columns are 'completion', 'prompt', 'user': set data.user_column "
                                "to the one naming the user)")
    path = write_jsonl(tmp_path / "e.jsonl", [json.dumps({"user_id": "", "prompt": "p", "completion": " c"})])
    with pytest.raises(DataError, match=r"\(got ''\) \(set data\.on_bad_row=skip to skip such rows\)$"):
        load_examples(path, "auto", Columns(), BadRows("error"))


def test_completion_only_labels_and_too_long(tmp_path, tiny_llama_dir):
    from flora_train.base import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    long = json.dumps({"user_id": "b", "prompt": "hello " * 40, "completion": " red"})
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, long])
    ds = load_examples(path, "auto", Columns(), BadRows())
    kept = r"\(set data.max_length=\d+ to keep it, or data.on_bad_row=skip to skip it\)$"
    with pytest.raises(DataError, match=r"d\.jsonl:2: user 'b': \d+ tokens > data.max_length=16 " + kept):
        tokenize_examples(ds, tok, 16, True, BadRows("error"))
    # Every row too long is counted into one error (the first alone was named: a max_length set past it was
    # refused again by the next longer row), with the length that keeps them, or the base's context.
    rows = [GOOD, long, GOOD, json.dumps({"user_id": "c", "prompt": "hello " * 60, "completion": " x"}), long]
    many = load_examples(write_jsonl(tmp_path / "m.jsonl", rows), "auto", Columns(), BadRows())
    lengths = [len(ids) for ids in tokenize_examples(many, tok, 10_000, True, BadRows())["input_ids"]]
    with pytest.raises(DataError) as refused:
        tokenize_examples(many, tok, 16, True, BadRows("error"))
    assert str(refused.value) == (
        f"{tmp_path / 'm.jsonl'}:2: user 'b': {lengths[1]} tokens > data.max_length=16, and 2 more rows too long, the "
        f"longest {lengths[3]} tokens at {tmp_path / 'm.jsonl'}:4 (set data.max_length={lengths[3]} to keep them, or "
        "data.on_bad_row=skip to skip them)")
    fits = rf"\(set data.max_length={lengths[1]}, the base's context, to keep those that fit it, and data.on_bad_row"
    with pytest.raises(DataError, match=rf"> data.max_length=16, .* {fits}=skip to skip the rest\)$"):
        tokenize_examples(many, tok, 16, True, BadRows("error"), context=lengths[1])
    bad = BadRows("skip")
    out = tokenize_examples(ds, tok, 16, True, bad)
    assert len(out) == 1 and bad.counts == {"too_long": 1}
    ids, labels = out[0]["input_ids"], out[0]["labels"]
    n_prompt = len(tok("hi :")["input_ids"])
    completion = tok(" red", add_special_tokens=False)["input_ids"]
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] == completion + [tok.eos_token_id]


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(st.text(min_size=1, max_size=4), st.integers(1, 9), min_size=1, max_size=12),
    st.integers(1, 5),
    st.integers(1, 4),
    st.integers(0, 3),
)
def test_planner_covers_every_example_once_per_epoch(counts, users_per_step, per_user, seed):
    examples, k = {}, 0
    for u, n in counts.items():
        examples[u] = list(range(k, k + n))
        k += n
    planner = BatchPlanner(examples, users_per_step, per_user, seed)
    for epoch_plans in _by_epoch(planner.steps(epochs=2)):
        seen = [i for p in epoch_plans for _, ex in p.groups for i in ex]
        assert sorted(seen) == list(range(k))
        for p in epoch_plans:
            assert len(p.user_ids) == len(set(p.user_ids)) <= users_per_step
    again = list(BatchPlanner(examples, users_per_step, per_user, seed).steps(epochs=2))
    assert again == list(planner.steps(epochs=2))
    assert list(planner.steps(epochs=2, start=3)) == again[3:]
    # What per-user LR schedules span, counted without planning: each user's steps in the epochs' plan
    # (with or without a cap on its examples per epoch), whatever max_steps cuts off it.
    for cap in (None, 2, 5):
        capped = BatchPlanner(examples, users_per_step, per_user, seed, max_examples_per_user=cap)
        planned: dict[str, int] = {}
        for p in capped.steps(epochs=3):
            for u in p.user_ids:
                planned[u] = planned.get(u, 0) + 1
        assert capped.user_step_counts(3) == planned


def _by_epoch(plans):
    out = {}
    for p in plans:
        out.setdefault(p.epoch, []).append(p)
    return out.values()


def test_user_batches_do_not_depend_on_other_users():
    a = BatchPlanner({"x": range(10), "y": range(10, 20)}, 1, 3, seed=5)
    b = BatchPlanner({"x": range(10), "z": range(30, 90)}, 7, 3, seed=5)

    def batches(planner, user):
        return [dict(p.groups)[user] for p in planner.steps(epochs=2) if user in p.user_ids]

    assert batches(a, "x") == batches(b, "x")


def test_steps_are_heterogeneous_and_micro_batched():
    planner = BatchPlanner({f"u{i}": range(i * 8, i * 8 + 8) for i in range(100)}, 32, 2, seed=0)
    first = next(planner.steps(epochs=1))
    assert len(first.user_ids) == 32 and first.num_examples == 64
    mbs = first.micro_batches(20)
    assert [len(m) for m in mbs] == [20, 20, 20, 4]


def test_synthetic_task_has_hidden_per_user_rules(tmp_path):
    task = SyntheticTask(num_users=200, train_examples_per_user=8, eval_examples_per_user=4, num_keys=2, num_values=4)
    train, evalp = task.write(tmp_path)
    rows = [json.loads(l) for l in train.read_text().splitlines()]
    assert len(rows) == 200 * 8 and len(evalp.read_text().splitlines()) == 200 * 4
    # A user always gives the same answer to the same key ...
    for i in range(5):
        answers = {}
        for r in rows[i * 8 : (i + 1) * 8]:
            answers.setdefault(r["prompt"].split("favourite ")[1], set()).add(r["completion"])
        assert all(len(v) == 1 for v in answers.values())
    # ... while across users every answer is about equally common: the prompt alone says nothing.
    from collections import Counter

    c = Counter(r["completion"] for r in rows if "colour" in r["prompt"])
    assert len(c) == 4 and max(c.values()) / min(c.values()) < 1.5
    assert task.write(tmp_path / "again")[0].read_text() == train.read_text()


def test_skewed_users_are_spread_and_capped():
    """A Zipf population (user k has ~4000/k examples; the first 1,000x the median). Before, the
    power users' chunks were dealt round after round until only they were left: a long tail of
    one-user steps. Now they are spread over the epoch, and the cap bounds the epoch."""
    sizes = {f"u{k:04d}": max(2, 4000 // k) for k in range(1, 1001)}
    sizes["u0001"] = 1000 * sorted(sizes.values())[500]
    start, examples = 0, {}
    for u, n in sizes.items():
        examples[u], start = list(range(start, start + n)), start + n
    assert sizes["u0001"] >= 1000 * sorted(sizes.values())[500]
    plain = BatchPlanner(examples, 64, 2, 0)
    occ = plain.occupancy()
    capped = BatchPlanner(examples, 64, 2, 0, max_examples_per_user=16).occupancy()
    assert capped["occupancy_mean"] > 0.9 and capped["single_user_steps"] == 0.0, capped
    assert occ["single_user_steps"] > 0.5  # 4,000 chunks of one user need 4,000 steps: the cap is the way out
    # Every example still used once per epoch without the cap; with it, each epoch a new window.
    used = sorted(i for groups in plain._epoch(0) for _, c in groups for i in c)
    assert used == list(range(start))
    cap = BatchPlanner(examples, 64, 2, 0, max_examples_per_user=16)
    seen = set()
    for e in range(sizes["u0001"] // 16 + 1):
        seen.update(i for c in cap.user_chunks("u0001", e) for i in c)
    assert seen == set(examples["u0001"]), "over enough epochs every example of a capped user comes round"
    # Fewer users than users_per_step (50 of the quickstart's 256): every step holds all of them, as
    # full as it can be; it was 20% full, and `run` blamed a skew of the data.
    few = BatchPlanner({f"u{k}": range(16 * k, 16 * k + 16) for k in range(50)}, 256, 2, 0).occupancy()
    assert few == {"occupancy_mean": 1.0, "occupancy_min": 1.0, "single_user_steps": 0.0}, few


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(1, 5), st.integers(1, 3), st.integers(0, 3))
def test_retain_examples_join_every_chunk_and_do_not_depend_on_other_users(n_retain, per_chunk, per_user, seed):
    """train.retain: each of a user's chunks gets ``per_chunk`` distinct retain indices (after the
    users' examples), drawn from (seed, epoch, user, chunk) alone: the user's own examples are
    planned as without retain, and other users do not change what a user gets."""
    users = {"x": range(0, 7), "y": range(7, 12)}
    first = 12
    plain = BatchPlanner(users, 2, per_user, seed)
    mixed = BatchPlanner(users, 2, per_user, seed, retain=(first, n_retain, per_chunk))
    alone = BatchPlanner({"x": range(0, 7), "z": range(40, 60)}, 3, per_user, seed, retain=(first, n_retain, per_chunk))
    for epoch in range(3):
        for old, new, solo in zip(plain.user_chunks("x", epoch), mixed.user_chunks("x", epoch), alone.user_chunks("x", epoch)):
            own, extra = new[: len(old)], new[len(old):]
            assert own == old and new == solo
            assert len(extra) == len(set(extra)) == min(per_chunk, n_retain)
            assert all(first <= i < first + n_retain for i in extra)
    full = mixed.occupancy()
    assert 0 < full["occupancy_mean"] <= 1.0


def test_the_recorded_recipe_names_the_same_data_from_any_directory(tmp_path, monkeypatch):
    """A run's recipe.yaml is read again by eval, forget --retrain-shared and serve, from wherever
    they run: relative local paths are recorded absolute (they named nothing, or another folder,
    outside the directory the run started in); dataset and hub ids stay ids."""
    from flora_train.config import load_recipe
    from flora_train.train.data_setup import recipe_as_recorded

    (tmp_path / "d" / "more").mkdir(parents=True)
    (tmp_path / "d" / "train.jsonl").write_text("")
    (tmp_path / "smol").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_recipe(None, ["run_dir=r", "base.name_or_path=smol", "data.train_path=[d/train.jsonl,'d/**/*.jsonl',org/dataset]",
                             "data.eval_path=d/more", "eval.general_path=not/here.jsonl"])
    recorded = recipe_as_recorded(cfg)
    assert list(recorded.data.train_path) == [str(tmp_path / "d/train.jsonl"), str(tmp_path / "d/**/*.jsonl"), "org/dataset"]
    assert recorded.data.eval_path == str(tmp_path / "d/more") and recorded.base.name_or_path == str(tmp_path / "smol")
    assert recorded.eval.general_path == "not/here.jsonl"  # nothing there: left for the run's own error to name
    assert cfg.data.eval_path == "d/more", "the run itself keeps its recipe as given"
    hub = recipe_as_recorded(load_recipe(None, ["run_dir=r", "base.name_or_path=HuggingFaceTB/SmolLM2-135M", "data.train_path=d/train.jsonl"]))
    assert hub.base.name_or_path == "HuggingFaceTB/SmolLM2-135M"

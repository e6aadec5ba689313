"""Loading with file:line errors, completion-only labels, the planner, the synthetic task."""

import gzip
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flora_train.data import IGNORE, BadRows, BatchPlanner, Columns, DataError, SyntheticTask, load_examples, tokenize_examples


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"user_id": "a", "prompt": "hi :", "completion": " red"})


@pytest.mark.parametrize(
    "line, reason",
    [
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
    ],
)
def test_bad_rows_name_file_and_line_or_are_counted(tmp_path, line, reason):
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(DataError, match=r"d\.jsonl:3: "):
        load_examples(path, "auto", Columns(), BadRows("error"))
    bad = BadRows("skip")
    ds = load_examples(path, "auto", Columns(), bad)
    assert len(ds) == 2 and bad.counts == {reason: 1} and "d.jsonl:3" in bad.examples[0]


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
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps({"user_id": "a", **row})])
    with pytest.raises(DataError) as error:
        load_examples(path, "auto", Columns(), BadRows("error"))
    assert str(error.value).startswith(f"{path}:1: user 'a': missing column '"), str(error.value)
    assert str(error.value).endswith(f"({fix})"), str(error.value)


def test_a_file_whose_user_column_has_another_name_names_the_key(tmp_path):
    """A file keyed by 'user' said only "missing or invalid user id column 'user_id' (got None) (set
    data.on_bad_row=skip ...)": skipping would drop every row. A row that has the column, empty,
    is a bad row (skipping is the way out)."""
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps({"user": "a", "prompt": "p", "completion": " c"})])
    with pytest.raises(DataError) as error:
        load_examples(path, "auto", Columns(), BadRows("error"))
    assert str(error.value) == (f"{path}:1: missing or invalid user id column 'user_id' (got None) (the row has no "
                                "'user_id' column; its columns are 'completion', 'prompt', 'user': set data.user_column "
                                "to the one naming the user)")
    path = _write_jsonl(tmp_path / "e.jsonl", [json.dumps({"user_id": "", "prompt": "p", "completion": " c"})])
    with pytest.raises(DataError, match=r"\(got ''\) \(set data\.on_bad_row=skip to skip such rows\)$"):
        load_examples(path, "auto", Columns(), BadRows("error"))


def test_parquet_csv_and_text_columns(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"uid": ["u1", "u2", 7], "body": ["some text", "more", "x"]})
    frame["uid"] = frame["uid"].astype(str)
    frame.to_parquet(tmp_path / "d.parquet")
    frame.to_csv(tmp_path / "d.csv", index=False)
    cols = Columns(user="uid", text="body")
    for name in ("d.parquet", "d.csv"):
        ds = load_examples(tmp_path / name, "auto", cols, BadRows())
        assert ds["user_id"][:] == ["u1", "u2", "7"] and ds["text"][0] == "some text"
    (tmp_path / "n.csv").write_text("uid,body\n17,numbers are ids in a CSV\n18,x\n")  # CSV has no types
    assert load_examples(tmp_path / "n.csv", "auto", cols, BadRows())["user_id"][:] == ["17", "18"]
    (tmp_path / "e.csv").write_text("uid,body\nu1,ok\n,missing user\n")
    with pytest.raises(DataError, match=r"e\.csv:3: missing or invalid user id"):
        load_examples(tmp_path / "e.csv", "auto", cols, BadRows())
    # A quoted field over two lines, and a blank line: the bad row is on line 6 (it was named line 4).
    (tmp_path / "q.csv").write_text('uid,body\nu1,"a paragraph\nover two lines"\n\nu2,ok\n,missing user\n')
    with pytest.raises(DataError, match=r"q\.csv:6: missing or invalid user id"):
        load_examples(tmp_path / "q.csv", "auto", cols, BadRows())


def test_csv_fields_are_the_text_the_file_holds(tmp_path):
    """CSV has no types: "007" and "7" are two users (pandas' guess made both 7 and trained one user on
    both's rows), "NA" is a user (Namibia) not a missing value, "12" a completion, not an int."""
    path = tmp_path / "d.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("user_id,prompt,completion\n007,6+6=,12\n7,1+1=,2\nNA,capital?,Windhoek\nnull,,None\n"
                "1.0,x, 3.50\n")
    ds = load_examples(path, "auto", Columns(), BadRows())
    assert ds["user_id"][:] == ["007", "7", "NA", "null", "1.0"]
    assert ds["completion"][:] == ["12", "2", "Windhoek", "None", " 3.50"] and ds["prompt"][3] == ""
    assert ds["source"][:] == [f"{path}:{n}" for n in range(2, 7)]
    # A record with more or fewer fields than the header is a bad row named by its line.
    (tmp_path / "f.csv").write_text("user_id,prompt,completion\n\n   \nu1,a,b\nu2,a,b,c\nu3,a\n")
    bad = BadRows("skip")
    assert load_examples(tmp_path / "f.csv", "auto", Columns(), bad)["user_id"][:] == ["u1"]
    assert bad.examples == [f"{tmp_path / 'f.csv'}:5: 4 fields, but the header has 3",
                            f"{tmp_path / 'f.csv'}:6: 2 fields, but the header has 3"]
    (tmp_path / "h.csv").write_text("user_id,prompt,prompt\nu1,a,b\n")
    with pytest.raises(DataError, match=r"h\.csv:1: the header names column\(s\) 'prompt' more than once"):
        load_examples(tmp_path / "h.csv", "auto", Columns(), BadRows())
    # Excel writes ';' where the decimal mark is a comma: the header was one column, and the error then
    # asked for data.user_column to be set to it.
    (tmp_path / "semi.csv").write_text("user_id;prompt;completion\nu1;a;b\n")
    with pytest.raises(DataError, match=r"semi\.csv:1: the header is one column, 'user_id;prompt;completion': its "
                                        r"fields are separated by ';', not ','; save it with commas \(CSV\) or tabs"):
        load_examples(tmp_path / "semi.csv", "auto", Columns(), BadRows())
    (tmp_path / "tabs.csv").write_text("user_id\tprompt\tcompletion\nu1\ta\tb\n")
    with pytest.raises(DataError, match=r"tabs\.csv:1: .* separated by '\\t', not ','; name it \.tsv"):
        load_examples(tmp_path / "tabs.csv", "auto", Columns(), BadRows())
    (tmp_path / "empty.csv").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.csv: an empty CSV file"):
        load_examples(tmp_path / "empty.csv", "auto", Columns(), BadRows())


def test_integer_typed_user_columns_are_read_as_text(tmp_path):
    """A Parquet or saved dataset column typed as integers cannot hold "42" beside 42: its ids are the
    users "42" and "7" (they were bad rows whose only offered fix, skipping, dropped every row). JSONL,
    typed value by value, still refuses 42, and now says to write it as a string."""
    import datasets
    import pandas as pd

    frame = pd.DataFrame({"user_id": [42, 7, 42], "prompt": ["a", "b", "c"], "completion": ["x", "y", "z"]})
    frame.to_parquet(tmp_path / "d.parquet")
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.parquet", "saved"):
        assert load_examples(tmp_path / name, "auto", Columns(), BadRows())["user_id"][:] == ["42", "7", "42"]
    frame["user_id"] = frame["user_id"].astype(float)  # 42.0: no one spelling of an id
    frame.to_parquet(tmp_path / "f.parquet")
    with pytest.raises(DataError, match=r"f\.parquet: row 0: user id column 'user_id' must be a string, got float"):
        load_examples(tmp_path / "f.parquet", "auto", Columns(), BadRows())
    (tmp_path / "i.jsonl").write_text('{"user_id": 42, "prompt": "a", "completion": "b"}\n')
    with pytest.raises(DataError, match=r'i\.jsonl:1: .* got int 42 \(write user ids as strings \("42", not 42\)'):
        load_examples(tmp_path / "i.jsonl", "auto", Columns(), BadRows())


def test_a_json_file_holding_one_array_of_rows(tmp_path):
    """Alpaca's and LLaMA-Factory's .json files are one array of objects, which `datasets`' json reader
    takes too; each was read as JSON Lines and refused at line 1 ("malformed JSON"). Each row is named
    by the line it starts on; a broken array stops the read (after it there is no next row to find)."""
    rows = [{"user_id": u, "prompt": f"q{i}", "completion": f" a{i}"} for u in ("x", "y") for i in range(2)]
    (tmp_path / "pretty.json").write_text("\ufeff" + json.dumps(rows, indent=2))  # a BOM too
    with gzip.open(tmp_path / "flat.json.gz", "wt") as f:
        f.write(json.dumps(rows))
    ds = load_examples(tmp_path / "pretty.json", "auto", Columns(), BadRows())
    assert ds["user_id"][:] == ["x", "x", "y", "y"] and ds["completion"][3] == " a1"
    assert ds["source"][:] == [f"{tmp_path / 'pretty.json'}:{n}" for n in (2, 7, 12, 17)]
    flat = tmp_path / "flat.json.gz"
    assert load_examples(flat, "auto", Columns(), BadRows())["source"][:] == [
        f"{flat}:1", f"{flat}:1: item 1", f"{flat}:1: item 2", f"{flat}:1: item 3"]
    text = json.dumps(rows, indent=1)
    broken = {"cut.json": (text[:-30], r"cut\.json:\d+: malformed JSON \(Unterminated string"),
              "comma.json": (text.replace("},\n {", "}\n {", 1), r"comma\.json:7: malformed JSON array \(',' or ']' "
                                                                 r"expected after item 0\)"),
              "open.json": (text[:-1], r"open\.json: the JSON array is not closed"),
              "two.json": (text + "\n[]", r"two\.json:\d+: more after the JSON array's closing"),
              "under.json": (json.dumps({"data": rows}, indent=2), r"under\.json: one JSON object over many lines, not "
                             r"rows .*; its 4 rows are under 'data'")}
    for name, (content, message) in broken.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match=message):
            load_examples(tmp_path / name, "auto", Columns(), BadRows("skip"))
    (tmp_path / "under1.json").write_text(json.dumps({"data": rows}))
    with pytest.raises(DataError, match=r"under1\.json:1: .*\(the row has no 'user_id' column; its 4 rows are under "
                                        r"'data': write them as JSON Lines or as the file's one array\)$"):
        load_examples(tmp_path / "under1.json", "auto", Columns(), BadRows())


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    refused = r"d\.txt: cannot tell the format from the file name \(\.jsonl, .*\.csv\.gz.*\); set data.format to "
    with pytest.raises(DataError, match=refused + "jsonl, parquet, csv, tsv or arrow$"):
        load_examples(tmp_path / "d.txt", "auto", Columns(), BadRows())
    with pytest.raises(DataError, match="not found"):
        load_examples(tmp_path / "nope.jsonl", "auto", Columns(), BadRows())


def test_completion_only_labels_and_too_long(tmp_path, tiny_llama_dir):
    from flora_train.base import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    long = json.dumps({"user_id": "b", "prompt": "hello " * 40, "completion": " red"})
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD, long])
    ds = load_examples(path, "auto", Columns(), BadRows())
    kept = r"\(set data.max_length=\d+ to keep it, or data.on_bad_row=skip to skip it\)$"
    with pytest.raises(DataError, match=r"d\.jsonl:2: user 'b': \d+ tokens > data.max_length=16 " + kept):
        tokenize_examples(ds, tok, 16, True, BadRows("error"))
    # Every row too long is counted into one error (the first alone was named: a max_length set past it was
    # refused again by the next longer row), with the length that keeps them, or the base's context.
    rows = [GOOD, long, GOOD, json.dumps({"user_id": "c", "prompt": "hello " * 60, "completion": " x"}), long]
    many = load_examples(_write_jsonl(tmp_path / "m.jsonl", rows), "auto", Columns(), BadRows())
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


def test_folders_globs_lists_gzip_and_arrow(tmp_path):
    import gzip

    import datasets

    rows = [{"user_id": f"u{i}", "prompt": "p", "completion": f" c{i}"} for i in range(6)]
    (tmp_path / "d" / "sub").mkdir(parents=True)
    _write_jsonl(tmp_path / "d" / "a.jsonl", [json.dumps(r) for r in rows[:2]])
    with gzip.open(tmp_path / "d" / "sub" / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows[2:4]) + "\n")
    datasets.Dataset.from_list(rows[4:]).to_parquet(str(tmp_path / "c.parquet"))
    table = datasets.Dataset.from_list(rows[4:])
    import pyarrow as pa

    # An Arrow stream file, as datasets writes its cache.
    with pa.OSFile(str(tmp_path / "e.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.data.table.schema) as w:
        w.write_table(table.data.table)
    cols = Columns()
    assert load_examples(tmp_path / "d", "auto", cols, BadRows())["user_id"][:] == ["u0", "u1", "u2", "u3"]
    assert load_examples(str(tmp_path / "d" / "**" / "*.gz"), "auto", cols, BadRows())["user_id"][:] == ["u2", "u3"]
    both = load_examples([str(tmp_path / "d" / "a.jsonl"), str(tmp_path / "c.parquet")], "auto", cols, BadRows())
    assert both["user_id"][:] == ["u0", "u1", "u4", "u5"] and both["source"][2].endswith("c.parquet: row 0")
    assert load_examples(tmp_path / "e.arrow", "auto", cols, BadRows())["completion"][:] == [" c4", " c5"]
    with gzip.open(tmp_path / "bad.jsonl.gz", "wt") as f:
        f.write(json.dumps(rows[0]) + "\n{broken\n")
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:2: malformed JSON"):
        load_examples(tmp_path / "bad.jsonl.gz", "auto", cols, BadRows())
    with pytest.raises(DataError, match=r"the pattern .*nothing\*\.jsonl' matches no data file"):
        load_examples(str(tmp_path / "nothing*.jsonl"), "auto", cols, BadRows())
    with pytest.raises(DataError, match=r"no-such-org/no-such-dataset\[train\]: cannot load the dataset"):
        load_examples("no-such-org/no-such-dataset", "auto", cols, BadRows())


def test_a_folder_takes_every_file_the_reader_takes_and_tsv_has_tabs(tmp_path):
    """The folder scan and the reader each had their own list of suffixes: a folder of .csv.gz or
    .ndjson.gz shards "held no data file", though each file loaded when named. TSV is CSV with tabs."""
    (tmp_path / "d").mkdir()
    with gzip.open(tmp_path / "d" / "a.csv.gz", "wt") as f:
        f.write("user_id,prompt,completion\nu1,p, x, y\n")  # 4 fields: a bad row
    with gzip.open(tmp_path / "d" / "b.ndjson.gz", "wt") as f:
        f.write(json.dumps({"user_id": "u2", "prompt": "p", "completion": " c"}) + "\n")
    (tmp_path / "d" / "c.tsv").write_text("user_id\tprompt\tcompletion\nu3\tp, with a comma\t c, too\n")
    (tmp_path / "d" / "notes.txt").write_text("not data")
    bad = BadRows("skip")
    ds = load_examples(tmp_path / "d", "auto", Columns(), bad)
    assert ds["user_id"][:] == ["u2", "u3"]
    assert ds["prompt"][1] == "p, with a comma" and ds["completion"][1] == " c, too"
    assert bad.examples == [f"{tmp_path / 'd' / 'a.csv.gz'}:2: 4 fields, but the header has 3"]


def test_a_folder_datasets_saved_to_disk_reads_its_rows(tmp_path):
    """`Dataset.save_to_disk` writes Arrow files beside two JSON files that describe them: named as
    data.train_path, its dataset_info.json was read as rows ('malformed JSON'), and a DatasetDict's
    dataset_dict.json as a row without a user. Now the folder loads as datasets loads it; a
    DatasetDict reads data.split, and its cache key follows the folder's bytes."""
    import datasets

    from flora_train.data.cache import sources_digest

    rows = [{"user_id": f"u{i}", "prompt": "p", "completion": f" c{i}"} for i in range(4)]
    datasets.Dataset.from_list(rows[:3]).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]),
                          "test": datasets.Dataset.from_list(rows[2:])}).save_to_disk(str(tmp_path / "dict"))
    cols = Columns()
    one = load_examples(tmp_path / "one", "auto", cols, BadRows())
    assert one["user_id"][:] == ["u0", "u1", "u2"] and one["source"][2] == f"{tmp_path / 'one'}: row 2"
    assert load_examples(tmp_path / "dict", "auto", cols, BadRows())["completion"][:] == [" c0", " c1"]
    test = load_examples(tmp_path / "dict", "auto", cols, BadRows(), split="test", key="data.eval_path")
    assert test["user_id"][:] == ["u2", "u3"] and test["source"][0] == f"{tmp_path / 'dict'}[test]: row 0"
    with pytest.raises(DataError, match=r"dict: the saved dataset has no split 'dev' \(it has 'train', 'test'\): "
                                        r"set data.split"):
        load_examples(tmp_path / "dict", "auto", cols, BadRows(), split="dev")
    before = sources_digest(str(tmp_path / "one"), "train", None, "data.train_path")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))  # another row: another cache
    assert sources_digest(str(tmp_path / "one"), "train", None, "data.train_path") != before
    datasets.Dataset.from_list([{**rows[0], "user_id": None}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad: row 0: missing or invalid user id"):
        load_examples(tmp_path / "bad", "auto", cols, BadRows())


def test_a_dataset_id_the_hub_cannot_be_reached_for_is_refused_at_once(tmp_path, monkeypatch):
    """Offline (the hub's name does not resolve), a dataset id failed only after huggingface_hub had
    retried the hub for most of a minute, twice (the cache key loads it too). (The suite runs with
    HF_HUB_OFFLINE=1, under which the cache is read at once: lifted here, with no network.)"""
    import socket

    from huggingface_hub import constants

    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(DataError, match=r"^data.train_path: 'org/ds' is not a local file or folder nor in the "
                                        r"Hugging Face cache, and huggingface.co cannot be reached"):
        load_examples("org/ds", "auto", Columns(), BadRows())
    (tmp_path / "datasets--org--ds" / "snapshots").mkdir(parents=True)
    with pytest.raises(DataError, match=r"'org/ds' is in the Hugging Face cache but huggingface.co cannot be "
                                        r"reached from this machine: set HF_HUB_OFFLINE=1"):
        load_examples("org/ds", "auto", Columns(), BadRows())


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


def test_a_null_value_is_named_null_and_a_byte_order_mark_is_no_part_of_row_1(tmp_path):
    """A Parquet file's null completion said "missing column 'completion'" although every row has the
    column; a JSONL file written with a byte-order mark (PowerShell's utf8) failed on line 1 with
    "Unexpected UTF-8 BOM". Now the null is named, and the mark is dropped as Python's utf-8-sig does."""
    import pandas as pd

    path = tmp_path / "d.parquet"
    pd.DataFrame([{"user_id": "a", "prompt": "x", "completion": " y"}, {"user_id": "b", "prompt": "x", "completion": None}]
                 ).to_parquet(path)
    with pytest.raises(DataError, match=r"d\.parquet: row 1: user 'b': column 'completion' is null \(set data.on_bad_row"):
        load_examples(path, "auto", Columns(), BadRows("error"))
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (GOOD + "\n" + GOOD.replace('"a"', '"b"') + "\n").encode())
    assert load_examples(path, "auto", Columns(), BadRows("error"))["user_id"] == ["a", "b"]


def test_a_folder_of_train_and_eval_files_trains_on_train_only(tmp_path, capsys):
    """`flora-train data synth --out d` writes d/train.jsonl beside d/eval.jsonl (a run's data/ holds
    both too). data.train_path=d read every file under it: the held-out rows were trained on, and the
    scores on them meant nothing. Now, as `datasets.load_dataset(folder)` splits by file name: files
    named as held-out data are passed over for training (a warning names them), and read alone by
    data.eval_path; hidden files are not data."""
    d = tmp_path / "d"
    (d / "validation").mkdir(parents=True)
    (d / ".cache").mkdir()
    _write_jsonl(d / "train.jsonl", [json.dumps({"user_id": "a", "prompt": "p", "completion": " train"})])
    _write_jsonl(d / "eval.jsonl", [json.dumps({"user_id": "a", "prompt": "p", "completion": " eval"})])
    _write_jsonl(d / "validation" / "part-0.jsonl", [json.dumps({"user_id": "a", "prompt": "p", "completion": " val"})])
    _write_jsonl(d / "contest.jsonl", [json.dumps({"user_id": "b", "prompt": "p", "completion": " contest"})])  # no split
    _write_jsonl(d / ".cache" / "x.jsonl", [json.dumps({"user_id": "c", "prompt": "p", "completion": " hidden"})])
    cols = Columns()
    assert sorted(load_examples(d, "auto", cols, BadRows())["completion"]) == [" contest", " train"]
    assert capsys.readouterr().err.strip() == (f"flora-train: warning: data.train_path: {d} holds eval.jsonl, "
                                               "validation/part-0.jsonl, named as held-out data: not trained on "
                                               "(data.eval_path naming the folder reads only such files)")
    assert sorted(load_examples(d, "auto", cols, BadRows(), key="data.eval_path")["completion"]) == [" eval", " val"]
    (d / "train.jsonl").unlink()
    (d / "contest.jsonl").unlink()
    with pytest.raises(DataError, match=r"holds only files named as held-out data \(eval.jsonl, validation/part-0.jsonl\)"):
        load_examples(d, "auto", cols, BadRows())

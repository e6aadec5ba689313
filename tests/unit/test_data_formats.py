"""Reading each row format (data/readers.py) and naming sources (data/sources.py): CSV and TSV as
the text they hold, JSON Lines or one JSON array, typed tables, folders, globs, saved datasets and
dataset ids, each bad row or file named by its file and line."""

import gzip
import json
import re

import pytest

from flora_train.data import BadRows, Columns, DataError, load_examples
from tests.unit.data_helpers import GOOD, write_jsonl


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
    # A repeated header name; ';' (what Excel writes where the decimal mark is a comma) or a tab read as one
    # column, whose error then asked for data.user_column to be set to it; a file with no header at all.
    refused = {"h.csv": ("user_id,prompt,prompt\nu1,a,b\n", r"h\.csv:1: the header names column\(s\) 'prompt' more "
                                                              r"than once"),
               "semi.csv": ("user_id;prompt;completion\nu1;a;b\n", r"semi\.csv:1: the header is one column, "
                            r"'user_id;prompt;completion': its fields are separated by ';', not ','; save it with "
                            r"commas \(CSV\) or tabs"),
               "tabs.csv": ("user_id\tprompt\tcompletion\nu1\ta\tb\n", r"tabs\.csv:1: .* separated by '\\t', not ','; "
                            r"name it \.tsv"),
               "empty.csv": ("\n", r"empty\.csv: an empty CSV file")}
    for name, (text, message) in refused.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message):
            load_examples(tmp_path / name, "auto", Columns(), BadRows())


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


def test_folders_globs_lists_gzip_and_arrow(tmp_path):
    import datasets

    rows = [{"user_id": f"u{i}", "prompt": "p", "completion": f" c{i}"} for i in range(6)]
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
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
    # A .gz file cut short, or not gzip at all: EOFError's and BadGzipFile's tracebacks before.
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in rows * 50).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "plain.csv.gz").write_text("user_id,prompt,completion\nu,a,b\n")
    for name, said in (("cut.jsonl.gz", "cut short (the gzip stream ends before its end marker)"),
                       ("plain.csv.gz", "not readable as gzip (Not a gzipped file")):
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / name}: {said}")):
            load_examples(tmp_path / name, "auto", cols, BadRows())
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
    (tmp_path / "one" / "state.json").unlink()  # a copy cut short: its dataset_info.json was read as rows
    with pytest.raises(DataError, match=f"{tmp_path / 'one'} holds a dataset saved with save_to_disk without its "
                                        r"state.json \(a copy cut short\?\)"):
        load_examples(tmp_path / "one", "auto", cols, BadRows())


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
    write_jsonl(d / "train.jsonl", [json.dumps({"user_id": "a", "prompt": "p", "completion": " train"})])
    write_jsonl(d / "eval.jsonl", [json.dumps({"user_id": "a", "prompt": "p", "completion": " eval"})])
    write_jsonl(d / "validation" / "part-0.jsonl", [json.dumps({"user_id": "a", "prompt": "p", "completion": " val"})])
    write_jsonl(d / "contest.jsonl", [json.dumps({"user_id": "b", "prompt": "p", "completion": " contest"})])  # no split
    write_jsonl(d / ".cache" / "x.jsonl", [json.dumps({"user_id": "c", "prompt": "p", "completion": " hidden"})])
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

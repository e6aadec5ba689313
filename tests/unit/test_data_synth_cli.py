"""`flora-train data synth`: the rows it writes match its flags, and a count out of range is one usage
line (--users 0 and --train-examples 0 wrote empty files and exited 0; --eval-examples -2 wrote an empty
eval.jsonl)."""

import json
from collections import Counter

import pytest

from flora_train.cli import main, parse_args
from flora_train.data import SyntheticTask
from flora_train.data.persona_chat import PersonaChatTask


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("task", ["rules", "persona_chat"])
def test_synth_writes_the_counts_it_is_asked_for(tmp_path, task, capsys):
    assert main(["data", "synth", "--task", task, "--users", "3", "--train-examples", "5", "--eval-examples", "0",
                 "--seed", "7", "--out", str(tmp_path / "a")]) == 0
    train = _rows(tmp_path / "a" / "train.jsonl")
    assert Counter(row["user_id"] for row in train) == Counter({u: 5 for u in {row["user_id"] for row in train}})
    assert len({row["user_id"] for row in train}) == 3
    assert _rows(tmp_path / "a" / "eval.jsonl") == []
    task_class = PersonaChatTask if task == "persona_chat" else SyntheticTask
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(task_class.FILES)  # what --overwrite guards
    # The same seed writes the same task.
    main(["data", "synth", "--task", task, "--users", "3", "--train-examples", "5", "--eval-examples", "0",
          "--seed", "7", "--out", str(tmp_path / "b")])
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()


@pytest.mark.parametrize("flag,value,message", [
    ("--users", "0", "argument --users: must be a whole number >= 1, got '0'"),
    ("--train-examples", "0", "argument --train-examples: must be a whole number >= 1, got '0'"),
    ("--eval-examples", "-2", "argument --eval-examples: must be a whole number >= 0, got '-2'"),
])
def test_synth_counts_out_of_range_are_a_usage_line(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit):
        parse_args(["data", "synth", "--out", str(tmp_path / "o"), flag, value])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_synth_into_a_folder_holding_its_files_replaces_them_only_when_asked(tmp_path, capsys):
    """`data synth --out data/` beside the user's own train.jsonl replaced it without a word."""
    own = tmp_path / "data" / "train.jsonl"
    own.parent.mkdir()
    own.write_text('{"user_id": "alice", "prompt": "mine", "completion": " only copy"}\n')
    assert main(["data", "synth", "--users", "2", "--out", str(own.parent)]) == 2
    assert capsys.readouterr().err.strip() == (f"flora-train: error: --out {own.parent}: train.jsonl already there; "
                                               "--overwrite replaces them, or name another folder")
    assert own.read_text().startswith('{"user_id": "alice"') and not (own.parent / "eval.jsonl").exists()
    assert main(["data", "synth", "--users", "2", "--out", str(own.parent), "--overwrite"]) == 0
    assert len({row["user_id"] for row in _rows(own)}) == 2

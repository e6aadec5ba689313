"""`flora-train users`' table: whole ids, columns aligned by terminal width."""

import uuid

from flora_train.lifecycle import display_width, users_table


def _row(user: str, **extra) -> dict:
    return {"user_id": user, "steps": 12, "tokens": 340, "eval_loss": 0.5, "export": ["out/x"], **extra}


def test_ids_are_whole_and_columns_line_up_whatever_the_script():
    """A UUID id (36 characters) was cut to 32, which --users then does not know; an id of wide
    characters (CJK, emoji: two columns each) pushed its row's columns right."""
    ids = [str(uuid.UUID(int=7)), "ユーザー😀", "e\u0301mile", "bob"]
    lines = users_table([_row(u) for u in ids])
    assert lines[-1] == "4 users"
    for user, line in zip(ids, lines[1:-1]):
        assert line.startswith(user + " "), line
    # The right edge of the steps column sits at the same terminal column on every line.
    edges = {display_width(line[: line.index(" 12 ") + 3]) for line in lines[1:-1]}
    assert len(edges) == 1 and display_width(lines[0][: lines[0].index("steps") + 5]) in edges, lines
    assert (display_width("ユーザー😀"), display_width("e\u0301mile")) == (10, 5)


def test_a_selection_run_adds_its_columns():
    rows = [_row("a", kept_step=4, validation_loss=float("nan"), stopped_after=None),
            _row("b", kept_step=None, validation_loss=0.25, stopped_after=3)]
    head, a, b, _ = users_table(rows)
    assert "kept" in head and "val loss" in head and "stopped" in head
    assert "step 4" in a and a.count(" - ") >= 1 and "0.2500" in b and b.rstrip().endswith("out/x")


def test_patience_alone_adds_when_each_user_stopped_and_no_kept_row():
    """``train.select: last`` with ``train.patience`` serves the last row: there is no kept row to show."""
    head, a, b, _ = users_table([_row("a", stopped_after=None), _row("b", stopped_after=9)])
    assert "stopped" in head and "kept" not in head and head.count("val loss") == 1  # eval loss only
    assert a.split()[-2:] == ["-", "out/x"] and b.split()[-2:] == ["9", "out/x"]

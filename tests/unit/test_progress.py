"""Progress bars: redrawn in place on a terminal, whole lines in a log file."""

from __future__ import annotations

import io

from flora_train.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _train(stream, steps: int = 2000, **kwargs) -> str:
    """What the training loop does with its bar: a postfix per step, drawn by update()."""
    bar = progress_bar(total=steps, desc="train", unit="step", stream=stream, **kwargs)
    for i in range(steps):
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}", refresh=False)
        bar.update(1)
    bar.close()
    return stream.getvalue()


def test_a_log_file_gets_whole_lines_at_the_interval(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    out = _train(io.StringIO())
    # the first draw and the last: the loop takes far less than the 30 s between lines
    assert "\r" not in out and out.endswith("\n"), repr(out[:300])
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("train:   0%") and "2000/2000" in lines[1], lines
    assert "loss=0.001" in lines[1]  # the last postfix, though set without a redraw

    monkeypatch.setenv("TQDM_MININTERVAL", "0")  # the user's own interval wins
    lines = _train(io.StringIO(), steps=200).splitlines()
    assert len(lines) > 100 and len(set(lines)) == len(lines), lines[:5]


def test_a_bar_a_terminal_would_erase_ends_on_its_last_state_in_a_log(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    lines = _train(io.StringIO(), steps=300, leave=False).splitlines()  # the shared baseline's bar
    assert len(lines) == 2 and "300/300" in lines[1], lines  # not a last line at some part of the way


def test_a_terminal_is_redrawn_in_place(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    out = _train(Terminal(), steps=50, mininterval=0)
    assert out.count("\r") >= 50 and out.count("\n") == 1, repr(out[:300])


def test_disabled_writes_nothing():
    assert _train(io.StringIO(), enabled=False) == ""


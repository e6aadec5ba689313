"""Progress bars that suit where they are written.

On a terminal a tqdm bar redraws itself in place with a carriage return. Written to a file (a Slurm
job's output, ``nohup``, a pod's log, a pipe) those redraws pile up on one line: the quickstart's
768 steps wrote 160 KB without a single newline, so ``grep``, ``less`` and log collectors saw one
line that grew all run. Off a terminal a bar therefore prints a whole line, at most every
``TQDM_MININTERVAL`` seconds (30 unless that variable says otherwise), and its last state when it
ends.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class LineWriter:
    """A file for tqdm that turns each in-place redraw into one line of its own. tqdm erases a bar
    by drawing spaces over it: blank redraws are not lines."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        lines = [part.rstrip() for part in text.replace("\n", "\r").split("\r")]
        # one write() for all of them: a redraw from tqdm's monitor thread cannot land mid-line
        self.stream.write("".join(line + "\n" for line in lines if line))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _interactive(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def progress_bar(iterable: Any = None, *, enabled: bool = True, stream: TextIO | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on ``stream`` (standard error): redrawn in place on a terminal, a line at a time
    elsewhere. ``kwargs`` go to tqdm."""
    stream = stream if stream is not None else sys.stderr
    if enabled and not _interactive(stream):
        interval = float(os.environ.get("TQDM_MININTERVAL", LOG_INTERVAL_S))
        # maxinterval too: tqdm's monitor thread otherwise redraws a slow bar every 10 s
        kwargs = {"mininterval": interval, "maxinterval": max(interval, 10.0), **kwargs,
                  "leave": True}  # a line cannot be erased: a bar that would vanish ends on its last state
        stream = LineWriter(stream)  # type: ignore[assignment]
    return tqdm(iterable, file=stream, disable=not enabled, **kwargs)

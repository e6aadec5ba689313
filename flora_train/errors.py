"""One base class for every error a user's input can cause (a recipe key, a data file, a run
directory, a checkpoint, a launch). The CLI catches ``UserError`` and prints one line, so a new
error type raised for bad input can never escape as a traceback: it only has to derive from this."""

from __future__ import annotations

# Exit codes a job ends with, for whatever restarts it (torchrun's agent: launch/torchrun.py). Both
# fail the same way again when run again on the same input, so neither is restarted.
BAD_INPUT_EXIT_CODE = 2  # `flora-train: error: ...`: the recipe, the data or the run directory
NONFINITE_EXIT_CODE = 3  # training stopped on a non-finite loss (train.nonfinite); resume is bitwise: again
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports Ctrl-C; no launcher retries it


class UserError(Exception):
    """Bad input or a state of the user's files that the user can act on; its message says how."""


def not_utf8(exc: UnicodeDecodeError) -> str:
    """How a file read as text that is not UTF-8 (UTF-16 from a Windows editor, a binary file) is described."""
    return f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"


def lone_surrogate(text: str) -> str | None:
    """How a string holding half a UTF-16 pair is described, or None when it is text. JSON may escape
    one (``"\\ud800"``) and Python reads it, but no UTF-8 file, Arrow column or tokenizer takes it."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        return (f"holds a lone UTF-16 surrogate {text[exc.start]!r} at character {exc.start} "
                "(half a \\uD800-\\uDFFF pair): not text")


def warn(message: str) -> None:
    """A line the user should read (a fall-back taken, a server unreachable), on stderr."""
    import sys

    print(f"flora-train: warning: {message}", file=sys.stderr, flush=True)

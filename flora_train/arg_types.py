"""argparse types for the CLI's numeric flags: a value out of range is argparse's one usage line
(``argument --port: must be ...``), never a traceback from deep inside the command."""

from __future__ import annotations

import argparse


def at_least_one(text: str) -> int:
    """An argparse type: a whole number >= 1 (argparse turns the error into one usage line)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def whole_number(text: str) -> int:
    """An argparse type: a whole number >= 0 (a count that may be none)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return int(text)


def port_number(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535, got {text!r}")
    return int(text)


def _positive(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):  # (nan too)
        raise argparse.ArgumentTypeError(f"must be a {what} > 0, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    return _positive(text, "number of seconds")


def positive_number(text: str) -> float:
    return _positive(text, "number")

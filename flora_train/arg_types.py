"""argparse types for the CLI's flags: a value out of range is argparse's one usage line
(``argument --port: must be ...``), never a traceback from deep inside the command."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from flora_train.errors import not_utf8


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


def user_list(text: str) -> list[str]:
    """An argparse type: ``a,b`` or ``@FILE`` (one id per line) as the user ids it names, in order,
    each once. A file that cannot be read or a list that names nobody is a usage line: an empty list
    silently meant "every user" to export, and "nobody" to forget."""
    from pathlib import Path

    if text.startswith("@"):
        path = Path(text[1:])
        try:
            ids = [line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]  # ids kept as written
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:  # UTF-16 from a Windows editor
            raise argparse.ArgumentTypeError(f"cannot read {path}: {not_utf8(exc)}") from None
        where = f"{path} names no user (one id per line)"
    else:
        ids, where = text.split(","), f"names no user, got {text!r} (comma-separated ids, or @FILE)"
    users = list(dict.fromkeys(u for u in ids if u))
    if not users:
        raise argparse.ArgumentTypeError(where)
    return users


def model_name_error(name: str) -> str | None:
    """Why ``name`` cannot be the model id a server answers to (None when it can): clients select a
    user as ``<name>:<user_id>``, so a name holding ':' (or none) could never be matched."""
    if not name or ":" in name:
        return f"must be a non-empty name without ':' (clients name a user as '<name>:<user_id>'), got {name!r}"
    return None


def _flag_of(error_of: Callable[[str], str | None]) -> Callable[[str], str]:
    """An argparse ``type`` from a function that says why a value is refused (None: accepted)."""
    def check(text: str) -> str:
        error = error_of(text)
        if error is not None:
            raise argparse.ArgumentTypeError(error)
        return text

    return check


def api_key_error(text: str) -> str | None:
    """Why ``text`` cannot be a key clients send in an HTTP header (None: it can)."""
    if not text or not text.isascii() or not text.isprintable() or any(c.isspace() for c in text):
        return "must be a non-empty key of printable ASCII without spaces (it travels in a header)"
    return None


model_name = _flag_of(model_name_error)
api_key = _flag_of(api_key_error)

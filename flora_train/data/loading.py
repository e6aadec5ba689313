"""Per-user examples from every source a recipe names, checked, into one ``datasets.Dataset``.

``readers`` yields each source's rows as they are; here every row is checked (a user id, and a non-empty text or completion of the right type); a bad row
either stops the run with its file and line (``on_bad_row: error``) or is skipped and counted
(``skip``). Kept rows carry their ``source`` ("file:line") so later checks can name them too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import datasets
import pyarrow as pa

from flora_train.chat_template import text_of_parts
from flora_train.data.bad_rows import BadRows, DataError
from flora_train.data.readers import rows_under, source_rows
from flora_train.data.sources import SourceError, resolve_sources
from flora_train.errors import lone_surrogate, warn


@dataclass
class Columns:
    user: str = "user_id"
    text: str | None = None
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str | None = None  # chat rows: a list of {role, content} turns

    @property
    def kind(self) -> str:
        return "messages" if self.messages else "text" if self.text else "prompt"

    @property
    def wanted(self) -> list[str]:
        if self.messages:
            return [self.user, self.messages]
        return [self.user, self.text] if self.text else [self.user, self.prompt, self.completion]

    @property
    def out_names(self) -> list[str]:
        return {"messages": ["messages"], "text": ["text"], "prompt": ["prompt", "completion"]}[self.kind]


ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name of system (chat_template)


def _check_messages(value: Any, user: str, column: str, where: str, bad: "BadRows") -> str | None:
    """A chat row's turns as JSON text (one column type for any number of turns), or None if bad."""
    if not isinstance(value, list) or not value:
        bad.report(where, "wrong_type_messages", f"user {user!r}: column '{column}' must be a non-empty list of turns")
        return None
    turns = []
    for k, turn in enumerate(value):
        content = turn.get("content") if isinstance(turn, dict) else None
        if not (isinstance(turn, dict) and turn.get("role") in ROLES and isinstance(content, (str, list))):
            bad.report(where, "bad_turn", f"user {user!r}: turn {k} of '{column}' must be {{role: {'|'.join(ROLES)}, "
                       f"content: string or text parts}}, got {turn!r:.80}")
            return None
        try:  # OpenAI's content parts, as `serve` takes them: [{"type": "text", "text": ...}, ...]
            turns.append({"role": turn["role"], "content": text_of_parts(content)})
        except ValueError as exc:
            bad.report(where, "bad_turn", f"user {user!r}: turn {k} of '{column}': {exc}")
            return None
    if not any(t["role"] == "assistant" and t["content"].strip() for t in turns):
        bad.report(where, "no_assistant_turn", f"user {user!r}: no assistant turn to learn from")
        return None
    return json.dumps(turns, ensure_ascii=False)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode's control characters (category Cc), exactly
ANONYMOUS = "__general__"  # the user of rows that belong to no one (train.retain, eval.general_path)


def _check(record: Any, cols: Columns, where: str, bad: BadRows, anonymous: bool = False) -> dict[str, str] | None:
    """The row's columns as the cache keeps them, or None (reported) when it is bad."""
    out = _fields(record, cols, where, bad, anonymous)
    if out is None:
        return None
    for name, value in out.items():
        if (why := lone_surrogate(value)) is None:
            continue
        if name == "source":  # a file name of bytes that are not UTF-8 reads with surrogate escapes: the row is fine
            out["source"] = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            continue
        columns = {"prompt": cols.prompt, "completion": cols.completion, "text": cols.text, "messages": cols.messages}
        column = (f"user id column '{cols.user}'" if name == "user_id"
                  else f"user {out['user_id']!r}: column '{columns[name]}'")
        bad.report(where, "lone_surrogate", f"{column} {why}")
        return None
    return out


def _fields(record: Any, cols: Columns, where: str, bad: BadRows, anonymous: bool) -> dict[str, str] | None:
    if not isinstance(record, dict):
        bad.report(where, "not_an_object", f"expected an object with {cols.wanted}, got {type(record).__name__}")
        return None
    user = ANONYMOUS if anonymous else record.get(cols.user)
    if user is not None and not isinstance(user, str):
        # 42 and "42" would be two spellings of one user id (and 1.0 another): refuse rather than guess.
        bad.report(where, "wrong_type_user", f"user id column '{cols.user}' must be a string, got "
                   f"{type(user).__name__} {user!r}",
                   f"write user ids as strings (\"{user}\", not {user}), or set data.on_bad_row=skip to skip such rows")
        return None
    if not isinstance(user, str) or not user.strip():
        bad.report(where, "missing_user", f"missing or invalid user id column '{cols.user}' (got {user!r})",
                   _user_column_fix(record, cols))
        return None
    control = _CONTROL.search(user)
    if control is not None:
        # A line break (or a tab, a NUL) cannot be named to --users (one id per line, or a,b) and
        # breaks `flora-train users`' table: such a user could be trained but never forgotten.
        bad.report(where, "invalid_user", f"user id {user!r} contains the control character {control.group()!r}")
        return None
    out = {"user_id": user, "source": where}
    if cols.messages:
        messages = _check_messages(record.get(cols.messages), user, cols.messages, where, bad)
        if messages is None:
            return None
        out["messages"] = messages
        return out
    if cols.text:
        fields = [(cols.text, "text")]
    else:
        fields = [(cols.prompt, "prompt"), (cols.completion, "completion")]
    for column, name in fields:
        value = record.get(column)
        if value is None:
            # Parquet and CSV always have the column: a missing value there is a null, not a missing column.
            what = f"column '{column}' is null" if column in record else f"missing column '{column}'"
            bad.report(where, f"missing_{name}", f"user {user!r}: {what}", _columns_fix(record, cols))
            return None
        if not isinstance(value, str):
            bad.report(where, f"wrong_type_{name}", f"user {user!r}: column '{column}' must be a string, got {type(value).__name__}")
            return None
        if name != "prompt" and not value.strip():
            bad.report(where, f"empty_{name}", f"user {user!r}: empty '{column}' (nothing to learn from)")
            return None
        out[name] = value
    return out


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, dict) and "role" in t for t in value)


def _columns_fix(record: dict, cols: Columns) -> str | None:
    """The key to set when a row holds its text in columns other than the recipe's: chat turns, plain
    text, or (naming the row's columns) prompt and completion under other names. None when the row
    has none of these: a row missing its data, for which skipping is the way out."""
    chat = [k for k, v in record.items() if _is_chat(v)]
    if chat:
        return f"the row's turns are in '{chat[0]}': set data.messages_column={chat[0]}"
    strings = sorted(k for k, v in record.items() if isinstance(v, str) and k != cols.user)
    if cols.text is None and strings == ["text"]:
        return "the row is plain text: set data.text_column=text"
    if cols.text is None and len(strings) >= 2 and not {cols.prompt, cols.completion} & set(strings):
        return (f"the row's columns are {', '.join(map(repr, strings))}: set data.prompt_column and "
                "data.completion_column (or data.text_column) to them")
    return None


def _user_column_fix(record: dict, cols: Columns) -> str | None:
    """The key to set when the row has no user column at all (the file names it otherwise): every
    row would fail alike, so skipping rows is not the way out. None when the column is there."""
    if cols.user in record:
        return None
    if under := rows_under(record):
        return f"the row has no '{cols.user}' column{under}"
    names = ", ".join(map(repr, sorted(record)))
    return f"the row has no '{cols.user}' column; its columns are {names}: set data.user_column to the one naming the user"


def load_examples(spec: Any, fmt: str, cols: Columns, bad: BadRows, split: str = "train", subset: str | None = None,
                  key: str = "data.train_path", anonymous: bool = False) -> datasets.Dataset:
    """Validated examples with columns ``user_id``, ``source`` and ``text`` or ``prompt``/``completion``
    from every file or dataset ``spec`` names (see ``sources.resolve_sources``). ``anonymous``: rows
    belong to no user (any user id column is ignored; ``user_id`` is ``ANONYMOUS``)."""
    notes: list[str] = []
    try:
        sources = resolve_sources(spec, split, subset, key, notes)
    except SourceError as exc:
        raise DataError(str(exc)) from None
    for note in notes:
        warn(note)
    names = ["user_id", "source", *cols.out_names]
    # Rows are gathered a batch at a time into Arrow, so a million rows never sit as Python dicts.
    batches: list[pa.Table] = []
    pending: dict[str, list[str]] = {n: [] for n in names}

    def flush() -> None:
        if pending["user_id"]:
            batches.append(pa.table({n: pa.array(v, pa.string()) for n, v in pending.items()}))
            for v in pending.values():
                v.clear()

    for source in sources:
        try:
            for where, rec in source_rows(source, fmt, cols.user, bad):
                row = _check(rec, cols, where, bad, anonymous)
                if row is not None:
                    for n in names:
                        pending[n].append(row[n])
                    if len(pending["user_id"]) >= 50_000:
                        flush()
        except UnicodeDecodeError as exc:
            raise DataError(f"{source.label}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    flush()
    bad.refuse()
    if not batches:
        raise DataError(f"{', '.join(s.label for s in sources[:3])}: no usable examples ({bad.total} bad rows)")
    return datasets.Dataset(pa.concat_tables(batches))

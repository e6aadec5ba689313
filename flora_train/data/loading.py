"""Read per-user examples from JSONL (also gzipped), Parquet, CSV, Arrow or a dataset id into a
``datasets.Dataset``.

Every row is checked (a user id, and a non-empty text or completion of the right type); a bad row
either stops the run with its file and line (``on_bad_row: error``) or is skipped and counted
(``skip``). Kept rows carry their ``source`` ("file:line") so later checks can name them too.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

import datasets
import pyarrow as pa

from flora_train.chat_template import text_of_parts
from flora_train.config.choices import DataFormat
from flora_train.data.sources import SUFFIXES, DataSource, SourceError, format_of, resolve_sources
from flora_train.errors import UserError, warn

datasets.disable_progress_bars()


class DataError(UserError, ValueError):
    """Bad input data; the message names the file and line (or row) and the user where known."""


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


@dataclass
class BadRows:
    """What was skipped, by reason, with the first few places for the log."""

    policy: str = "error"
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self, where: str, reason: str, detail: str, fix: str | None = None) -> None:
        """``fix``: what to set when the row is fine but read under the wrong settings (then skipping
        rows is not the way out)."""
        message = f"{where}: {detail}"
        if self.policy == "error":
            raise DataError(f"{message} ({fix or 'set data.on_bad_row=skip to skip such rows'})")
        self.counts[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(message)


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    found = format_of(path)
    if found is None:
        formats = [f.value for f in DataFormat if f.value != "auto"]
        raise DataError(f"{path}: cannot tell the format from the file name ({', '.join(SUFFIXES)}); set data.format "
                        f"to {', '.join(formats[:-1])} or {formats[-1]}")
    return found


def _open_text(path: Path, newline: str | None = None) -> IO[str]:
    # utf-8-sig: a byte-order mark (Windows tools write one) is dropped, not a malformed first row.
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    return opener(path, "rt", encoding="utf-8-sig", errors="strict", newline=newline)  # type: ignore[return-value]


def _first_char(path: Path) -> str:
    with _open_text(path) as f:
        while (c := f.read(1)) and c.isspace():
            pass
    return c


def _jsonl_rows(path: Path, bad: BadRows) -> Iterator[tuple[str, Any]]:
    """JSON Lines, an object a line; or one JSON array of objects (Alpaca's and LLaMA-Factory's
    ``.json`` files, which ``datasets``' json reader takes too)."""
    if _first_char(path) == "[":
        yield from _json_array_rows(path)
        return
    seen = False
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if not seen and line.strip() == "{":  # how json.dump(indent=...) starts an object
                    _refuse_one_object(path)
                bad.report(where, "malformed", f"malformed JSON ({exc.msg}, column {exc.colno})")
                continue
            seen = True
            yield where, record


def _refuse_one_object(path: Path) -> None:
    """A file whose first line is a lone "{" may be one object written over many lines (rows under a
    key, as some exports write them): named as that, where skipping its lines one by one would end
    in "no usable examples". Returns when the file is not one JSON object."""
    try:
        with _open_text(path) as f:
            whole = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return
    if isinstance(whole, dict):
        raise DataError(f"{path}: one JSON object over many lines, not rows (JSON Lines: an object a line; or the "
                        f"file's one array of objects){_rows_under(whole)}")


def _rows_under(record: dict) -> str:
    """Where an object holds its rows as a list of objects under a key, that key."""
    for key, value in record.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) and "role" not in v for v in value):
            return f"; its {len(value)} rows are under '{key}': write them as JSON Lines or as the file's one array"
    return ""


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _json_array_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """The elements of a file's one JSON array, decoded one at a time, each named by the line it
    starts on (and its place, when it shares that line). Structure errors stop the read whatever
    ``on_bad_row`` says: after a broken element there is no next one to find."""
    with _open_text(path) as f:
        text = f.read()
    decoder = json.JSONDecoder()
    pos = _JSON_SPACE.match(text, text.index("[") + 1).end()
    lineno, counted, previous = 1, 0, 0
    item = 0
    while True:
        if pos >= len(text):
            raise DataError(f"{path}: the JSON array is not closed (no ']': is the file cut short?)")
        if text[pos] == "]":
            rest = _JSON_SPACE.match(text, pos + 1).end()
            if rest < len(text):
                line = text.count("\n", 0, rest) + 1
                raise DataError(f"{path}:{line}: more after the JSON array's closing ']' (one array of rows per file)")
            return
        if item:
            if text[pos] != ",":
                line = text.count("\n", 0, pos) + 1
                raise DataError(f"{path}:{line}: malformed JSON array (',' or ']' expected after item {item - 1})")
            pos = _JSON_SPACE.match(text, pos + 1).end()
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno})") from None
        lineno += text.count("\n", counted, pos)
        counted = pos
        where = f"{path}:{lineno}" if lineno != previous else f"{path}:{lineno}: item {item}"
        previous = lineno
        yield where, record
        item += 1
        pos = _JSON_SPACE.match(text, end).end()


def _csv_rows(path: Path, bad: BadRows, delimiter: str = ",") -> Iterator[tuple[str, Any]]:
    """Each record as the header's names to its fields' text, named by the line it starts on.

    Read with Python's ``csv`` rather than through pandas: CSV has no types, and pandas' guessing
    changed what the file says (user ids "007" and "7" both became 7, one user trained on the two's
    rows; "NA" or "null" became a missing value; a completion "12" an int that was then refused).
    """
    # One field may hold a whole document: csv's default limit (128 KiB) would refuse it.
    csv.field_size_limit(2**31 - 1)
    with _open_text(path, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header: list[str] | None = None
        end = 0
        try:
            for row in reader:
                start, end = end + 1, reader.line_num  # a quoted field may hold line breaks
                if not any(field.strip() for field in row):
                    continue  # a blank line is no record
                if header is None:
                    header = _csv_header(row, f"{path}:{start}")
                    continue
                if len(row) != len(header):
                    bad.report(f"{path}:{start}", "malformed", f"{len(row)} fields, but the header has {len(header)}")
                    continue
                yield f"{path}:{start}", dict(zip(header, row))
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: cannot read as CSV: {exc}") from None
    if header is None:
        raise DataError(f"{path}: an empty CSV file (no header line naming the columns)")


def _csv_header(row: list[str], where: str) -> list[str]:
    names = [name.strip() for name in row]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"{where}: the header names column(s) {', '.join(map(repr, repeated))} more than once")
    return names


def _typed_rows(table: datasets.Dataset, label: str, user_column: str) -> Iterator[tuple[str, Any]]:
    """A typed table's records. A user column typed as integers cannot hold "42" beside 42, so its
    ids are read as their decimal text (JSONL, typed value by value, refuses 42 instead)."""
    feature = table.features.get(user_column)
    int_ids = isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
    for i, record in enumerate(table):
        if int_ids and record[user_column] is not None:
            record[user_column] = str(record[user_column])
        yield f"{label}: row {i}", record


def _table_rows(path: Path, fmt: str, user_column: str) -> Iterator[tuple[str, Any]]:
    try:
        table = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as exc:  # pyarrow parse errors carry no row; name the file at least
        raise DataError(f"{path}: cannot read as {fmt}: {exc}") from None
    return _typed_rows(table, str(path), user_column)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode's control characters (category Cc), exactly
ANONYMOUS = "__general__"  # the user of rows that belong to no one (train.retain, eval.general_path)


def _check(record: Any, cols: Columns, where: str, bad: BadRows, anonymous: bool = False) -> dict[str, str] | None:
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
    if under := _rows_under(record):
        return f"the row has no '{cols.user}' column{under}"
    names = ", ".join(map(repr, sorted(record)))
    return f"the row has no '{cols.user}' column; its columns are {names}: set data.user_column to the one naming the user"


def _dataset_rows(source: DataSource, user_column: str) -> Iterator[tuple[str, Any]]:
    try:
        table = datasets.load_dataset(source.dataset, source.subset, split=source.split)
    except Exception as exc:  # offline with no local copy: datasets says what it looked for
        raise DataError(f"{source.label}: cannot load the dataset ({type(exc).__name__}: {exc})") from None
    yield from _typed_rows(table, source.label, user_column)


def _saved_rows(source: DataSource, user_column: str) -> Iterator[tuple[str, Any]]:
    assert source.saved is not None
    try:
        table = datasets.load_from_disk(str(source.saved))
    except Exception as exc:  # a folder cut short, or written by a newer datasets
        raise DataError(f"{source.saved}: cannot load the saved dataset ({type(exc).__name__}: {exc})") from None
    if isinstance(table, datasets.DatasetDict):
        if source.split not in table:
            splits = ", ".join(repr(k) for k in table)
            raise DataError(f"{source.saved}: the saved dataset has no split {source.split!r} (it has {splits}): "
                            "set data.split (data.eval_split for data.eval_path)")
        table = table[source.split]
    yield from _typed_rows(table, source.label, user_column)


def _source_rows(source: DataSource, fmt: str, cols: Columns, bad: BadRows) -> Iterator[tuple[str, Any]]:
    if source.dataset is not None:
        return _dataset_rows(source, cols.user)
    if source.saved is not None:
        return _saved_rows(source, cols.user)
    assert source.path is not None
    file_fmt = detect_format(source.path, fmt)
    if file_fmt == "jsonl":
        return _jsonl_rows(source.path, bad)
    if file_fmt in ("csv", "tsv"):
        return _csv_rows(source.path, bad, "\t" if file_fmt == "tsv" else ",")
    return _table_rows(source.path, file_fmt, cols.user)


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
            for where, rec in _source_rows(source, fmt, cols, bad):
                row = _check(rec, cols, where, bad, anonymous)
                if row is not None:
                    for n in names:
                        pending[n].append(row[n])
                    if len(pending["user_id"]) >= 50_000:
                        flush()
        except UnicodeDecodeError as exc:
            raise DataError(f"{source.label}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    flush()
    if not batches:
        raise DataError(f"{', '.join(s.label for s in sources[:3])}: no usable examples ({bad.total} bad rows)")
    return datasets.Dataset(pa.concat_tables(batches))

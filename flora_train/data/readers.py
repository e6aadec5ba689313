"""Rows as they are in each kind of source, before any check: JSON Lines (or one JSON array), CSV and
TSV (each field its text), Parquet and Arrow files, ``save_to_disk`` folders and dataset ids (typed,
through ``datasets``). Each row comes with where it is (``file:line``, or ``label: row i``), so the
checks in ``loading`` can name it."""

from __future__ import annotations

import csv
import gzip
import json
import re
import zlib
from pathlib import Path
from typing import IO, Any, Iterator

import datasets

from flora_train.config.choices import DataFormat
from flora_train.data.bad_rows import BadRows, DataError
from flora_train.data.sources import SUFFIXES, DataSource, format_of

datasets.disable_progress_bars()


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
                        f"file's one array of objects){rows_under(whole)}")


def rows_under(record: dict) -> str:
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
                    header = _csv_header(row, f"{path}:{start}", delimiter)
                    continue
                if len(row) != len(header):
                    bad.report(f"{path}:{start}", "malformed", f"{len(row)} fields, but the header has {len(header)}")
                    continue
                yield f"{path}:{start}", dict(zip(header, row))
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: cannot read as CSV: {exc}") from None
    if header is None:
        raise DataError(f"{path}: an empty CSV file (no header line naming the columns)")


# What reads a file whose fields another separator splits: CSV and TSV are read; ';' (what Excel
# writes where the decimal mark is a comma, most of Europe) and '|' are not.
_SEPARATORS = {",": "name it .csv (or set data.format=csv)", "\t": "name it .tsv (or set data.format=tsv)",
               ";": "save it with commas (CSV) or tabs (TSV)", "|": "save it with commas (CSV) or tabs (TSV)"}


def _csv_header(row: list[str], where: str, delimiter: str) -> list[str]:
    names = [name.strip() for name in row]
    other = next((sep for sep in _SEPARATORS if sep != delimiter and len(names) == 1 and sep in names[0]), None)
    if other is not None:
        raise DataError(f"{where}: the header is one column, {names[0]!r}: its fields are separated by {other!r}, "
                        f"not {delimiter!r}; {_SEPARATORS[other]}")
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


def source_rows(source: DataSource, fmt: str, user_column: str, bad: BadRows) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` of every row ``source`` holds, ``where`` naming its file and line (or row)."""
    if source.dataset is not None:
        return _dataset_rows(source, user_column)
    if source.saved is not None:
        return _saved_rows(source, user_column)
    assert source.path is not None
    file_fmt = detect_format(source.path, fmt)
    if file_fmt == "jsonl":
        return _gzip_named(source.path, _jsonl_rows(source.path, bad))
    if file_fmt in ("csv", "tsv"):
        return _gzip_named(source.path, _csv_rows(source.path, bad, "\t" if file_fmt == "tsv" else ","))
    return _table_rows(source.path, file_fmt, user_column)


def _gzip_named(path: Path, rows: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """``rows``, a ``.gz`` file's failures named: a file cut short (a copy or download stopped) or
    not gzip at all ended in EOFError's or BadGzipFile's traceback."""
    try:
        yield from rows
    except EOFError:
        raise DataError(f"{path}: cut short (the gzip stream ends before its end marker): copy the file "
                        "again") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: not readable as gzip ({exc}): a .gz name needs gzip data") from None

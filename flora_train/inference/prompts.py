"""Prompt files for `flora-train generate`: rows with a user id and a prompt (or chat ``messages``),
in any row format training data takes; a bad row is an error naming its file and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flora_train.chat_template import text_of_parts
from flora_train.errors import lone_surrogate, not_utf8
from flora_train.inference.trained import InferenceError


def read_prompts(path: Path, chat: bool = False, user_column: str = "user_id") -> tuple[list[str], list[Any]]:
    """``(users, prompts)``; a prompt is a string, or (``chat``) a list of chat messages. The rows are
    read as training data's are (``data.readers``: JSONL or one JSON array, CSV, TSV, gzipped too; a
    name of no known suffix is read as JSONL), each named by its file and line."""
    from flora_train.data.bad_rows import BadRows, DataError
    from flora_train.data.readers import source_rows
    from flora_train.data.sources import DataSource, format_of

    users, prompts = [], []
    if not path.is_file():
        raise InferenceError(f"{path}: cannot read the prompts: {'a folder' if path.is_dir() else 'no such file'}")
    fmt = "auto" if format_of(path) else "jsonl"
    bad = BadRows(skip_hint=None)
    try:
        for where, row in source_rows(DataSource(path=path), fmt, user_column, bad):
            users.append(_user(row, user_column, where))
            prompts.append(_prompt(row, users[-1], chat, where))
            texts = [prompts[-1]] if isinstance(prompts[-1], str) else [t["content"] for t in prompts[-1]]
            why = next((w for w in map(lone_surrogate, texts) if w is not None), None)
            if why is not None:
                raise InferenceError(f"{where}: user {users[-1]!r}: the prompt {why}")
        bad.refuse()
    except DataError as exc:
        raise InferenceError(str(exc)) from None
    except UnicodeDecodeError as exc:  # UTF-16 from a Windows editor, a binary file named by mistake
        raise InferenceError(f"{path}: {not_utf8(exc)}") from None
    except OSError as exc:
        raise InferenceError(f"{path}: cannot read the prompts: {exc}") from None
    if not users:
        raise InferenceError(f"{path}: no prompts")
    return users, prompts


def _user(row: Any, user_column: str, where: str) -> str:
    if not isinstance(row, dict):
        raise InferenceError(f"{where}: a row must be a JSON object")
    user = row.get(user_column)
    if not isinstance(user, str) or not user:
        raise InferenceError(f"{where}: '{user_column}' must be a non-empty string, got {user!r}")
    if (why := lone_surrogate(user)) is not None:
        raise InferenceError(f"{where}: '{user_column}' {why}")
    return user


def _prompt(row: dict[str, Any], user: str, chat: bool, where: str) -> Any:
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    if isinstance(row.get("messages"), list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in row["messages"]):
        if not chat:  # found here, naming the line, not after the model has loaded
            raise InferenceError(f"{where}: user {user!r}: a 'messages' row is a conversation: pass --chat to "
                                 "render it through the model's chat template")
        return _messages(row["messages"], f"{where}: user {user!r}")
    raise InferenceError(f"{where}: needs a 'prompt' string or a 'messages' list of {{role, content}}")


def _messages(turns: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """The turns with OpenAI's content parts joined into text, as training data and `serve` take them."""
    out = []
    for k, turn in enumerate(turns):
        content = turn["content"]
        if not isinstance(content, (str, list)):
            raise InferenceError(f"{where}: turn {k}: content must be a string or text parts, got {content!r:.40}")
        try:
            out.append({**turn, "content": text_of_parts(content)})
        except ValueError as exc:
            raise InferenceError(f"{where}: turn {k}: {exc}") from None
    return out

"""Prompt files for `flora-train generate`: JSONL rows with a user id and a prompt (or chat
``messages``); a bad row is an error naming its file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flora_train.chat_template import text_of_parts
from flora_train.errors import not_utf8
from flora_train.inference.trained import InferenceError


def read_prompts(path: Path, chat: bool = False, user_column: str = "user_id") -> tuple[list[str], list[Any]]:
    """``(users, prompts)``; a prompt is a string, or (``chat``) a list of chat messages."""
    users, prompts = [], []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is no part of row 1
    except OSError as exc:
        raise InferenceError(f"{path}: cannot read the prompts: {exc}") from None
    except UnicodeDecodeError as exc:  # UTF-16 from a Windows editor, a binary file named by mistake
        raise InferenceError(f"{path}: {not_utf8(exc)}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InferenceError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise InferenceError(f"{where}: a row must be a JSON object")
        user = row.get(user_column)
        if not isinstance(user, str) or not user:
            raise InferenceError(f"{where}: '{user_column}' must be a non-empty string, got {user!r}")
        if isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"])
        elif isinstance(row.get("messages"), list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                           for m in row["messages"]):
            if not chat:  # found here, naming the line, not after the model has loaded
                raise InferenceError(f"{where}: user {user!r}: a 'messages' row is a conversation: pass --chat to "
                                     "render it through the model's chat template")
            prompts.append(_messages(row["messages"], f"{where}: user {user!r}"))
        else:
            raise InferenceError(f"{where}: needs a 'prompt' string or a 'messages' list of {{role, content}}")
        users.append(user)
    if not users:
        raise InferenceError(f"{path}: no prompts")
    return users, prompts


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

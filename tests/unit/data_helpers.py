"""Rows for the data tests (test_data.py, test_data_formats.py)."""

import json
from pathlib import Path


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"user_id": "a", "prompt": "hi :", "completion": " red"})

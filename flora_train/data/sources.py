"""What ``data.train_path`` / ``data.eval_path`` may name: a file, a directory (every data file
under it), a glob pattern, a list of any of these, or a dataset id read with
``datasets.load_dataset`` (``data.split``, ``data.subset``; offline from a local copy or the cache).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flora_train.errors import UserError

SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".parquet", ".csv", ".arrow")


class SourceError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class DataSource:
    path: Path | None = None  # a file
    dataset: str | None = None  # or a dataset id
    split: str = "train"
    subset: str | None = None

    @property
    def label(self) -> str:
        return str(self.path) if self.path else f"{self.dataset}[{self.subset + '/' if self.subset else ''}{self.split}]"


def _is_data_file(p: Path) -> bool:
    name = p.name.lower()
    return p.is_file() and any(name.endswith(s) for s in SUFFIXES)


def _looks_like_dataset_id(text: str) -> bool:
    return not text.startswith(("/", ".", "~")) and text.count("/") <= 1 and not Path(text).suffix


def absolute_spec(spec: Any) -> Any:
    """``spec`` with every local file, folder and pattern made absolute (dataset ids as they are), so
    that it names the same data from any working directory: what a run records in its recipe."""
    if isinstance(spec, (list, tuple)):
        return [absolute_spec(item) for item in spec]
    if spec is None:
        return None
    text = str(spec)
    if any(c in text for c in "*?[") or Path(text).exists():
        return os.path.abspath(text)
    return spec


def resolve_sources(spec: Any, split: str = "train", subset: str | None = None, key: str = "data.train_path") -> list[DataSource]:
    """Every file (sorted, so every rank reads the same order) or dataset ``spec`` names."""
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    out: list[DataSource] = []
    for item in specs:
        text = str(item)
        if any(c in text for c in "*?["):
            matched = sorted(Path(p) for p in glob.glob(text, recursive=True) if _is_data_file(Path(p)))
            if not matched:
                raise SourceError(f"{key}: the pattern {text!r} matches no data file ({', '.join(SUFFIXES)})")
            out.extend(DataSource(path=p) for p in matched)
        elif Path(text).is_dir():
            files = sorted(p for p in Path(text).rglob("*") if _is_data_file(p))
            if not files:
                raise SourceError(f"{key}: the folder {text} holds no data file ({', '.join(SUFFIXES)})")
            out.extend(DataSource(path=p) for p in files)
        elif Path(text).is_file():
            out.append(DataSource(path=Path(text)))
        elif _looks_like_dataset_id(text):
            out.append(DataSource(dataset=text, split=split, subset=subset))
        else:
            raise SourceError(f"{key}: data file not found: {text}")
    if not out:
        raise SourceError(f"{key}: names no data")
    return out

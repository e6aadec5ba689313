"""What ``data.train_path`` / ``data.eval_path`` may name: a file, a directory (every data file
under it), a folder written by ``datasets``' ``save_to_disk`` (a ``DatasetDict``'s read at
``data.split``), a glob pattern, a list of any of these, or a dataset id read with
``datasets.load_dataset`` (``data.split``, ``data.subset``; offline from a local copy or the cache).
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flora_train.errors import UserError
from flora_train.hub import in_cache, unreachable_hub

# The format a data file's name tells, by its last suffix. The text formats may be gzipped too (a
# further .gz): one table for the folder scan and the reader, so neither takes a file the other refuses.
FORMAT_OF_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
                    ".parquet": "parquet", ".arrow": "arrow"}
TEXT_FORMATS = ("jsonl", "csv", "tsv")
SUFFIXES = (*FORMAT_OF_SUFFIX, *(s + ".gz" for s, f in FORMAT_OF_SUFFIX.items() if f in TEXT_FORMATS))


def format_of(path: Path) -> str | None:
    """The format ``path``'s name tells (``train.csv.gz``: csv), or None."""
    name = path.name.lower()
    gzipped = name.endswith(".gz")
    fmt = FORMAT_OF_SUFFIX.get(Path(name[:-3] if gzipped else name).suffix)
    return None if fmt is None or (gzipped and fmt not in TEXT_FORMATS) else fmt


class SourceError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class DataSource:
    path: Path | None = None  # a file
    dataset: str | None = None  # or a dataset id
    split: str = "train"
    subset: str | None = None
    saved: Path | None = None  # or a save_to_disk folder (split: a DatasetDict's split to read)

    @property
    def label(self) -> str:
        if self.saved is not None:
            return f"{self.saved}[{self.split}]" if is_saved_dataset_dict(self.saved) else str(self.saved)
        return str(self.path) if self.path else f"{self.dataset}[{self.subset + '/' if self.subset else ''}{self.split}]"


def is_saved_dataset_dict(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file()


def is_saved_dataset(folder: Path) -> bool:
    """A folder ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` wrote (its JSON files
    describe the Arrow files, they are not rows)."""
    if is_saved_dataset_dict(folder):
        return True
    return (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()


def _is_data_file(p: Path) -> bool:
    return p.is_file() and format_of(p) is not None


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


# File names that mark a split, as `datasets.load_dataset(folder)` reads them (a whole word of the
# path under the folder: `eval.jsonl`, `test-0001.parquet`, `validation/part-0.parquet`).
_HELD_OUT = re.compile(r"(^|[\W_])(validation|valid|val|dev|test|testing|eval|evaluation)([\W_]|$)", re.IGNORECASE)
TRAINING_KEYS = ("data.train_path", "train.retain.path")  # what is trained on


def _folder_files(folder: Path, key: str, notes: list[str] | None) -> list[Path]:
    """A folder's data files for ``key``. Files named as held-out data (`data synth` writes
    ``train.jsonl`` beside ``eval.jsonl``; a run's ``data/`` holds both) are not training data: the
    training keys pass over them, as ``datasets`` puts them in another split, and the evaluation
    keys read only them when there are any. Hidden files and folders are not data."""
    files = sorted(p for p in folder.rglob("*") if _is_data_file(p)
                   and not any(part.startswith((".", "__")) for part in p.relative_to(folder).parts))
    held = [p for p in files if _HELD_OUT.search(str(p.relative_to(folder)))]
    if not held:
        return files
    if key not in TRAINING_KEYS:
        return held
    names = ", ".join(str(p.relative_to(folder)) for p in held[:5]) + (" ..." if len(held) > 5 else "")
    training = [p for p in files if p not in held]
    if not training:
        raise SourceError(f"{key}: the folder {folder} holds only files named as held-out data ({names}); "
                          "name the training files, or rename them")
    if notes is not None:
        notes.append(f"{key}: {folder} holds {names}, named as held-out data: not trained on (data.eval_path "
                     "naming the folder reads only such files)")
    return training


def _refuse_part_of_a_saved_dataset(folder: Path, key: str) -> None:
    """A folder holding ``save_to_disk``'s Arrow files and one of its two JSON files, not both (a copy
    cut short): read as a folder of data files, its ``dataset_info.json`` was taken for rows."""
    described = [name for name in ("state.json", "dataset_info.json") if (folder / name).is_file()]
    if len(described) == 1 and any(folder.glob("data-*.arrow")):
        missing = "dataset_info.json" if described == ["state.json"] else "state.json"
        raise SourceError(f"{key}: {folder} holds a dataset saved with save_to_disk without its {missing} (a copy "
                          "cut short?): save or copy it again")


def _check_hub_reachable(dataset: str, key: str) -> None:
    """A dataset id on a machine that cannot reach the hub: refused at once, saying what to do."""
    host = unreachable_hub()
    if host is None:
        return
    if in_cache(dataset, "dataset"):
        raise SourceError(f"{key}: {dataset!r} is in the Hugging Face cache but {host} cannot be reached from this "
                          "machine: set HF_HUB_OFFLINE=1 to read it from the cache")
    raise SourceError(f"{key}: {dataset!r} is not a local file or folder nor in the Hugging Face cache, and {host} "
                      "cannot be reached from this machine; name a local copy (data files, or a save_to_disk folder)")


def resolve_sources(spec: Any, split: str = "train", subset: str | None = None, key: str = "data.train_path",
                    notes: list[str] | None = None) -> list[DataSource]:
    """Every file (sorted, so every rank reads the same order) or dataset ``spec`` names. ``notes``
    collects what a user should be told of the choice (files in a folder passed over)."""
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    out: list[DataSource] = []
    for item in specs:
        text = str(item)
        if any(c in text for c in "*?["):
            matched = sorted(Path(p) for p in glob.glob(text, recursive=True) if _is_data_file(Path(p)))
            if not matched:
                raise SourceError(f"{key}: the pattern {text!r} matches no data file ({', '.join(SUFFIXES)})")
            out.extend(DataSource(path=p) for p in matched)
        elif Path(text).is_dir() and is_saved_dataset(Path(text)):
            out.append(DataSource(saved=Path(text), split=split))
        elif Path(text).is_dir():
            _refuse_part_of_a_saved_dataset(Path(text), key)
            files = _folder_files(Path(text), key, notes)
            if not files:
                raise SourceError(f"{key}: the folder {text} holds no data file ({', '.join(SUFFIXES)})")
            out.extend(DataSource(path=p) for p in files)
        elif Path(text).is_file():
            out.append(DataSource(path=Path(text)))
        elif _looks_like_dataset_id(text):
            _check_hub_reachable(text, key)
            out.append(DataSource(dataset=text, split=split, subset=subset))
        else:
            raise SourceError(f"{key}: data file not found: {text}")
    if not out:
        raise SourceError(f"{key}: names no data")
    return out

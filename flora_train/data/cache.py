"""The run's tokenised data, written once as Arrow under ``run_dir/data_cache/<key>``.

The key hashes everything the tokens depend on: the bytes of every source file (or a dataset's
id, split and cache files), the columns and bad-row policy, the tokenizer, the length limit and
the hold-out. A resume or a second run with the same inputs finds the folder and tokenises
nothing; any change gives a new key, and the superseded folder is removed once the new one is
complete. A folder is complete when its ``meta.json`` exists: it is written last, inside a
temporary folder that is then renamed into place, so a killed build leaves no half cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import datasets

from flora_train.data.bad_rows import BadRows
from flora_train.data.examples import TokenizedExamples
from flora_train.data.sources import resolve_sources
from flora_train.errors import UserError
from flora_train.files import replaced_folder

# Bump when what is written (or how it is tokenised) changes. 2: CSV fields read as the text they hold
# (a cache of 1 may hold "007" and "7" as one user; reading again lets a resume see the data changed).
FORMAT_VERSION = 2
COLUMNS = ["user_id", "source", "input_ids", "labels"]


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def sources_digest(spec: Any, split: str, subset: str | None, key: str) -> list[list[str]]:
    """What ``spec`` names, by content: (file, hash) or (dataset, split, subset, its cache files)."""
    out = []
    for source in resolve_sources(spec, split, subset, key):
        if source.path is not None:
            out.append([str(source.path.resolve()), _file_digest(source.path)])
        elif source.saved is not None:  # every file of the folder: the Arrow data and what describes it
            files = sorted(p for p in source.saved.rglob("*") if p.is_file())
            out.append([f"{source.saved.resolve()}[{source.split}]",
                        *(f"{p.relative_to(source.saved)}:{_file_digest(p)}" for p in files)])
        else:
            try:
                files = datasets.load_dataset(source.dataset, source.subset, split=source.split).cache_files
            except Exception:  # unreadable: the load that follows reports it with the source named
                files = []
            out.append([source.label, *sorted(f"{f['filename']}:{os.path.getsize(f['filename'])}" for f in files)])
    return out


def tokenizer_digest(tokenizer: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    for extra in (type(tokenizer).__name__, tokenizer.eos_token_id, tokenizer.bos_token_id, getattr(tokenizer, "chat_template", None)):
        h.update(repr(extra).encode() + b"\x00")
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"version": FORMAT_VERSION, **parts}, sort_keys=True, default=str).encode()).hexdigest()[:24]


def is_complete(folder: Path) -> bool:
    return (folder / "meta.json").is_file()


def save(folder: Path, parts: dict[str, datasets.Dataset | None], bad: BadRows) -> None:
    """Writes the folder atomically (temporary folder, meta.json last, rename) and removes the
    run's superseded caches. ``parts``: "train" and any of "eval", "retain", "general", "validation"."""
    counts = {}
    with replaced_folder(folder) as tmp:  # a full disk: one line naming the cache, and no half of it left
        for name, ds in parts.items():
            if ds is not None and len(ds):
                ds.select_columns(COLUMNS).save_to_disk(str(tmp / name))
                counts[name] = len(ds)
        bad_rows = {"policy": bad.policy, "counts": dict(bad.counts), "examples": bad.examples, "reasons": bad.reasons}
        (tmp / "meta.json").write_text(json.dumps({"examples": counts, "bad_rows": bad_rows}, indent=1))
    for other in folder.parent.iterdir():
        if other != folder and not other.name.startswith("."):
            shutil.rmtree(other, ignore_errors=True)


class UnreadableCache(UserError, ValueError):
    """A complete cache folder whose files cannot be read (torn by a disk fault or a copy cut short).
    It is derived from the data: the run tokenises again."""


def load(folder: Path) -> tuple[dict[str, TokenizedExamples], BadRows]:
    """The cached parts, memory-mapped (every rank maps the same pages), and the bad-row counts of
    the build."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        parts = {name: TokenizedExamples(datasets.load_from_disk(str(folder / name)).data.table)
                 for name in meta["examples"]}
        b = meta["bad_rows"]
        bad = BadRows(policy=b["policy"])
        bad.counts.update(b["counts"])
        bad.examples.extend(b["examples"])
        bad.reasons.extend(b.get("reasons", []))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise UnreadableCache(f"{folder}: the tokenised data cannot be read ({type(exc).__name__}: {exc})") from None
    return parts, bad


def in_memory(ds: datasets.Dataset) -> TokenizedExamples:
    """Examples straight from a tokenised dataset (``flora-train eval --data``: not cached)."""
    return TokenizedExamples(ds.flatten_indices().select_columns(COLUMNS).data.table)

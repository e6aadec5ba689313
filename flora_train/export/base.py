"""What every export format shares: the interface the registry holds, the request, and user folder
names that stay inside the export.

Each user gets a folder named from a sanitised form of its id plus a hash of the full id, so no
id (``../../etc/passwd``, NUL bytes, unicode look-alikes) can name a path outside ``out`` or
collide with another user's folder. ``index.json`` maps user ids to their place in the export.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flora_train.errors import UserError
from flora_train.files import read_json, replace_text

# adapter.shared's adapter, once beside the users' (no user folder can be named so: they end in a hash).
SHARED_FOLDER = "shared-adapter"


class ExportError(UserError, ValueError):
    pass


def safe_folder_name(user_id: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", user_id).strip("._-")[:64] or "user"
    digest = hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{stem}-{digest}"


def inside(out: Path, folder: str) -> Path:
    """``out / folder``, refused when it would resolve outside ``out``."""
    target = (out / folder).resolve()
    if not target.is_relative_to(out.resolve()) or target == out.resolve():
        raise ExportError(f"refusing to write outside {out}: {folder!r}")
    return target


def indexed(out: Path, user: str, name: Any) -> Path:
    """Where ``index.json`` of the export in ``out`` places ``user``: ``out / name``, refused unless
    it is a path inside ``out`` (an edited index must make nothing outside be read, written or removed)."""
    if isinstance(name, str):
        try:
            return inside(out, name)
        except ExportError:
            pass
    raise ExportError(f"{out / 'index.json'}: user {user!r} leads outside the export: {name!r}")


def write_json(path: Path, obj: Any) -> None:
    """Replaces ``path`` in one rename: a reader sees the old file or the new, never half of one."""
    replace_text(path, json.dumps(obj, indent=2, ensure_ascii=False))


def close_matches(unknown: list[str], known: list[str]) -> str:
    """``'a' (did you mean 'b'?), ...`` for up to five unknown user ids."""
    hints = []
    for u in unknown[:5]:
        close = difflib.get_close_matches(u, known, n=1)
        hints.append(f"{u!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ", ".join(hints) + (" ..." if len(unknown) > 5 else "")


def select_users(saved: list[str], users: list[str] | None) -> list[str]:
    """``users`` (all of ``saved`` when None), each once; one not in ``saved`` is an error naming it
    and the ids closest to it."""
    if not users:
        return saved
    known = set(saved)
    unknown = [u for u in users if u not in known]
    if unknown:
        raise ExportError(f"unknown user(s) not in this run: {close_matches(unknown, saved)}")
    return list(dict.fromkeys(users))


@dataclass
class ExportRequest:
    """One ``flora-train export`` (or a run's export at its end), whatever the format.

    Over ranks: each of ``n`` processes exports with ``part=(k, n)`` and writes the users whose
    rows rank ``k``'s shards hold; ``gather`` (an all-gather) collects every part's index."""

    run_dir: Path
    out: Path
    users: list[str] | None = None  # None: every user of the checkpoint
    checkpoint: Path | None = None  # None: the run's newest intact checkpoint
    just_written: bool = False  # the checkpoint is one this process wrote and hashed (the run's end)
    base_model_id: str | None = None
    pack_size: int = 4096
    part: tuple[int, int] = (0, 1)
    gather: Callable[[Any], list[Any]] = field(default=lambda piece: [piece])
    base: Path | None = None  # merged: where the base is now, if it moved after training


class AdapterExport(ABC):
    """One export format; ``export/__init__.py``'s registry names it (``name``, its manifest's ``format``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    def export(self, request: ExportRequest) -> dict[str, Any]:
        """Writes the export and returns its manifest (``format``, ``num_users``, ...)."""

    def serving_rows(self, folder: Path, manifest: dict[str, Any], index: dict[str, Any]) -> tuple[Any, Any]:
        """``(layout, rows)`` for serving and generating from an export of this format in ``folder``
        (``rows`` an ``inference.rows.RowSource``), for the registry's ``servable`` formats."""
        raise ExportError(f"{folder}: a {self.name} export is not read back; serve a run directory")

    def shared_adapter(self, folder: Path, manifest: dict[str, Any]) -> tuple[Any, Any]:
        """``(layout, row)`` of the shared adapter an export in ``folder`` holds (``SHARED_FOLDER``);
        this default reads the ``--format flora`` folder the row formats write it as."""
        from flora_train.export.flora import load_flora_adapter

        return load_flora_adapter(folder / SHARED_FOLDER)

    def drop_replaced(self, out: Path, old: dict[str, Any], new: dict[str, Any]) -> int:
        """After an export replaced an earlier one of this format in ``out``: removes the earlier
        index's places that the new index does not use, which nothing (``users``, ``forget``,
        ``serve``) would find again. Returns how many. This default is for one folder per user."""
        kept = set(new.values())
        dropped = {folder: indexed(out, u, folder) for u, folder in old.items() if folder not in kept}
        for place in dropped.values():  # every place checked (inside ``out``) before one is removed
            shutil.rmtree(place, ignore_errors=True)
        return len(dropped)

    def forget(self, out: Path, forget: set[str]) -> int:
        """Removes these users from an export of this format in ``out``; returns how many it held.
        This default is for one folder per user (``index.json``: user -> folder)."""
        index_path = out / "index.json"
        folders = json.loads(index_path.read_text())
        gone = [u for u in folders if u in forget]
        places = {u: indexed(out, u, folders[u]) for u in gone}  # all checked before anything is removed
        for u in gone:
            shutil.rmtree(places[u], ignore_errors=True)
            del folders[u]
        if gone:
            write_json(index_path, folders)
        count_users(out / "manifest.json", len(folders))
        return len(gone)


def count_users(manifest_path: Path, users: int) -> None:
    """The export manifest's user count, from its index (also when a killed forget wrote the index
    and not the manifest). One that cannot be read is left as it is (the caller said so)."""
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict):
        return
    if manifest.get("num_users") != users:
        manifest["num_users"] = users
        write_json(manifest_path, manifest)

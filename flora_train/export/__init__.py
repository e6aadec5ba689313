"""Per-user adapters out of a run, one file per format: PEFT folders (LoRA, IA3), flora_train
folders (any method), packed files for populations where a folder per user is too many files, and
merged full models.

``EXPORT_FORMATS`` is the one registry: the CLI's ``--format`` choices and the recipe's
``export.format`` values (``config.choices.ExportFormat``) are its keys. It names each format's
class without importing it, so building the command line's parser imports no torch.
"""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flora_train.errors import warn
from flora_train.files import read_json
from flora_train.export.base import SHARED_FOLDER, ExportError, ExportRequest, safe_folder_name
from flora_train.run_dir import RunDir, readers
from flora_train.run_dir.exports import export_out_error, record_export

if TYPE_CHECKING:
    from flora_train.export.base import AdapterExport


@dataclass(frozen=True)
class ExportFormatEntry:
    summary: str  # what it writes (the CLI's help)
    implementation: str  # "module:Class" in this package
    reads: tuple[str, ...] = ("base_model_id",)  # the export options it takes besides users and out
    in_recipe: bool = True  # a recipe's export.format may name it (the run exports at its end)
    servable: bool = False  # serve and generate read it back (``AdapterExport.serving_rows``)

    def load(self) -> type[AdapterExport]:
        module, cls = self.implementation.split(":")
        return getattr(importlib.import_module(f"flora_train.export.{module}"), cls)


EXPORT_FORMATS: dict[str, ExportFormatEntry] = {
    "peft": ExportFormatEntry("PEFT folders (LoRA, IA3)", "peft:PeftExport", servable=True),
    "flora": ExportFormatEntry("a flora_train folder per user (any method)", "flora:FloraExport", servable=True),
    "packed": ExportFormatEntry("pack files of --pack-size users' rows each, for huge populations",
                                "packed:PackedExport", reads=("base_model_id", "pack_size"), servable=True),
    # a whole model per user: a run's end does not write one for every user
    "merged": ExportFormatEntry("a full model folder per user, its adapter folded into the weights (name the users)",
                                "merged:MergedExport", reads=("base",), in_recipe=False),
}


def get_format(name: str) -> AdapterExport:
    try:
        entry = EXPORT_FORMATS[name]
    except KeyError:
        raise ExportError(f"unknown export format {name!r}; expected one of {', '.join(EXPORT_FORMATS)}") from None
    return entry.load()(name)


def export_adapters(run_dir: Path, fmt: str, users: list[str] | None, out: Path,
                    checkpoint: Path | None = None, base_model_id: str | None = None, pack_size: int = 4096,
                    part: tuple[int, int] = (0, 1),
                    gather: Callable[[Any], list[Any]] = lambda piece: [piece], just_written: bool = False,
                    base: Path | None = None) -> dict[str, Any]:
    """Writes the users' adapters (every user's when ``users`` is None) of ``checkpoint``, or else the
    run's newest intact checkpoint, under ``out`` in format ``fmt``; returns the export's manifest.
    ``just_written``: the checkpoint is one this process wrote and hashed (its bytes are not hashed again).

    Over ranks: each of ``n`` processes calls it with ``part=(k, n)`` and writes the users whose
    rows rank ``k``'s shards hold (``k % n`` when the checkpoint was saved by another world size);
    ``gather`` (an all-gather) collects every part's index, and part 0 writes ``index.json`` and
    ``manifest.json`` once every part's files are written."""
    run, out = RunDir(run_dir), Path(out)
    refused = export_out_error(run, out, fmt)
    if refused:
        raise ExportError(refused)
    request = ExportRequest(Path(run_dir), out, users, checkpoint, just_written, base_model_id, pack_size, part, gather,
                            base)
    exporter = get_format(fmt)
    # `forget` waits for this export to be written and recorded, and this one for a `forget` under way
    with readers.hold_for_export(run.checkpoints, warn):
        replaced = _index_of(out, fmt) if part[0] == 0 else {}  # this run's earlier export here
        if part[0] == 0:
            # before the first row is written: an export killed halfway is still forgotten from
            try:
                record_export(run, out)
            except OSError as exc:  # a read-only mount of the run (a serving host's): export all the same
                warn(f"cannot record this export in {run_dir} ({exc.strerror}): `flora-train forget` on the run "
                     f"will not reach {out}")
        manifest = exporter.export(request)
        if part[0] == 0:
            # a user of the earlier export that this one left out kept a folder no index named:
            # `users` did not list it and `forget` left its adapter there
            exporter.drop_replaced(out, replaced, _index_of(out, fmt))
    return manifest


def _index_of(out: Path, fmt: str) -> dict[str, Any]:
    """The ``index.json`` of an export of format ``fmt`` in ``out``; empty when there is none."""
    manifest, index = out / "manifest.json", out / "index.json"
    if not (manifest.is_file() and index.is_file()) or json.loads(manifest.read_text()).get("format") != fmt:
        return {}
    return json.loads(index.read_text())


def forget_unindexed(out: Path, forget: set[str]) -> int:
    """Removes the users' copies that no index names: in an export that never wrote its index
    (killed halfway), or left beside one (two exports into one folder at once, the second's index
    naming fewer users). Their folders are found by name, and pack files that hold them go.
    Returns how many places held one."""
    from safetensors import safe_open

    places = [p for p in map(safe_folder_name, sorted(forget)) if (out / p).is_dir()]
    for folder in places:
        shutil.rmtree(out / folder, ignore_errors=True)
    index = read_json(out / "index.json")
    index = index if isinstance(index, dict) else {}  # (none, or torn: every pack is looked in)
    named = {entry[0] for entry in index.values() if isinstance(entry, list) and entry}  # the format's own forget
    packs = []
    for pack in sorted(out.glob("pack-*.safetensors")):
        if pack.name in named:  # rewritten by the format's forget; deleting it would take others' rows too
            continue
        try:
            with safe_open(str(pack), framework="pt") as f:
                held = set(json.loads((f.metadata() or {}).get("users", "[]")))
        except Exception:  # noqa: BLE001 - a pack cut short by the kill: it may hold anyone's rows
            held = forget
        if held & forget:
            pack.unlink(missing_ok=True)
            packs.append(pack)
    return len(places) + len(packs)


def forget_in_export(out: Path, fmt: str | None, forget: set[str]) -> int:
    """Removes users from the export in ``out`` written in format ``fmt``; returns how many it held.
    None: one whose manifest names none or cannot be read, where the index's entries say which:
    ``[pack, row]`` pairs are the packed format's, a folder name every other format's."""
    if fmt not in EXPORT_FORMATS:
        index = read_json(out / "index.json")
        entries = index.values() if isinstance(index, dict) else []
        fmt = "packed" if any(isinstance(entry, list) for entry in entries) else "flora"
    return get_format(fmt).forget(out, forget)


__all__ = ["EXPORT_FORMATS", "SHARED_FOLDER", "ExportError", "ExportFormatEntry", "ExportRequest", "export_adapters",
           "forget_in_export", "forget_unindexed", "get_format", "safe_folder_name"]

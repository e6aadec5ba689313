"""Which export folders are a run's: those under its ``export/``, and those written elsewhere
(``export --out``) that it records in ``exports-elsewhere.jsonl`` and recognises by the run id
their manifests keep. `users` lists them, `forget` reaches them, and an export is refused a folder
that holds another run's (or lies among a run directory's own files).
"""

from __future__ import annotations

import json
from pathlib import Path

from flora_train.errors import warn
from flora_train.files import read_json
from flora_train.run_dir.layout import RunDir


def record_export(rd: RunDir, out: Path) -> None:
    """Notes an export's folder when it lies outside ``export/``. One short appended line: two
    exports at once each add theirs."""
    out = Path(out).absolute()
    # (merged exports may come from an export)
    if not rd.holds_run or out.is_relative_to(rd.exports.absolute()) or out in _recorded(rd):
        return
    # A record cut short (a crash in the append) must not swallow this one: a line of its own.
    held = rd.exports_elsewhere.read_bytes() if rd.exports_elsewhere.is_file() else b""
    cut = bool(held) and not held.endswith(b"\n")
    with rd.exports_elsewhere.open("a", encoding="utf-8") as f:
        f.write(("\n" if cut else "") + json.dumps({"out": str(out)}) + "\n")


def holds_export(rd: RunDir, out: Path, info: dict) -> bool:
    """Whether the export in ``out`` (its manifest ``info``) is of this run. By the run id the
    export records, so that a run directory moved since keeps its exports; a copy of the run
    directory has that id too, so an export outside it is the copy's only when the directory that
    wrote it no longer holds that run. An export from before run ids: by its checkpoint's path."""
    source = Path(str(info.get("checkpoint", ""))).resolve().parent
    if source == rd.checkpoints.resolve():
        return True
    made_by = info.get("run_id")
    if made_by is None or made_by != rd.run_id():
        return False
    return Path(out).resolve().is_relative_to(rd.path.resolve()) or RunDir(source.parent).run_id() != made_by


def export_out_error(rd: RunDir, out: Path, fmt: str) -> str | None:
    """Why ``out`` may not receive a ``fmt`` export of this run (None: it may). A run directory's
    own files are no place for one, this run's or another's, outside its ``export/<format>``
    folders: an export into a checkpoint replaced its manifest.json. Nor is a folder holding
    another run's export, or another format's: the two would mix under one index."""
    target, here = Path(out).resolve(), rd.path.resolve()
    from_export = (rd.path / "index.json").is_file() and not rd.holds_run
    if from_export and target.is_relative_to(here):  # a merged export made from an export
        return f"{out}: inside the export it is made from, {rd.path}; export into another folder"
    for folder in (target, *target.parents):
        run = RunDir(folder)
        if (folder == here and not from_export) or run.holds_run:
            exports = run.exports.resolve()
            if folder != here or target == exports or not target.is_relative_to(exports):
                whose = "this run's own files" if folder == here else f"the files of another run, {folder}"
                return (f"{out}: among {whose} (checkpoints, data, exports); export into "
                        f"{rd.export_dir(fmt)} (the default) or a folder outside any run directory")
            break
    manifest = target / "manifest.json"
    if from_export or not manifest.is_file():
        return None
    info = read_json(manifest)
    if not isinstance(info, dict):
        return f"{out}: holds a manifest.json that is not an export's; export into an empty folder"
    if not holds_export(rd, target, info):
        source = Path(str(info.get("checkpoint", ""))).resolve().parent
        return (f"{out}: holds an export of another run ({source.parent}); its users and this run's would mix: "
                "export into an empty folder")
    if info.get("format") != fmt:
        return (f"{out}: holds this run's --format {info.get('format')} export; "
                f"export --format {fmt} into another folder")
    return None


def _recorded(rd: RunDir, say: bool = True) -> list[Path]:
    """The folders ``exports-elsewhere.jsonl`` names; a line that cannot be read is named (``say``)."""
    if not rd.exports_elsewhere.is_file():
        return []
    found = []
    lines = rd.exports_elsewhere.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            found.append(Path(json.loads(line)["out"]))
        except (ValueError, KeyError, TypeError):
            if say:
                warn(f"{rd.exports_elsewhere}:{number}: not a record of an export ({line[:120]!r}): an export it "
                     "named is neither listed by `users` nor reached by `forget`; remove the users from it by hand")
    return found


def unfinished_exports(rd: RunDir) -> list[Path]:
    """Export folders of this run with no ``index.json``: an export killed before it wrote one
    (exports are recorded before their first row is written)."""
    # (no export/: the glob is empty; a record that cannot be read was named by export_indexes)
    candidates = [*rd.exports.glob("*/"), *_recorded(rd, say=False)]
    return [out for out in candidates if out.is_dir() and not (out / "index.json").is_file()]


def export_indexes(rd: RunDir) -> list[Path]:
    """The ``index.json`` of every export of this run: those under ``export/``, and those recorded
    elsewhere that still hold an export of one of this run's checkpoints (a folder since reused
    for something else is left alone)."""
    elsewhere = []
    for out in _recorded(rd):
        manifest = out / "manifest.json"
        if not ((out / "index.json").is_file() and manifest.is_file()):
            continue
        info = read_json(manifest)
        if not isinstance(info, dict):
            warn(f"{manifest}: cannot be read, so whose export {out} is cannot be told: neither listed by `users` "
                 "nor reached by `forget`; remove the users from it by hand, or delete it")
        elif holds_export(rd, out, info):
            elsewhere.append(out / "index.json")
    return sorted(rd.exports.glob("*/index.json")) + elsewhere

"""``--format packed``: ``pack-NNNNN.safetensors`` files of up to ``pack_size`` users' rows each
(their ids in the file's metadata), ``index.json`` of user -> ``[file, row]`` and the layout in
``manifest.json``: for populations where a folder per user is too many files. ``read_packed``
reads rows back; ``serve`` and ``generate`` read the export by slices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from flora_train.adapters import AdapterLayout
from flora_train.export.base import ExportError, ExportRequest, count_users, indexed, write_json
from flora_train.export.flora import FloraExport
from flora_train.export.rows import RowExport
from flora_train.errors import warn
from flora_train.files import UnreadableTensors, open_tensors, read_json, save_tensors


def _generation(name: str) -> int:
    """``pack-00003.2.safetensors`` is generation 2 of its pack (written again by a forget or over an
    earlier export); ``pack-00003.safetensors`` generation 0."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0


def pack_of(out: Path, user: str, entry: Any) -> tuple[Path, int]:
    """The pack file and row that ``index.json`` gives ``user`` (``[file, row]``), refused unless
    the file is one inside ``out``."""
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], int)):
        raise ExportError(f"{out / 'index.json'}: user {user!r}: expected [pack file, row], got {entry!r}")
    return indexed(out, user, entry[0]), entry[1]


class PackedExport(RowExport):

    def export(self, request: ExportRequest) -> dict[str, Any]:
        if request.pack_size < 1:
            raise ExportError(f"--pack-size must be >= 1, got {request.pack_size}")
        self.pack_size = request.pack_size
        self.pack: tuple[list[str], list[torch.Tensor]] = ([], [])
        # Over an earlier export in this folder, new packs take new names: a server reading the old
        # index meanwhile keeps finding its users' rows where it says, never another user's.
        older = [_generation(p.name) for p in request.out.glob("pack-*.safetensors")]
        self.generation = max(older) + 1 if older else 0
        return super().export(request)

    def place(self, out: Path, user: str, row: torch.Tensor, layout: AdapterLayout, base_model: str) -> None:
        self.pack[0].append(user)  # a pack fills across chunks and shards
        self.pack[1].append(row.unsqueeze(0))
        if len(self.pack[0]) >= self.pack_size:
            self.finish(out)

    def finish(self, out: Path) -> None:
        users, rows = self.pack
        if not users:
            return
        prefix = "pack-" if self.part[1] == 1 else f"pack-{self.part[0]:05d}-"
        number = len({v[0] for v in self.index.values()})
        name = f"{prefix}{number:05d}{f'.{self.generation}' if self.generation else ''}.safetensors"
        save_tensors({"rows": torch.cat(rows).contiguous()}, out / name, metadata={"users": json.dumps(users)})
        self.index.update({u: [name, i] for i, u in enumerate(users)})
        users.clear()
        rows.clear()

    def manifest_extra(self, layout: AdapterLayout, shared: AdapterLayout | None) -> dict[str, Any]:
        return {"layout": layout.to_dict()}

    def serving_rows(self, folder: Path, manifest: dict[str, Any], index: dict[str, Any]) -> tuple[Any, Any]:
        from flora_train.inference.rows import PackedRows

        return AdapterLayout.from_dict(manifest["layout"]), PackedRows(folder, index)

    def write_shared(self, out: Path, layout: AdapterLayout, row: torch.Tensor, base_model: str) -> str:
        return FloraExport("flora").write_shared(out, layout, row, base_model)

    def drop_replaced(self, out: Path, old: dict[str, Any], new: dict[str, Any]) -> int:
        """The earlier export's pack files that the new index does not use (a new pack of the same
        name holds the new rows)."""
        kept = {entry[0] for entry in new.values()}
        dropped = {pack_of(out, u, entry)[0] for u, entry in old.items() if entry[0] not in kept}
        for pack in dropped:
            pack.unlink(missing_ok=True)
        return len(dropped)

    def forget(self, out: Path, forget: set[str]) -> int:
        """Each pack holding a forgotten user is written again without it under a new name, the index
        is replaced in one rename, then the old packs go: a reader finds the old index with the old
        packs or the new with the new, never an index whose rows point into a rewritten pack."""
        index = json.loads((out / "index.json").read_text())
        gone = [u for u in index if u in forget]
        for u in gone:  # every entry checked before anything is written
            pack_of(out, u, index[u])
        for name in sorted({index[u][0] for u in gone}):
            try:
                with open_tensors(out / name) as f:
                    users = json.loads((f.metadata() or {})["users"])
                    rows = f.get_tensor("rows")
            except UnreadableTensors as exc:
                # It may hold a forgotten user's bytes and nobody can read it: it goes, and the
                # index's other users in it with it (the run still holds their rows).
                lost = [u for u, where in index.items() if isinstance(where, list) and where[:1] == [name]
                        and u not in forget]
                for u in lost:
                    del index[u]
                warn(f"{exc}: removed while forgetting; the other user(s) it held leave the export too "
                     f"({len(lost)}: {', '.join(map(repr, lost[:5]))}{' ...' if len(lost) > 5 else ''}): "
                     "export them again from the run")
                continue
            keep = [i for i, u in enumerate(users) if u not in forget]
            fresh = f"{name.split('.')[0]}.{_generation(name) + 1}.safetensors"
            save_tensors({"rows": rows[keep].contiguous()}, out / fresh,
                         metadata={"users": json.dumps([users[i] for i in keep])})
            index.update({users[i]: [fresh, k] for k, i in enumerate(keep)})
        for u in gone:
            del index[u]
        if gone:  # (and the users of a pack removed unreadable with them)
            write_json(out / "index.json", index)
        count_users(out / "manifest.json", len(index))
        held = {where[0] for where in index.values()}
        for pack in out.glob("pack-*.safetensors"):  # the replaced packs (also those a killed forget left)
            if pack.name not in held:
                pack.unlink()
        return len(gone)


def read_packed(out: Path, users: list[str]) -> tuple[AdapterLayout, torch.Tensor]:
    """The rows ``[len(users), row_size]`` of users in a packed export, and its layout."""
    index, manifest = read_json(out / "index.json"), read_json(out / "manifest.json")
    if not isinstance(index, dict) or not isinstance(manifest, dict):
        raise ExportError(f"{out}: its index.json or manifest.json cannot be read (torn, or not an export)")
    if manifest.get("format") != "packed":
        raise ExportError(f"{out}: not a packed export")
    missing = [u for u in users if u not in index]
    if missing:
        raise ExportError(f"{out}: no such user(s) in the export: {', '.join(map(repr, missing[:5]))}")
    rows = []
    for u in users:
        path, i = pack_of(out, u, index[u])
        with open_tensors(path) as f:
            rows.append(f.get_slice("rows")[i : i + 1])
    return AdapterLayout.from_dict(manifest["layout"]), torch.cat(rows)

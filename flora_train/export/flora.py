"""``--format flora``: a flora_train folder per user, for any method (``flora_adapter.safetensors``
of the layout's tensors, ``flora_adapter_config.json`` with the layout); ``generate`` and
``serve`` read it, and ``load_flora_adapter`` reads one back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from flora_train.adapters import AdapterLayout
from flora_train.export.base import ExportError
from flora_train.export.folders import FolderExport, read_adapter_folder
from flora_train.files import save_tensors

FLORA_CONFIG = "flora_adapter_config.json"
FLORA_WEIGHTS = "flora_adapter.safetensors"


class FloraExport(FolderExport):

    def write_adapter(self, target: Path, layout: AdapterLayout, row: torch.Tensor, user: str, base_model: str) -> None:
        tensors = {f"{m}.{p}": v[0].contiguous() for m in layout.slices for p, v in layout.views(row.unsqueeze(0), m).items()}
        save_tensors(tensors, target / FLORA_WEIGHTS, metadata={"user_id": user})
        config = {"format": "flora_train", "user_id": user, "base_model": base_model, "layout": layout.to_dict()}
        (target / FLORA_CONFIG).write_text(json.dumps(config, indent=2))

    def serving_rows(self, folder: Path, manifest: dict[str, Any], index: dict[str, Any]) -> tuple[Any, Any]:
        from flora_train.inference.rows import FolderRows

        for user, sub in index.items():
            if not (folder / sub).is_dir():
                raise ExportError(f"{folder}: user {user!r}'s folder {sub!r} is missing")
        layout, _ = load_flora_adapter(folder / next(iter(index.values())))

        def read(place: Path, user: str) -> torch.Tensor:
            theirs, row = load_flora_adapter(place)
            if layout.compatible_with(theirs):
                raise ExportError(f"{place}: user {user!r} was exported with another layout than the others")
            return row

        return layout, FolderRows(folder, index, read)


def load_flora_adapter(folder: Path) -> tuple[AdapterLayout, torch.Tensor]:
    """Reads a folder written by ``--format flora`` back as ``(layout, row [row_size])``.

    The row plugs into a model prepared with ``inject_adapters`` for the same layout:
    ``with slot.activate(row[None], torch.zeros(batch, dtype=torch.long)): model(...)``.
    """
    config, tensors = read_adapter_folder(folder, FLORA_CONFIG, FLORA_WEIGHTS)
    if config.get("format") != "flora_train":
        raise ExportError(f"{folder}: not a flora_train adapter folder")
    layout = AdapterLayout.from_dict(config["layout"])
    row = torch.empty(layout.row_size, dtype=torch.float32)
    for module, params in layout.slices.items():
        for name, s in params.items():
            key = f"{module}.{name}"
            if key not in tensors or tuple(tensors[key].shape) != s.shape:
                raise ExportError(f"{folder}: tensor {key} missing or of the wrong shape")
            row[s.offset : s.offset + s.numel] = tensors[key].reshape(-1)
    return layout, row

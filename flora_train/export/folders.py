"""Formats with one folder per user (``index.json``: user id -> folder)."""

from __future__ import annotations

import json
from abc import abstractmethod
from pathlib import Path
from typing import Any

import torch

from flora_train.adapters import AdapterLayout
from flora_train.adapters.shared import SHARED_USER
from flora_train.export.base import SHARED_FOLDER, ExportError, inside, safe_folder_name
from flora_train.export.rows import RowExport
from flora_train.files import UnreadableTensors, load_tensors


class FolderExport(RowExport):
    @abstractmethod
    def write_adapter(self, target: Path, layout: AdapterLayout, row: torch.Tensor, user: str, base_model: str) -> None:
        """One adapter's files in the folder ``target``."""

    def place(self, out: Path, user: str, row: torch.Tensor, layout: AdapterLayout, base_model: str) -> None:
        folder = safe_folder_name(user)
        target = inside(out, folder)
        target.mkdir(exist_ok=True)
        self.write_adapter(target, layout, row, user, base_model)
        self.index[user] = folder

    def write_shared(self, out: Path, layout: AdapterLayout, row: torch.Tensor, base_model: str) -> str:
        target = out / SHARED_FOLDER
        target.mkdir(exist_ok=True)
        self.write_adapter(target, layout, row, SHARED_USER, base_model)
        return SHARED_FOLDER


def read_adapter_folder(folder: Path, config: str, weights: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One user's folder as written: its JSON ``config`` (an object) and its ``weights``' tensors;
    a file missing, cut short or not what it should be is an ``ExportError`` naming it."""
    try:
        settings = json.loads((folder / config).read_text())
        tensors = load_tensors(folder / weights)
    except (OSError, ValueError) as exc:  # (a cut weights file names itself)
        raise ExportError(str(exc) if isinstance(exc, UnreadableTensors)
                          else f"{folder}: the adapter cannot be read: {exc}") from None
    if not isinstance(settings, dict):
        raise ExportError(f"{folder / config}: not an adapter config (a JSON object)")
    return settings, tensors

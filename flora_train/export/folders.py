"""Formats with one folder per user (``index.json``: user id -> folder)."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

import torch

from flora_train.adapters import AdapterLayout
from flora_train.adapters.shared import SHARED_USER
from flora_train.export.base import SHARED_FOLDER, inside, safe_folder_name
from flora_train.export.rows import RowExport


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

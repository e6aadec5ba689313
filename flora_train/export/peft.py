"""``--format peft``: PEFT's own folders (``adapter_config.json``, ``adapter_model.safetensors``)
for LoRA and IA3, which PEFT, vLLM and LoRAX load as they are, and ``serve`` and ``generate`` read
back (the manifest keeps the layout the tensors go into). A shared adapter is written as PEFT too,
to be loaded under each user's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from flora_train.adapters import AdapterLayout
from flora_train.export.base import SHARED_FOLDER, ExportError, indexed
from flora_train.export.folders import FolderExport, read_adapter_folder
from flora_train.files import save_tensors


class PeftExport(FolderExport):

    def check(self, layout: AdapterLayout, what: str) -> None:
        if layout.spec.impl.peft_type is None:
            raise ExportError(f"PEFT has no {layout.spec.method} adapter for {what} adapter; use --format flora")

    def write_adapter(self, target: Path, layout: AdapterLayout, row: torch.Tensor, user: str, base_model: str) -> None:
        spec = layout.spec
        tensors = {}
        for module in layout.slices:
            views = {k: v[0] for k, v in layout.views(row.unsqueeze(0), module).items()}
            tensors.update(spec.impl.peft_tensors(module, views))
        save_tensors(tensors, target / WEIGHTS)
        (target / CONFIG).write_text(json.dumps(peft_config(layout, base_model), indent=2))

    def manifest_extra(self, layout: AdapterLayout, shared: AdapterLayout | None) -> dict[str, Any]:
        return {"layout": layout.to_dict(), **({} if shared is None else {"shared_layout": shared.to_dict()})}

    def serving_rows(self, folder: Path, manifest: dict[str, Any], index: dict[str, Any]) -> tuple[Any, Any]:
        from flora_train.inference.rows import FolderRows

        layout = _manifest_layout(folder, manifest)
        for user, sub in index.items():
            if not indexed(folder, user, sub).is_dir():
                raise ExportError(f"{folder}: user {user!r}'s folder {sub!r} is missing")
        return layout, FolderRows(folder, index, lambda place, user: load_peft_adapter(place, layout, f"user {user!r}"))

    def shared_adapter(self, folder: Path, manifest: dict[str, Any]) -> tuple[AdapterLayout, torch.Tensor]:
        layout = _manifest_layout(folder, manifest, "shared_layout")
        return layout, load_peft_adapter(folder / SHARED_FOLDER, layout, "the shared adapter")


CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# The config keys that change what the tensors compute: a folder whose config says otherwise than
# the export wrote (edited for another server, say) is refused, not served with other arithmetic.
_CONFIG_KEYS = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "feedforward_modules",
                "fan_in_fan_out")


def peft_config(layout: AdapterLayout, base_model: str) -> dict[str, Any]:
    spec, targets = layout.spec, [m for m, _, _ in layout.modules]
    return spec.impl.peft_config(spec.rank, spec.alpha, targets, [m for m in targets if spec.is_feedforward(m)],
                                 base_model, fan_in_fan_out=any(m in layout.transposed for m in targets))


def _manifest_layout(folder: Path, manifest: dict[str, Any], key: str = "layout") -> AdapterLayout:
    if key not in manifest:
        raise ExportError(f"{folder}: a PEFT export written before PEFT exports kept their layout; export the run "
                          "again to serve it (or serve the run directory)")
    return AdapterLayout.from_dict(manifest[key])


def load_peft_adapter(folder: Path, layout: AdapterLayout, whose: str) -> torch.Tensor:
    """One PEFT folder of this export read back as a row of ``layout`` (``whose``, for errors)."""
    config, tensors = read_adapter_folder(folder, CONFIG, WEIGHTS)
    want = peft_config(layout, "")
    for key in _CONFIG_KEYS:
        if key in want and config.get(key) != want[key]:
            raise ExportError(f"{folder / CONFIG}: {key} is {config.get(key)!r} where the export wrote {want[key]!r}; "
                              f"{whose} would compute something else than it was trained to")
    impl, row, read = layout.spec.impl, torch.empty(layout.row_size, dtype=torch.float32), set()
    for module, params in layout.slices.items():
        for key, name in impl.peft_keys(module, params).items():
            s, value = params[name], tensors.get(key)
            if value is None or tuple(value.shape) != impl.peft_shape(name, s.shape):
                got = "missing" if value is None else f"of shape {tuple(value.shape)}"
                raise ExportError(f"{folder / WEIGHTS}: {key} is {got}, not {impl.peft_shape(name, s.shape)}")
            row[s.offset : s.offset + s.numel] = value.reshape(-1)
            read.add(key)
    if extra := sorted(set(tensors) - read):
        raise ExportError(f"{folder / WEIGHTS}: tensors for modules this export did not adapt: {extra[:3]}")
    return row

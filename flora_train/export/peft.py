"""``--format peft``: PEFT's own folders (``adapter_config.json``, ``adapter_model.safetensors``)
for LoRA and IA3, which PEFT, vLLM and LoRAX load as they are. A shared adapter is written as
PEFT too, to be loaded under each user's."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flora_train.adapters import AdapterLayout
from flora_train.export.base import ExportError
from flora_train.export.folders import FolderExport
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
        save_tensors(tensors, target / "adapter_model.safetensors")
        targets = [m for m, _, _ in layout.modules]
        config = spec.impl.peft_config(spec.rank, spec.alpha, targets, [m for m in targets if spec.is_feedforward(m)],
                                       base_model, fan_in_fan_out=any(m in layout.transposed for m in targets))
        (target / "adapter_config.json").write_text(json.dumps(config, indent=2))

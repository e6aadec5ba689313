"""``--format merged``: per user, an ordinary Hugging Face model folder with the
user's adapter folded into the weights (FLoRA ``W ∘ mask``, LoRA ``W + s·BA``, IA3 ``W ∘ a``),
loadable by ``AutoModelForCausalLM`` and so by any server, at the cost of a full copy per user."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from flora_train.adapters.layer import is_conv1d
from flora_train.export.base import (
    AdapterExport,
    ExportError,
    ExportRequest,
    close_matches,
    inside,
    safe_folder_name,
    write_json,
)
from flora_train.files import replaced_folder
from flora_train.run_dir.checkpoints import read_manifest


def merged_state_dict(model: torch.nn.Module, base: dict[str, torch.Tensor], layout: Any, row: torch.Tensor) -> dict[str, torch.Tensor]:
    """``base`` (the plain model's state dict) with every adapted layer's weight (and, for IA3 on
    output layers, bias) replaced by the user's merged one. Other tensors are shared, not copied."""
    spec = layout.spec
    out = dict(base)
    for module in layout.slices:
        views = {k: v[0] for k, v in layout.views(row.unsqueeze(0), module).items()}
        transposed = is_conv1d(model.get_submodule(module))  # GPT-2's Conv1D keeps [in, out]
        weight = base[f"{module}.weight"]
        w = weight.t() if transposed else weight
        merged = spec.impl.dense_weight(w.float(), {k: v.float() for k, v in views.items()}, spec.scaling)
        out[f"{module}.weight"] = (merged.t() if transposed else merged).to(weight.dtype).contiguous()
        if f"{module}.bias" in base:
            bias = base[f"{module}.bias"]
            merged_bias = spec.impl.dense_bias(bias.float(), {k: v.float() for k, v in views.items()})
            out[f"{module}.bias"] = merged_bias.to(bias.dtype).contiguous()
    return out


def export_merged(source_dir: Path, users: list[str], out: Path, checkpoint: Path | None = None,
                  dtype: str = "float32", base: Path | None = None) -> dict[str, str]:
    """One merged model folder per user under ``out`` (``index.json`` maps users to folders, and
    ``manifest.json`` says what they were merged from)."""
    from flora_train.base import load_frozen_model, load_tokenizer
    from flora_train.inference.trained import resolve_source

    source = resolve_source(source_dir, checkpoint, base)
    unknown = [u for u in users if u not in source.rows]
    if unknown:
        raise ExportError(f"unknown user(s) not in {source.label}: {close_matches(unknown, source.rows.users)}")
    model = load_frozen_model(source.model_path, dtype, source.gguf_file, source.trust_remote_code)
    tokenizer = load_tokenizer(source.model_path, source.gguf_file, source.trust_remote_code)
    base = {k: v.detach() for k, v in model.state_dict().items()}
    if source.shared is not None:  # every user's row sits on the shared adapter: fold it first, once
        base = merged_state_dict(model, base, source.shared.layout, source.shared.row)
    out.mkdir(parents=True, exist_ok=True)
    index = {}
    for user in users:
        folder = safe_folder_name(user)
        target = inside(out, folder)
        state = merged_state_dict(model, base, source.layout, source.rows.read([user])[0])
        try:  # a folder there is a whole model, never one a full disk cut short
            with replaced_folder(target) as staging:
                model.save_pretrained(staging, state_dict=state, safe_serialization=True)
                tokenizer.save_pretrained(staging)
                (staging / "flora_merged.json").write_text(json.dumps(
                    {"user_id": user, "base_model": source.model_path, "method": source.layout.spec.method,
                     "from": source.label}))
        except OSError as exc:
            raise ExportError(f"writing the export to {out} failed: {exc}") from None
        index[user] = folder
    write_json(out / "index.json", index)
    # which run (a checkpoint's manifest names it, and an export's from one): the run directory may move
    exported = Path(source.label) / "manifest.json"
    made_from = (read_manifest(source.checkpoint) if source.checkpoint
                 else json.loads(exported.read_text()) if exported.is_file() else {})
    manifest = {"format": "merged", "method": source.layout.spec.method, "num_users": len(index),
                "checkpoint": str(Path(source.label).absolute()), "base_model": source.model_path, "dtype": dtype,
                "run_id": made_from.get("run_id")}
    write_json(out / "manifest.json", manifest)
    return index


class MergedExport(AdapterExport):

    def export(self, request: ExportRequest) -> dict[str, Any]:
        if not request.users:
            raise ExportError("--format merged writes a whole model per user: name them with --users a,b (or @FILE)")
        export_merged(request.run_dir, request.users, request.out, request.checkpoint, base=request.base)
        return json.loads((request.out / "manifest.json").read_text())

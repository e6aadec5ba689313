"""Per-user adapters out of a run: PEFT folders (LoRA, IA3), flora_train safetensors folders, or
packed files for populations where a folder per user is too many files.

Each user gets a folder named from a sanitised form of its id plus a hash of the full id, so no
id (``../../etc/passwd``, NUL bytes, unicode look-alikes) can name a path outside ``out`` or
collide with another user's folder. ``index.json`` maps user ids to folders. ``packed`` writes
``pack-NNNNN.safetensors`` files of up to ``pack_size`` users' rows each (with their ids in the
file's metadata) and an ``index.json`` of user -> [file, row]. Rows are streamed from the
checkpoint's shards a chunk at a time, so export memory does not grow with the population.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flora_train.adapters import AdapterLayout
from flora_train.adapters.shared import SHARED_USER
from flora_train.errors import UserError
from flora_train.run_dir import RunDir
from flora_train.run_dir.checkpoints import (
    CheckpointError,
    checkpoint_chain,
    latest_checkpoint,
    read_shared_adapter,
    read_state,
    saved_layout,
    verify_checkpoint,
)
from flora_train.store.registry import UserRegistry
from flora_train.store.saved import iter_saved_rows, saved_user_ids

FLORA_CONFIG = "flora_adapter_config.json"
FLORA_WEIGHTS = "flora_adapter.safetensors"
# adapter.shared's adapter, once beside the users' (no user folder can be named so: they end in a hash).
SHARED_FOLDER = "shared-adapter"


class ExportError(UserError, ValueError):
    pass


def safe_folder_name(user_id: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", user_id).strip("._-")[:64] or "user"
    digest = hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{stem}-{digest}"


def _inside(out: Path, folder: str) -> Path:
    target = (out / folder).resolve()
    if not target.is_relative_to(out.resolve()) or target == out.resolve():
        raise ExportError(f"refusing to write outside {out}: {folder!r}")
    return target


def _load_run(run_dir: Path, checkpoint: Path | None) -> tuple[AdapterLayout, UserRegistry, Path, dict[str, Any]]:
    if checkpoint is not None:
        ckpt = checkpoint
        verify_checkpoint(ckpt, contents=False)  # the caller wrote it (and hashed it) a moment ago
    else:
        ckpt = latest_checkpoint(run_dir)  # hashed through: the newest intact one
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no intact checkpoint to export from")
    layout = saved_layout(ckpt)
    registry = UserRegistry(saved_user_ids(checkpoint_chain(ckpt)))  # every shard, whatever world size saved it
    state = read_state(ckpt)
    return layout, registry, ckpt, state


def _select_users(registry: UserRegistry, users: list[str] | None) -> list[str]:
    if not users:
        return registry.ids
    unknown = [u for u in users if u not in registry]
    if unknown:
        hints = []
        for u in unknown[:5]:
            close = difflib.get_close_matches(u, registry.ids, n=1)
            hints.append(f"{u!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ExportError(f"unknown user(s) not in this run: {', '.join(hints)}" + (" ..." if len(unknown) > 5 else ""))
    return list(dict.fromkeys(users))


def _peft_tensors(layout: AdapterLayout, row: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for module in layout.slices:
        views = {k: v[0] for k, v in layout.views(row.unsqueeze(0), module).items()}
        out.update(layout.spec.impl.peft_tensors(module, views))
    return out


def _peft_config(layout: AdapterLayout, base_model: str) -> dict[str, Any]:
    spec = layout.spec
    targets = [m for m, _, _ in layout.modules]
    return spec.impl.peft_config(spec.rank, spec.alpha, targets, [m for m in targets if spec.is_feedforward(m)], base_model)


def _run_recipe(run_dir: Path) -> Any:
    recipe = RunDir(run_dir).recipe
    if not recipe.is_file():
        return None
    from flora_train.config import load_recipe

    return load_recipe(recipe)


def _base_details(cfg: Any) -> dict[str, Any]:
    """What loading the base and the untrained rows needs beyond its path (for serving an export)."""
    return {} if cfg is None else {"gguf_file": cfg.base.gguf_file, "init_seed": cfg.store.init_seed}


def export_adapters(run_dir: Path, fmt: str, users: list[str] | None, out: Path,
                    checkpoint: Path | None = None, base_model_id: str | None = None, pack_size: int = 4096,
                    part: tuple[int, int] = (0, 1),
                    gather: Callable[[Any], list[Any]] = lambda piece: [piece]) -> dict[str, Any]:
    """Writes one folder per user under ``out`` (or packs, ``fmt="packed"``) plus ``index.json`` and
    ``manifest.json``, from ``checkpoint`` (one this process just wrote) or else the run's newest
    intact checkpoint.

    Over ranks: each of ``n`` processes calls it with ``part=(k, n)`` and writes the users whose
    rows rank ``k``'s shards hold (``k % n`` when the checkpoint was saved by another world size);
    ``gather`` (an all-gather) collects every part's index, and part 0 writes ``index.json`` and
    ``manifest.json`` once every part's files are written."""
    layout, registry, ckpt, state = _load_run(Path(run_dir), checkpoint)
    if fmt == "peft" and layout.spec.impl.peft_type is None:
        raise ExportError(f"PEFT has no {layout.spec.method} adapter matching flora_train's; use --format flora")
    if fmt not in ("peft", "flora", "packed"):
        raise ExportError(f"unknown export format {fmt!r}; expected peft, flora or packed")
    selected = _select_users(registry, users)
    saved_shared = read_shared_adapter(ckpt)
    shared = None if saved_shared is None else (AdapterLayout.from_dict(json.loads(saved_shared[1]["layout"])), saved_shared[0]["row"])
    if fmt == "peft" and shared is not None and shared[0].spec.impl.peft_type is None:
        raise ExportError(f"PEFT has no {shared[0].spec.method} adapter for this run's shared adapter; use --format flora")
    out.mkdir(parents=True, exist_ok=True)
    cfg = _run_recipe(Path(run_dir))
    base_model = base_model_id or RunDir(run_dir).trained_base(state.get("model_path"), cfg is not None and cfg.base.tiny is not None)
    index: dict[str, Any] = {}
    pack: tuple[list[str], list[torch.Tensor]] = ([], [])

    prefix = "pack-" if part[1] == 1 else f"pack-{part[0]:05d}-"

    def flush_pack() -> None:
        if pack[0]:
            name = f"{prefix}{len({v[0] for v in index.values()}):05d}.safetensors"
            save_file({"rows": torch.cat(pack[1]).contiguous()}, str(out / name), metadata={"users": json.dumps(pack[0])})
            index.update({u: [name, i] for i, u in enumerate(pack[0])})
            pack[0].clear()
            pack[1].clear()

    def write_part() -> None:
        for chunk_users, chunk_rows in iter_saved_rows(checkpoint_chain(ckpt), set(selected), part=part):
            if fmt == "packed":
                start = 0
                while start < len(chunk_users):  # a pack fills across chunks and shards
                    room = pack_size - len(pack[0])
                    pack[0].extend(chunk_users[start : start + room])
                    pack[1].append(chunk_rows[start : start + room])
                    start += room
                    if len(pack[0]) >= pack_size:
                        flush_pack()
                continue
            for user, row in zip(chunk_users, chunk_rows):
                folder = safe_folder_name(user)
                target = _inside(out, folder)
                target.mkdir(exist_ok=True)
                _write_adapter(target, fmt, layout, row, user, base_model)
                index[user] = folder
        flush_pack()

    error = None
    try:
        write_part()
    except OSError as exc:  # a full disk on one rank: every rank stops, none waits in the gather
        error = f"rank {part[0]}: writing the export to {out} failed: {exc}"
    pieces = gather((index, error))
    failed = [e for _, e in pieces if e]
    if failed:
        raise ExportError("; ".join(failed))
    merged = {u: place for piece, _ in pieces for u, place in piece.items()}
    index = {u: merged[u] for u in selected}  # the caller's order (or the checkpoint's), not the shards'
    manifest = {"format": fmt, "method": layout.spec.method, "rank": layout.spec.rank, "num_users": len(index),
                "users_per_part": [len(p) for p, _ in pieces], "checkpoint": str(ckpt), "base_model": base_model,
                **_base_details(cfg)}
    if fmt == "packed":
        manifest["layout"] = layout.to_dict()
    if part[0] == 0 and shared is not None:
        manifest["shared_adapter"] = _write_shared(out, fmt, shared, base_model)
    if part[0] == 0:
        (out / "index.json").write_text(json.dumps(index, indent=2, ensure_ascii=False))
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _write_adapter(target: Path, fmt: str, layout: AdapterLayout, row: torch.Tensor, user: str, base_model: str) -> None:
    """One adapter's folder: PEFT's files for ``fmt="peft"``, else the flora format."""
    if fmt == "peft":
        save_file(_peft_tensors(layout, row), str(target / "adapter_model.safetensors"))
        (target / "adapter_config.json").write_text(json.dumps(_peft_config(layout, base_model), indent=2))
    else:
        _write_flora(target, layout, row, user, base_model)


def _write_flora(target: Path, layout: AdapterLayout, row: torch.Tensor, user: str, base_model: str) -> None:
    tensors = {f"{m}.{p}": v[0].contiguous() for m in layout.slices for p, v in layout.views(row.unsqueeze(0), m).items()}
    save_file(tensors, str(target / FLORA_WEIGHTS), metadata={"user_id": user})
    config = {"format": "flora_train", "user_id": user, "base_model": base_model, "layout": layout.to_dict()}
    (target / FLORA_CONFIG).write_text(json.dumps(config, indent=2))


def _write_shared(out: Path, fmt: str, shared: tuple[AdapterLayout, torch.Tensor], base_model: str) -> str:
    """The shared adapter once, beside the users': as PEFT for a peft export (to load under each
    user's), else in the flora format. Returns its folder's name (the manifest's ``shared_adapter``)."""
    target = out / SHARED_FOLDER
    target.mkdir(exist_ok=True)
    _write_adapter(target, fmt, *shared, SHARED_USER, base_model)
    return SHARED_FOLDER


def read_packed(out: Path, users: list[str]) -> tuple[AdapterLayout, torch.Tensor]:
    """The rows ``[len(users), row_size]`` of users in a packed export, and its layout."""
    index = json.loads((out / "index.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    if manifest.get("format") != "packed":
        raise ExportError(f"{out}: not a packed export")
    missing = [u for u in users if u not in index]
    if missing:
        raise ExportError(f"{out}: no such user(s) in the export: {', '.join(map(repr, missing[:5]))}")
    rows = []
    for u in users:
        name, i = index[u]
        with safe_open(str(out / name), framework="pt") as f:
            rows.append(f.get_slice("rows")[i : i + 1])
    return AdapterLayout.from_dict(manifest["layout"]), torch.cat(rows)


def load_flora_adapter(folder: Path) -> tuple[AdapterLayout, torch.Tensor]:
    """Reads a folder written by ``export_adapters(fmt="flora")`` back as ``(layout, row [row_size])``.

    The row plugs into a model prepared with ``inject_adapters`` for the same layout:
    ``with slot.activate(row[None], torch.zeros(batch, dtype=torch.long)): model(...)``.
    """
    config = json.loads((folder / FLORA_CONFIG).read_text())
    if config.get("format") != "flora_train":
        raise ExportError(f"{folder}: not a flora_train adapter folder")
    layout = AdapterLayout.from_dict(config["layout"])
    tensors = load_file(str(folder / FLORA_WEIGHTS))
    row = torch.empty(layout.row_size, dtype=torch.float32)
    for module, params in layout.slices.items():
        for name, s in params.items():
            key = f"{module}.{name}"
            if key not in tensors or tuple(tensors[key].shape) != s.shape:
                raise ExportError(f"{folder}: tensor {key} missing or of the wrong shape")
            row[s.offset : s.offset + s.numel] = tensors[key].reshape(-1)
    return layout, row

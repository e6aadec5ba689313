"""Who is in a run (`flora-train users`) and removing users from it (`flora-train forget`).

Forgetting a user removes every copy of its adapter and of what was learnt or measured about it
from the run directory: its rows and optimizer state from every retained checkpoint (each
rewritten beside the old one and renamed into place, manifest rehashed), its export folders and
index entries, its lines in every JSONL file (per-user evaluations, their MLflow artifact copies,
generated data), its data hash in each training phase's file, the tokenised data cache and the disk tier's files (both derived, rebuilt by the
next run from the checkpoint and the data). Every other user's bytes are left exactly as they
were. Source data outside the run directory belongs to its owner and is not touched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from flora_train.export import ExportError
from flora_train.train.phases import check_phase_files, forget_in_phases
from flora_train.store.saved import checkpoint_chain, iter_shards
from flora_train.train.checkpoint import MANIFEST, file_entry, latest_checkpoint, list_checkpoints


def list_users(run_dir: Path) -> list[dict[str, Any]]:
    """Per user: steps trained, target tokens in its training data, last held-out loss and
    accuracy, and its export folder(s)."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise ExportError(f"{run_dir}: no intact checkpoint (is it a run directory?)")
    steps: dict[str, int] = {}
    for member in checkpoint_chain(ckpt):
        for path, users in iter_shards(member):
            with safe_open(str(path), framework="pt") as f:
                counts = f.get_tensor("optim.step").tolist()
            steps.update(zip(users, counts))
    tokens = _tokens(run_dir)
    evals = sorted((run_dir / "eval").glob("per_user-step*.jsonl"), key=lambda p: int(p.stem.split("step")[1]))
    last = {}
    if evals:
        for line in evals[-1].read_text().splitlines():
            r = json.loads(line)
            last[r["user_id"]] = r
    exports: dict[str, list[str]] = {}
    for index in sorted((run_dir / "export").glob("*/index.json")):
        for user, where in json.loads(index.read_text()).items():
            # A folder per user, or [pack file, row] in a packed export.
            place = f"{index.parent / where[0]}#{where[1]}" if isinstance(where, list) else str(index.parent / where)
            exports.setdefault(user, []).append(place)
    return [{"user_id": u, "steps": steps[u], "tokens": tokens.get(u), "eval_loss": last.get(u, {}).get("loss"),
             "eval_accuracy": last.get(u, {}).get("accuracy"), "export": exports.get(u, [])} for u in sorted(steps)]


def _tokens(run_dir: Path) -> dict[str, int]:
    from flora_train.data import cache

    caches = [p for p in (run_dir / "data_cache").glob("*") if cache.is_complete(p)] if (run_dir / "data_cache").is_dir() else []
    if not caches:
        return {}
    train = cache.load(caches[0])[0]["train"]
    counts = train.target_counts()
    return {u: int(counts[idx].sum()) for u, idx in train.by_user().items()}


def _rewrite_checkpoint(ckpt: Path, forget: set[str]) -> int:
    """Writes ``ckpt`` without ``forget``'s rows beside it, then renames it into place; returns
    how many of its saved users were removed."""
    tmp = ckpt.parent / f".forget-{ckpt.name}"
    old = ckpt.parent / f".forgotten-{ckpt.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt, tmp)
    manifest = json.loads((tmp / MANIFEST).read_text())
    removed = 0
    for path, users in iter_shards(tmp):
        keep = [i for i, u in enumerate(users) if u not in forget]
        if len(keep) == len(users):
            continue
        removed += len(users) - len(keep)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k)[keep].contiguous() for k in f.keys()}
        meta["users"] = str(len(keep))
        path.unlink()  # a new file, not an overwrite in place: no old page survives in it
        save_file(tensors, str(path), metadata=meta)
        users_path = path.with_name(path.name.replace("store-", "users-").replace(".safetensors", ".json"))
        users_path.unlink()
        users_path.write_text(json.dumps({"user_ids": [users[i] for i in keep]}, ensure_ascii=False))
        for changed in (path, users_path):
            manifest["files"][changed.name] = file_entry(changed)
    plan_path = tmp / "shard_plan.json"
    if not plan_path.is_file():  # a delta naming its chain's plan: that file is rewritten on its own turn
        holder = json.loads((ckpt.parent / manifest["shard_plan_in"] / "shard_plan.json").read_text())
        manifest["users"] = sum(1 for u in holder["owners"] if u not in forget)
        plan = {"owners": {}}
    else:
        plan = json.loads(plan_path.read_text())
    owners = {u: r for u, r in plan["owners"].items() if u not in forget}
    if len(owners) != len(plan["owners"]):
        plan["owners"] = owners
        plan_path.write_text(json.dumps(plan, indent=2, ensure_ascii=False))
        manifest["files"]["shard_plan.json"] = file_entry(plan_path)
        manifest["users"] = len(owners)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    os.replace(ckpt, old)
    os.replace(tmp, ckpt)
    shutil.rmtree(old)
    return removed


def _filter_jsonl(path: Path, forget: set[str]) -> int:
    lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            user = json.loads(line).get("user_id")
        except (ValueError, AttributeError):
            user = None
        if user not in forget:
            kept.append(line)
    if len(kept) == len(lines):
        return 0
    tmp = path.with_name(path.name + ".forget")
    tmp.write_text("".join(kept), encoding="utf-8", errors="surrogateescape")
    os.replace(tmp, path)
    return len(lines) - len(kept)


def _forget_packed(out: Path, index: dict[str, list], forget: set[str]) -> int:
    """Rewrites each pack holding a forgotten user without it (a new file renamed in)."""
    gone = [u for u in index if u in forget]
    for name in sorted({index[u][0] for u in gone}):
        path = out / name
        with safe_open(str(path), framework="pt") as f:
            users = json.loads((f.metadata() or {})["users"])
            rows = f.get_tensor("rows")
        keep = [i for i, u in enumerate(users) if u not in forget]
        tmp = path.with_name(path.name + ".forget")
        save_file({"rows": rows[keep].contiguous()}, str(tmp), metadata={"users": json.dumps([users[i] for i in keep])})
        os.replace(tmp, path)
        index.update({users[i]: [name, k] for k, i in enumerate(keep)})
    for u in gone:
        del index[u]
    return len(gone)


def _forget_exports(run_dir: Path, forget: set[str]) -> int:
    removed = 0
    for index_path in sorted((run_dir / "export").glob("*/index.json")):
        manifest_path = index_path.with_name("manifest.json")
        packed = manifest_path.is_file() and json.loads(manifest_path.read_text()).get("format") == "packed"
        if packed:
            index = json.loads(index_path.read_text())
            n = _forget_packed(index_path.parent, index, forget)
            if n:
                removed += n
                index_path.write_text(json.dumps(index, indent=2, ensure_ascii=False))
                m = json.loads(manifest_path.read_text())
                m["num_users"] = len(index)
                manifest_path.write_text(json.dumps(m, indent=2, ensure_ascii=False))
            continue
        folders = json.loads(index_path.read_text())  # user id -> folder
        gone = [u for u in folders if u in forget]
        for u in gone:
            shutil.rmtree(index_path.parent / folders.pop(u), ignore_errors=True)
            removed += 1
        if gone:
            index_path.write_text(json.dumps(folders, indent=2, ensure_ascii=False))
            manifest = index_path.with_name("manifest.json")
            if manifest.is_file():
                m = json.loads(manifest.read_text())
                m["num_users"] = len(folders)
                manifest.write_text(json.dumps(m, indent=2, ensure_ascii=False))
    return removed


def forget_users(run_dir: Path, users: list[str]) -> dict[str, Any]:
    """Removes ``users`` from everything under ``run_dir`` (see the module doc); returns counts."""
    run_dir = Path(run_dir)
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise ExportError(f"{run_dir}: no checkpoints (is it a run directory?)")
    known = {u for c in ckpts if (c / MANIFEST).is_file() for _, users_of in iter_shards(c) for u in users_of}
    unknown = [u for u in users if u not in known]
    if unknown:
        raise ExportError(f"{run_dir}: no such user(s) in any checkpoint: {', '.join(map(repr, unknown[:5]))}")
    forget = set(users)
    check_phase_files(run_dir)
    # Half-written checkpoints and leftovers of an interrupted forget hold rows too.
    for stale in (run_dir / "checkpoints").glob(".*"):
        shutil.rmtree(stale, ignore_errors=True)
    rows = sum(_rewrite_checkpoint(c, forget) for c in ckpts if (c / MANIFEST).is_file())
    exports = _forget_exports(run_dir, forget)
    lines = sum(_filter_jsonl(p, forget) for p in sorted(run_dir.rglob("*.jsonl")) if "checkpoints" not in p.parts)
    phase_entries = forget_in_phases(run_dir, forget)
    derived = []
    for name in ("data_cache", "store_tier"):
        if (run_dir / name).exists():
            shutil.rmtree(run_dir / name)
            derived.append(name)
    return {"users": sorted(forget), "checkpoint_rows": rows, "checkpoints": len(ckpts), "export_folders": exports,
            "jsonl_lines": lines, "phase_entries": phase_entries, "removed_derived": derived}

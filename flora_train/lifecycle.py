"""Who is in a run (`flora-train users`) and removing users from it (`flora-train forget`).

Forgetting a user removes every copy of its adapter and of what was learnt or measured about it
from the run directory: its rows and optimizer state from every retained checkpoint (each
rewritten beside the old one and swapped into place, manifest rehashed), its export folders and
index entries, its lines in every JSONL file (per-user evaluations, their MLflow artifact copies,
generated data), its data hash in each training phase's file, the adapter shared by all users (it
was trained on the forgotten users' data too: retrain it), the tokenised data cache and the disk
tier's files (both derived, rebuilt by the next run from the checkpoint and the data). Every other
user's bytes are left exactly as they were. Runs ``train.overwrite`` moved aside into the
directory (``replaced/``) hold copies too and are reached the same way. A learning-rate sweep's
variant rows (``user@sweepK``) are their user's, and a finished sweep's chosen rates name users
too. Source data outside the run directory belongs to its owner and is not touched.

``forget`` takes the run's writer lock, so it never runs beside training. It first writes the users
it removes to ``forget-pending.json``; each step after that can be run again, so a ``forget`` killed
at any point is completed by running it again (the pending users count as known until then).
"""

from __future__ import annotations

import json
import shutil
import unicodedata
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from flora_train.errors import warn
from flora_train.export import ExportError, forget_in_export, forget_unindexed
from flora_train.export.base import select_users, write_json
from flora_train.files import UnreadableTensors, read_json, replace_text
from flora_train.run_dir import RunDir, RunLock, readers
from flora_train.run_dir.checkpoints import (
    SHARD_PLAN,
    SHARED_ADAPTER,
    TRAINER_STATE,
    CheckpointError,
    checkpoint_chain,
    latest_checkpoint,
    list_checkpoints,
    read_state,
    verify_checkpoint,
)
from flora_train.run_dir.exports import export_indexes, unfinished_exports
from flora_train.run_dir.layout import TornJournal
from flora_train.run_dir.rewrite import recover_rewrites, rewrite_checkpoint
from flora_train.store.saved import iter_shards, saved_selection, saved_steps, without_users
from flora_train.train.phases import check_phase_files, forget_in_phases
from flora_train.train.sweep import holds_variants, user_of


def list_users(run_dir: Path, users: list[str] | None = None) -> list[dict[str, Any]]:
    """Per user (of ``users``, in their order; every user when None): steps trained, target tokens in
    its training data, last held-out loss and accuracy, its export folder(s) and, for a run that
    selects (``train.select``/``patience``), the step its kept row is from, that row's validation
    loss and when it stopped."""
    rd = RunDir(run_dir)
    rd.require("users")
    ckpt = latest_checkpoint(rd.path)
    if ckpt is None:
        raise ExportError(f"{run_dir}: no intact checkpoint")
    steps = saved_steps(checkpoint_chain(ckpt))
    selection = saved_selection(checkpoint_chain(ckpt))
    # train.select: best keeps a row per user (its step and validation loss); patience alone stops users.
    keeps = any("kept_step" in v for v in selection.values())
    unvalidated = {**({"kept_step": None, "validation_loss": None} if keeps else {}), "stopped_after": None}
    swept = read_state(ckpt).get("sweep", {}).get("chosen", {})  # train.sweep: each user's chosen rate
    tokens = _tokens(rd)
    owner = _owner(ckpt)  # a sweep's variants train on their user's tokens
    evals = rd.per_user_evals()
    last = {}
    if evals:
        torn = 0
        for line in evals[-1].read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
                last[r["user_id"]] = r
            except (ValueError, KeyError, TypeError):
                torn += 1
        if torn:
            warn(f"{evals[-1]}: {torn} line(s) cannot be read; those users' last held-out scores are not listed")
    exports: dict[str, list[str]] = {}
    for index in export_indexes(rd):
        entries = read_json(index)
        if not isinstance(entries, dict):
            warn(f"{index}: cannot be read; the export's users are not listed")
            continue
        for user, where in entries.items():
            # A folder per user, or [pack file, row] in a packed export.
            place = f"{index.parent / where[0]}#{where[1]}" if isinstance(where, list) else str(index.parent / where)
            exports.setdefault(user, []).append(place)
    return [{"user_id": u, "steps": steps[u], "tokens": tokens.get(owner(u)), "eval_loss": last.get(u, {}).get("loss"),
             "eval_accuracy": last.get(u, {}).get("accuracy"), "export": exports.get(u, []),
             **({**unvalidated, **selection.get(u, {})} if selection else {}),
             **({"lr": swept.get(u)} if swept else {})}
            for u in (sorted(steps) if users is None else select_users(list(steps), users))]


def display_width(text: str) -> int:
    """Terminal columns ``text`` takes: East Asian wide characters and emoji two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def users_table(rows: list[dict[str, Any]]) -> list[str]:
    """``flora-train users``' table of ``list_users`` rows: ids whole (a UUID is 36 characters; a cut
    one cannot be pasted into --users), columns aligned by the width a terminal gives each id."""
    width = max([display_width("user"), *(display_width(r["user_id"]) for r in rows)])
    pad = lambda text: text + " " * (width - display_width(text))  # noqa: E731
    keeps = bool(rows) and "kept_step" in rows[0]
    stops = bool(rows) and "stopped_after" in rows[0]
    kept_head = (f" {'kept':>11s} {'val loss':>9s}" if keeps else "") + (f" {'stopped':>8s}" if stops else "")
    lines = [f"{pad('user')} {'steps':>6s} {'tokens':>8s} {'eval loss':>10s}{kept_head}  export"]
    for r in rows:
        loss = "-" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}"
        tokens = "-" if r["tokens"] is None else str(r["tokens"])
        kept = ""
        if keeps:  # the row it is served with: from which step (its phase's first: the identity)
            val = r["validation_loss"]
            val = "-" if val is None or val != val else f"{val:.4f}"
            step = "-" if r["kept_step"] is None else f"step {r['kept_step']}"
            kept = f" {step:>11s} {val:>9s}"
        if stops:
            kept += f" {'-' if r['stopped_after'] is None else str(r['stopped_after']):>8s}"
        lines.append(f"{pad(r['user_id'])} {r['steps']:6d} {tokens:>8s} {loss:>10s}{kept}  {', '.join(r['export']) or '-'}")
    return [*lines, f"{len(rows)} users"]


def _tokens(rd: RunDir) -> dict[str, int]:
    from flora_train.data import cache

    caches = [p for p in rd.data_cache.glob("*") if cache.is_complete(p)] if rd.data_cache.is_dir() else []
    if not caches:
        return {}
    try:
        train = cache.load(caches[0])[0]["train"]
    except cache.UnreadableCache as exc:
        warn(f"{exc}; tokens not counted (the next run tokenises the data again)")
        return {}
    counts = train.target_counts()
    return {u: int(counts[idx].sum()) for u, idx in train.by_user().items()}


def _owner(ckpt: Path) -> Callable[[str], str]:
    """The user a row of ``ckpt`` belongs to: until a sweep chooses, its rows are every user's
    variants (``user@sweepK``, ``train/sweep.py``); the rows of any other checkpoint are named by their
    users (an id that merely holds ``@sweep`` is its own)."""
    return user_of if holds_variants(read_state(ckpt)) else str


def _named_in_state(ckpt: Path) -> set[str]:
    """The users ``ckpt``'s trainer state names: a finished sweep's chosen rates, a running one's
    variants on their way to a stop (non-finite steps in a row), users whose updates were skipped."""
    state = read_state(ckpt)
    return (set(state.get("sweep", {}).get("chosen", {})) | {user_of(n) for n in state.get("nonfinite_streaks", {})}
            | set(state.get("skipped_updates", {})))


def _without_users(owner: Callable[[str], str], forget: set[str]):
    """The edit ``rewrite_checkpoint`` applies: every shard and the shard plan without the rows of
    the ``forget`` users (``owner``: whose a row is), and the trainer state without their sweep's
    chosen rates, non-finite streaks or skipped updates."""

    def edit(folder: Path, manifest: dict[str, Any]) -> int | None:
        for path, users in iter_shards(folder):
            without_users(path, users, {name for name in users if owner(name) in forget})
        state = read_state(folder)
        chosen, streaks = state.get("sweep", {}).get("chosen", {}), state.get("nonfinite_streaks", {})
        skipped = state.get("skipped_updates", {})
        if set(chosen) & forget or {owner(name) for name in streaks} & forget or set(skipped) & forget:
            if chosen:
                state["sweep"]["chosen"] = {u: lr for u, lr in chosen.items() if u not in forget}
            if streaks:
                state["nonfinite_streaks"] = {name: n for name, n in streaks.items() if owner(name) not in forget}
            if skipped:
                state["skipped_updates"] = {u: n for u, n in skipped.items() if u not in forget}
            replace_text(folder / TRAINER_STATE, json.dumps(state, indent=2, ensure_ascii=False))
        plan_path = folder / SHARD_PLAN
        if not plan_path.is_file():  # a delta naming its chain's plan: that file is rewritten on its own turn
            holder = json.loads((folder.parent / manifest["shard_plan_in"] / SHARD_PLAN).read_text())
            return sum(1 for u in holder["owners"] if owner(u) not in forget)
        plan = json.loads(plan_path.read_text())
        owners = {u: r for u, r in plan["owners"].items() if owner(u) not in forget}
        if len(owners) != len(plan["owners"]):
            plan["owners"] = owners
            replace_text(plan_path, json.dumps(plan, indent=2, ensure_ascii=False))
        return len(owners)

    return edit


def _saved_users(ckpt: Path) -> set[str]:
    return {u for _, users in iter_shards(ckpt) for u in users}


def _mentioned(ckpt: Path) -> set[str]:
    """Users a checkpoint names: in its shards or in its own shard plan."""
    plan = ckpt / SHARD_PLAN
    return _saved_users(ckpt) | (set(json.loads(plan.read_text())["owners"]) if plan.is_file() else set())


def _filter_jsonl(path: Path, forget: set[str]) -> int:
    lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            user = json.loads(line).get("user_id")
        except (ValueError, AttributeError):  # a line cut short: it goes if it names a forgotten user
            user = next((u for u in forget if json.dumps(u) in line or json.dumps(u, ensure_ascii=False) in line), None)
        if user not in forget:
            kept.append(line)
    if len(kept) == len(lines):
        return 0
    replace_text(path, "".join(kept), errors="surrogateescape")
    return len(lines) - len(kept)


def _forget_exports(rd: RunDir, forget: set[str]) -> tuple[int, list[str]]:
    """Removes the users from every export of the run, under ``export/`` and elsewhere (recorded by
    ``export --out``); returns how many places held one, and the exports elsewhere that did."""
    removed, elsewhere = 0, []
    inside = rd.exports.resolve()
    held_in: list[tuple[Path, int]] = []
    for index_path in export_indexes(rd):
        manifest = index_path.with_name("manifest.json")
        info = read_json(manifest)
        fmt = info.get("format") if isinstance(info, dict) else None
        if not isinstance(info, dict) and manifest.exists():
            warn(f"{manifest}: cannot be read (the export cannot be served: export it again); the forgotten users "
                 "are taken out of it by its index")
        if isinstance(read_json(index_path), dict):
            held = forget_in_export(index_path.parent, fmt, forget)  # then what no index names:
        else:  # torn: the users' folders by name and the packs by their metadata are still found
            warn(f"{index_path}: cannot be read (the export cannot be served: export it again); the forgotten users' "
                 "copies are looked for by name and in every pack")
            held = 0
        held_in.append((index_path.parent, held + forget_unindexed(index_path.parent, forget)))
    held_in += [(out, forget_unindexed(out, forget)) for out in unfinished_exports(rd)]
    for out, held in held_in:
        removed += held
        if held and not out.resolve().is_relative_to(inside):
            elsewhere.append(str(out))
    return removed, elsewhere


def forget_users(run_dir: Path, users: list[str]) -> dict[str, Any]:
    """Removes ``users`` from everything under ``run_dir`` (see the module doc); returns counts."""
    rd = RunDir(run_dir)
    rd.require("forget")
    with RunLock(rd.path, "flora-train forget"), ExitStack() as held:
        # The run and the runs train.overwrite moved aside into it: each holds its own checkpoints,
        # phase files, exports and shared adapter, all of them copies of what was learnt from the users.
        runs = [rd, *rd.moved_aside()]
        # no export copies rows out meanwhile (without checkpoints, _forget says there is nothing to forget in)
        for run in runs:
            if run.checkpoints.is_dir():
                held.enter_context(readers.hold_for_forget(run.checkpoints, warn))
        return _forget(rd, runs, users)


def _shared_adapter_steps(rd: RunDir) -> int:
    """The steps the shared adapter beside the run was trained for, which ``forget --retrain-shared``
    trains it again for: its file says. A torn file is removed all the same (it learnt from every
    user); then the run's own steps (``result.json``), what the run trains it for."""
    try:
        found = rd.read_shared_adapter()
        return int(found[1].get("steps", 0)) if found is not None else rd.run_steps()
    except UnreadableTensors as exc:
        steps = rd.run_steps()
        warn(f"{exc}; removed all the same (it was trained on the forgotten users' data too); "
             f"`forget --retrain-shared` trains it for the run's {steps} steps")
        return steps


def _refuse_damaged(rd: RunDir, ckpts: list[Path]) -> None:
    """Every checkpoint's own files verify before anything changes. A damaged one may hold the users'
    rows where they cannot be found, and rewriting it would give it a manifest that calls it intact.
    (Each is checked once: a delta's chain is the other checkpoints here.)"""
    damaged = []
    for c in ckpts:
        try:
            verify_checkpoint(c, chain=False)
        except CheckpointError as exc:
            damaged.append((c, str(exc)))
    if damaged:
        more = f"; and {len(damaged) - 5} more" if len(damaged) > 5 else ""
        listed = "; ".join(why for _, why in damaged[:5]) + more
        raise ExportError(f"{rd.path}: {len(damaged)} checkpoint(s) are damaged, and forget cannot take users out of "
                          f"what it cannot read ({listed}). No reader or resume takes them (they are not intact): "
                          f"delete {', '.join(str(c) for c, _ in damaged[:5])} and run forget again")


def _forget(rd: RunDir, runs: list[RunDir], users: list[str]) -> dict[str, Any]:
    pending_path = rd.forget_pending
    try:
        pending = set(rd.forget_pending_users())
    except TornJournal as torn:  # the names still legible, and those given now, are completed
        pending = set(torn.legible)
        warn(f"{torn}: an interrupted forget's users are not all known; forgetting those given{torn.legible_hint()}. "
             f"A user it named past the damage may still be in the run: `flora-train users {rd.path}` lists who is")
    recovered = [line for run in runs for line in recover_rewrites(run.checkpoints)]
    ckpts = [c for run in runs for c in list_checkpoints(run.path)]
    if not ckpts:
        raise ExportError(f"{rd.path}: no checkpoints to forget users in")
    _refuse_damaged(rd, ckpts)
    known = pending.union(*(map(_owner(c), _saved_users(c)) for c in ckpts))
    unknown = [u for u in users if u not in known]
    if unknown:
        raise ExportError(f"{rd.path}: no such user(s) in any checkpoint: {', '.join(map(repr, unknown[:5]))}")
    forget = set(users) | pending
    layered = [c for c in ckpts if (c / SHARED_ADAPTER).is_file()]
    if layered:
        where = layered[-1].relative_to(rd.path)
        moved = f" (a run train.overwrite moved aside: delete {layered[-1].parent.parent} to forget the rest)" \
            if where.parts[0] == rd.replaced.name else ""
        raise ExportError(f"{rd.path}: checkpoint {where} holds a shared adapter (adapter.shared) trained on every "
                          "user's data, and every personal row was trained on top of it: removing a user's rows would "
                          f"leave what was learnt from them; train the remaining users in a new run_dir instead{moved}")
    for run in runs:
        check_phase_files(run.path)
    write_json(pending_path, {"users": sorted(forget)})  # from here on, a second run completes this one
    for run in runs:
        for stale in run.checkpoints.glob(".tmp-*"):  # half-written checkpoints of a dead run hold rows too
            shutil.rmtree(stale, ignore_errors=True)
    rows = 0
    for c in ckpts:
        owner = _owner(c)
        if {owner(name) for name in _mentioned(c)} & forget or _named_in_state(c) & forget:
            rows += sum(owner(name) in forget for name in _saved_users(c))
            rewrite_checkpoint(c, _without_users(owner, forget))
    exports, elsewhere = 0, []
    for run in runs:
        held, outside = _forget_exports(run, forget)
        exports, elsewhere = exports + held, elsewhere + outside
    lines = sum(_filter_jsonl(p, forget) for p in sorted(rd.path.rglob("*.jsonl"))
                if "checkpoints" not in p.relative_to(rd.path).parts)
    phase_entries = sum(forget_in_phases(run.path, forget) for run in runs)
    shared = None
    if rd.shared_adapter.is_file():
        shared = _shared_adapter_steps(rd)
        write_json(rd.shared_adapter_removed, {"steps": shared})  # what `forget --retrain-shared` trains later
        rd.shared_adapter.unlink()
    derived, moved_shared = [], []
    for run in runs:
        if run is not rd and run.shared_adapter.is_file():  # a run moved aside is not trained again: what was
            run.shared_adapter.unlink()  # learnt from everyone goes
            moved_shared.append(str(run.shared_adapter.relative_to(rd.path)))
        for path in run.derived:
            if path.exists():
                shutil.rmtree(path)
                derived.append(str(path.relative_to(rd.path)))
    pending_path.unlink()
    return {"users": sorted(forget), "checkpoint_rows": rows, "checkpoints": len(ckpts), "export_folders": exports,
            "exports_elsewhere": elsewhere, "jsonl_lines": lines, "phase_entries": phase_entries,
            "removed_derived": derived, "removed_shared_adapter": shared is not None, "shared_adapter_steps": shared,
            "recovered": recovered, "moved_aside_runs": len(runs) - 1, "removed_moved_aside_shared": moved_shared}

"""A per-user learning-rate sweep (``train.sweep.lr``): K variants of every user, trained as K rows
of the same job (``user@sweepK``: each its own row, optimizer state, kept row and stop, on the
user's own examples and validation split, at rate K), so one job tries K rates for every user at
once. Rows are independent, so each variant trains exactly as a run at its rate alone would.

At the end each user keeps the variant whose kept row has the lowest validation loss (ties: the
lower K); the final checkpoint is rewritten (crash-safely, ``run_dir/rewrite.py``) to hold only the
kept variants under their users' own names, every older checkpoint of the run (they hold every
variant) is removed but one a reader holds (``run_dir/readers.py``), and the store is restored
from it, so scoring, export, generate, serve and ``users`` see one row per user. The choice is in
the checkpoint's trainer state.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from flora_train import dist as fdist
from flora_train.errors import UserError, warn

if TYPE_CHECKING:
    from flora_train.tracking import Tracker
    from flora_train.train.session import Session

SEP = "@sweep"


def variant(user: str, k: int) -> str:
    return f"{user}{SEP}{k}"


def split_variant(name: str) -> tuple[str, int]:
    """``(user, k)`` of a variant name (the last ``@sweepK``, so any user id round-trips)."""
    user, _, k = name.rpartition(SEP)
    return user, int(k)


def user_of(name: str) -> str:
    """The user a row belongs to: a variant's user, any other name itself."""
    user, sep, k = name.rpartition(SEP)
    return user if sep and k.isdigit() else name


def variants_of(by_user: Mapping[str, Any], k: int) -> dict[str, Any]:
    """Every user's entry under each of its ``k`` variants' names."""
    return {variant(u, j): v for u, v in by_user.items() for j in range(k)}


def variant_lrs(users: list[str], lrs: list[float]) -> dict[str, float]:
    return {variant(u, k): lr for u in users for k, lr in enumerate(lrs)}


def choose(best_losses: Mapping[str, float], lrs: list[float]) -> dict[str, int]:
    """Each user's variant: the lowest validation loss of its kept row (NaN counts as worst; ties: lower K)."""
    scored: dict[str, list[float]] = {}
    for name, loss in best_losses.items():
        user, k = split_variant(name)
        scored.setdefault(user, [math.inf] * len(lrs))[k] = loss if math.isfinite(loss) else math.inf
    return {u: int(np.argmin(v)) for u, v in scored.items()}


def holds_variants(state: Mapping[str, Any]) -> bool:
    """Whether a checkpoint (its trainer ``state``) holds a sweep's variants: one of a sweep's run
    from before the sweep chose."""
    sweep = state.get("fingerprint", {}).get("training_keys", {}).get("train.sweep") or {}
    return bool(sweep.get("lr")) and "sweep" not in state


class SweepUnchosen(UserError, RuntimeError):
    """A reader (eval, export, generate, serve) given a sweep's checkpoint from before it chose."""


def check_chosen(ckpt: Path) -> None:
    """Refuses ``ckpt`` to a reader when it holds a sweep's variants rather than one row per user."""
    from flora_train.run_dir.checkpoints import read_state

    state = read_state(ckpt)
    if holds_variants(state):
        lrs = state["fingerprint"]["training_keys"]["train.sweep"]["lr"]
        raise SweepUnchosen(
            f"{ckpt}: a checkpoint of a learning-rate sweep (train.sweep.lr: {lrs}) from before it chose: it holds "
            f"each user's {len(lrs)} variants (user{SEP}0 to user{SEP}{len(lrs) - 1}), not one adapter per user; "
            "each user keeps its best at the end of the run, and then it can be evaluated, exported, generated with "
            f"or served (`flora-train users {ckpt.parent.parent}` lists the variants and their validation losses "
            "meanwhile)")


class SweepDone(UserError, RuntimeError):
    """A resume onto a run whose sweep was already collapsed."""


def check_not_collapsed(state: Mapping[str, Any], ckpt: Path) -> None:
    sweep = state.get("sweep")
    if sweep is not None:
        at, end = sweep.get("at_step"), sweep.get("plan_end")
        # A resume with a larger train.max_steps goes on where any other run goes on: not this one.
        cut = (f"; it chose at step {at}, where train.max_steps ended it before its plan's end (step {end}): a "
               "sweep chooses once, so a larger train.max_steps needs another run_dir"
               if at is not None and end is not None and at < end else "")
        raise SweepDone(f"{ckpt}: this run's sweep is done (each user kept its best rate: {ckpt}/trainer_state.json)"
                        f"{cut}; export, serve or evaluate it, or start another run_dir to train again")


def collapse(session: "Session", ckpt: Path, tracker: "Tracker", step: int) -> dict[str, Any]:
    """Keeps each user's best variant in ``ckpt`` under the user's own name, drops the rest from it and
    from the run's other checkpoints, restores the store from it, and reports how many users chose
    each rate. Collective."""
    from flora_train.run_dir.checkpoints import SHARD_PLAN, TRAINER_STATE, list_checkpoints, load_checkpoint
    from flora_train.run_dir.readers import prune
    from flora_train.run_dir.rewrite import rewrite_checkpoint
    from flora_train.store.saved import iter_shards, keep_users

    lrs = [float(x) for x in session.cfg.train.sweep.lr]
    losses = session.store.selection_losses()
    chosen = choose(losses, lrs)
    # Users no variant has a finite validation loss for (too few examples to spare one) chose nothing.
    unscored = set(chosen) - {user_of(name) for name, loss in losses.items() if math.isfinite(loss)}
    plan_end = session.phase_plan.total_steps(session.cfg.train.epochs, None)
    keep = {variant(u, k): u for u, k in chosen.items()}
    if fdist.rank() == 0:
        def edit(folder: Path, manifest: dict[str, Any]) -> int:
            for path, users in iter_shards(folder):
                keep_users(path, users, keep)
            plan = json.loads((folder / SHARD_PLAN).read_text())
            plan["owners"] = {keep[v]: r for v, r in plan["owners"].items() if v in keep}
            (folder / SHARD_PLAN).write_text(json.dumps(plan, indent=2, ensure_ascii=False))
            state = json.loads((folder / TRAINER_STATE).read_text())
            state["sweep"] = {"lr": lrs, "chosen": {u: lrs[k] for u, k in sorted(chosen.items())}, "at_step": step,
                              "plan_end": plan_end}
            (folder / TRAINER_STATE).write_text(json.dumps(state, indent=2, ensure_ascii=False))
            return len(keep)

        rewrite_checkpoint(ckpt, edit)
        # Never under a reader (`serve`, `generate`, `export`): one still being read stays, and `forget`
        # knows its variants as their users' rows.
        kept = [other.name for other in list_checkpoints(session.run_dir) if other != ckpt and not prune(other)]
        if kept:
            warn(f"{', '.join(kept)} {'is' if len(kept) == 1 else 'are'} being read (serve, generate or export) and "
                 f"{'stays' if len(kept) == 1 else 'stay'} beside {ckpt.name}, holding every variant's rows; nothing "
                 "needs it: delete it once its reader is done")
    fdist.barrier()
    real = {u: session.user_tokens[variant(u, 0)] for u in chosen}
    session.user_tokens = real
    load_checkpoint(ckpt, session.store, session.layout, real)
    counts = Counter(lrs[k] for u, k in chosen.items() if u not in unscored)
    tracker.log_metrics({f"sweep/users_lr_{lr}": float(counts.get(lr, 0)) for lr in lrs}, step=step)
    if fdist.rank() == 0:
        print("per-user learning rates chosen on the validation split: "
              + ", ".join(f"{lr}: {counts.get(lr, 0)} users" for lr in lrs)
              + (f"; {len(unscored)} user(s) with no validation loss keep the first, {lrs[0]}" if unscored else ""))
        if step < plan_end:
            warn(f"train.max_steps={session.cfg.train.max_steps} ended the sweep at step {step} of its plan's "
                 f"{plan_end}: it chose on what it had trained, once; this run cannot be resumed to train longer")
    return {"lr": lrs, "chosen_counts": {str(lr): counts.get(lr, 0) for lr in lrs}, "unvalidated_users": len(unscored)}

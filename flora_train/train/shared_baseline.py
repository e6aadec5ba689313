"""The baseline a run's per-user adapters are compared with (``train.compare_shared_baseline``):
one adapter for every user, trained on the same examples for the same number of steps, kept in
``run_dir/shared_adapter.safetensors``; and trained again without forgotten users
(``flora-train forget --retrain-shared``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from flora_train import dist as fdist
from flora_train.data import BatchPlanner
from flora_train.errors import warn
from flora_train.files import UnreadableTensors, replaced, save_tensors
from flora_train.run_dir import RunDir
from flora_train.run_dir.checkpoints import latest_checkpoint, saved_users
from flora_train.store import AdapterStore
from flora_train.store.sharded import ShardedAdapterStore
from flora_train.store.sharding import ShardPlan
from flora_train.train.session import Session, make_row_init, prepare_session, recipe_beside_the_run, train_settings
from flora_train.train.trainer import Trainer

SHARED = "__shared__"


def shared_baseline(session: Session, steps: int) -> torch.Tensor:
    """The run's baseline row: the one beside the run when it was trained on this run's examples,
    plan, settings and base for ``steps`` steps (a resume after the run's end: a requeued job),
    else trained now. Training it again costs about what the run's own steps did. Under a sweep it
    trains for the steps of the run without it: the sweep's plan is K times as long (K variants of
    every user), and each variant saw its user's data once an epoch. Collective."""
    t = session.cfg.train
    if t.sweep.lr:
        steps = session.phase_plan.phase.start_step + session.users_planner().total_steps(t.epochs, t.max_steps)
    key = _baseline_key(session, steps)
    saved = None
    if fdist.rank() == 0:
        try:
            found = session.paths.read_shared_adapter()
        except UnreadableTensors as exc:
            warn(f"{exc}; training the shared baseline again")
            found = None
        if found is not None and found[1].get("trained_for") == key:
            saved = found[0]
    saved = fdist.broadcast_object(saved)
    if saved is not None and saved.shape == (session.layout.row_size,):
        return saved
    return train_shared_baseline(session, steps, key)


def _baseline_key(session: Session, steps: int) -> str:
    """What the baseline is a function of: the run's fingerprint (examples, plan keys, training
    keys, users), its base and the steps."""
    what = {"fingerprint": session.fingerprint.as_dict(), "base": session.base_fingerprint, "steps": steps}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def train_shared_baseline(session: Session, steps: int, key: str | None = None) -> torch.Tensor:
    """One adapter for every user, trained on the same examples for the same number of steps;
    returns its row. Across ranks its single row is fetched by all of them and its gradients summed
    at rank 0. The row is kept in ``run_dir/shared_adapter.safetensors`` for `flora-train eval`,
    with ``key`` (``_baseline_key``: what it was trained on) where it was trained on the run's own examples."""
    local = AdapterStore(session.layout.row_size, make_row_init(session.layout, session.cfg.store.init_seed),
                         session.store.hyper, "host", session.device)
    store = ShardedAdapterStore(local, ShardPlan.balanced({SHARED: 1}, session.store.world), "fetch")
    t = session.cfg.train
    planner = BatchPlanner({SHARED: range(len(session.train))}, 1, t.users_per_step * t.examples_per_user, t.seed)
    trainer = Trainer(session.model, session.slot, store, session.train, train_settings(session),
                      {SHARED: steps}, session.pad_id, session.device)
    plans = planner.steps(epochs=10**6, max_steps=steps)
    trainer.fit(session.progress(plans, total=steps, desc="shared baseline", leave=False))
    row = store.fetch([SHARED], requires_grad=False).values.detach()[0].cpu()
    if fdist.rank() == 0:
        path = session.paths.shared_adapter
        with replaced(path) as tmp:
            save_tensors({"row": row.contiguous()}, tmp,
                         metadata={"steps": str(steps), **({"trained_for": key} if key is not None else {})})
    return row


def load_shared_row(run_dir: Path, row_size: int) -> torch.Tensor | None:
    """The baseline beside the run for `flora-train eval`; None (scored without it) when there is none
    that fits, or it cannot be read (said: resuming the run trains it again)."""
    try:
        found = RunDir(run_dir).read_shared_adapter()
    except UnreadableTensors as exc:
        warn(f"{exc}; scoring without the shared adapter (resuming the run trains it again)")
        return None
    return found[0] if found is not None and found[0].shape == (row_size,) else None


def retrain_shared_baseline(run_dir: Path, without: set[str], steps: int, base: str | None = None) -> int:
    """``flora-train forget --retrain-shared``: the shared adapter trained again as the run trained it,
    for ``steps`` steps, on the examples of every user but ``without``; returns how many examples.
    ``base``: where the run's base is now (``inference.trained.base_for_training_on``)."""
    cfg = recipe_beside_the_run(run_dir, "retraining the shared adapter", "forget --retrain-shared")
    if base is not None:
        cfg.base.name_or_path = base
    session = prepare_session(cfg)
    try:
        # Users an earlier forget removed are in the data still (it is the owner's, or written again from
        # the recipe) but in no checkpoint: only the users the newest checkpoint holds are trained on.
        ckpt = latest_checkpoint(run_dir)
        present = saved_users(ckpt) if ckpt is not None else set()
        keep = np.sort(np.concatenate([idx for u, idx in session.train.by_user().items()
                                       if u in present and u not in without]))
        session.train = session.train.select(keep)
        train_shared_baseline(session, steps)
        session.paths.shared_adapter_removed.unlink(missing_ok=True)  # (the adapter is back)
        return len(keep)
    finally:
        session.close()

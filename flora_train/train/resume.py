"""What a resume must agree on: which checkpoint (rank 0 decides), which base, which data, plan and
users (the checkpoint's fingerprints)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from flora_train import dist as fdist
from flora_train.base.fingerprint import recorded_id_only
from flora_train.errors import warn
from flora_train.run_dir import RunDir
from flora_train.run_dir.checkpoints import CheckpointError, latest_checkpoint
from flora_train.train.phases import continue_phase, next_phase

if TYPE_CHECKING:
    from flora_train.train.session import Session


def agreed_checkpoint(run_dir: Path) -> Path | None:
    """Rank 0 picks the checkpoint to resume from and every rank takes its word: on a shared
    filesystem that lags, ranks choosing their own "latest" could resume from different steps.
    (Each rank's ``load_checkpoint`` then checks the chosen files are there at their sizes.)"""
    choice: tuple[str | None, str | None] = (None, None)
    if fdist.rank() == 0:
        ckpt = latest_checkpoint(run_dir)
        root = RunDir(run_dir).checkpoints
        if ckpt is None and root.is_dir() and any(root.iterdir()):
            choice = (None, f"{root}: no intact checkpoint to resume from")
        else:
            choice = (str(ckpt) if ckpt else None, None)
    path, error = fdist.broadcast_object(choice)
    if error:
        raise CheckpointError(error)
    return Path(path) if path else None


def check_same_run(ckpt: Path, state: dict[str, Any], session: "Session") -> None:
    """Refuses to resume onto other data, another plan or another user set unless the recipe says
    how to go on (``train.on_data_change: new_phase``); then sets the phase the run goes on with:
    the checkpoint's, or a new one for the users whose data is new or changed (``phases.py``)."""
    saved = state.get("fingerprint")
    retrained = session.fingerprint.training_changes(saved)
    if retrained:
        raise CheckpointError(
            f"{ckpt}: since this checkpoint {'; '.join(retrained)} changed. The rest of every user's training would "
            "differ from how it started. Restore the recipe's values to resume, or start a new run (another run_dir, "
            "or train.overwrite=true)")
    changed = session.fingerprint.changes(saved)
    if changed and session.cfg.train.on_data_change.value == "error":
        # a plan change alone (more epochs, say) goes on under the new plan; new data starts a phase
        how = ("to train the new and changed users from here" if session.fingerprint.users_or_data_changed(saved)
               else "to plan the rest of the run with the new values from here")
        raise CheckpointError(
            f"{ckpt}: since this checkpoint {'; '.join(changed)} changed. Resuming would train a different "
            "schedule than the one the checkpoint belongs to. Restore the original data and recipe, start a new "
            f"run_dir, or set train.on_data_change=new_phase {how}"
        )
    if session.fingerprint.users_or_data_changed(saved):
        next_phase(session, ckpt, state)
        return
    if changed and fdist.rank() == 0:
        print(f"train.on_data_change=new_phase: {'; '.join(changed)} changed since {ckpt.name}; "
              "the rest of the phase is planned with the new keys")
    continue_phase(session, state)


def check_same_base(ckpt: Path, state: dict[str, Any], session: "Session") -> None:
    """Refuses a checkpoint trained on another base (same shapes, other weights)."""
    saved = state.get("base_fingerprint")
    if saved is not None and saved != session.base_fingerprint:
        trained_on = state.get("model_path")
        if recorded_id_only(saved, trained_on, session.cfg.base.gguf_file) and Path(session.model_path).is_dir():
            if fdist.rank() == 0:  # (eval --base: the hub id's model where the hub and cache are not)
                warn(f"{ckpt} was trained on the hub id {trained_on!r}, whose files were not recorded: the base in "
                     f"{session.model_path} is taken as that model unchecked (only its layers' shapes are)")
            return
        raise CheckpointError(
            f"{ckpt}: trained on base '{state.get('model_path')}' but this recipe's base is '{session.model_path}' "
            "(config or weights differ); adapters only fit the base they were trained on"
        )

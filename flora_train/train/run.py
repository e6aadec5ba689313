"""`flora-train run`, top to bottom: prepare the session, find where to start (a checkpoint on
resume), train the shared adapter's own phase when ``adapter.shared`` trains ``first`` (``shared.py``),
train the planned steps (``loop.py``), checkpoint, let each user keep its best rate when sweeping
(``sweep.py``), then score per-user, base and shared adapters (``scoring.py``), export and write the
result. ``train_session`` reads as that recipe."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from flora_train import dist as fdist
from flora_train.base.zero import resident_base_bytes
from flora_train.config import RecipeError, flatten, recipe_to_yaml
from flora_train.errors import warn
from flora_train.files import replace_text
from flora_train.launch_env import elastic_job
from flora_train.run_dir.checkpoints import (
    checkpoint_chain,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_state,
)
from flora_train.run_dir.exports import export_out_error
from flora_train.run_dir.identity import new_run_id
from flora_train.store.saved import saved_steps
from flora_train.tracking import Tracker
from flora_train.train.data_setup import eval_is_held_out, recipe_as_recorded
from flora_train.train.loop import LoopResult, TrainLoop
from flora_train.train.phases import first_phase
from flora_train.train.preemption import PreemptionWatch
from flora_train.train.resume import agreed_checkpoint, check_same_base, check_same_run
from flora_train.train.scoring import score_run
from flora_train.train.shared_baseline import shared_baseline
from flora_train.train.session import Session, prepare_session
from flora_train.train.shared import first_shared_phase, load_shared
from flora_train.train.sweep import check_not_collapsed, collapse


def wants_resume(cfg: DictConfig, resume: bool) -> bool:
    """Asked to (``--resume``), ``train.auto_resume``, or restarted by torchrun: its restart count,
    or a checkpoint of this very torchrun job (``TORCHELASTIC_RUN_ID``). A node restarted because
    another node's workers failed keeps its restart count at 0, so the count alone misses it."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    return resume or restarted or bool(cfg.train.auto_resume) or _same_elastic_job(Path(cfg.run_dir))


def _same_elastic_job(run_dir: Path) -> bool:
    job = elastic_job(os.environ)
    if job is None or not run_dir.is_dir():
        return False
    # The newest checkpoint's state names its job; the resume that follows verifies the checkpoint
    # (verifying it here too would read every shard twice at each start).
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            return read_state(ckpt).get("elastic_job") == job
        except (OSError, ValueError):  # a checkpoint cut short before its state was written
            continue
    return False


def launch_unread(cfg: DictConfig, environ: dict[str, str]) -> str | None:
    """What `flora-train run` started by hand leaves undone of the recipe's launch section: several
    processes, or a scheduler's job. A launched process has the torch variables (torchrun, one process
    too, accelerate, deepspeed) or is inside a Slurm job: what ``launch_env`` reads a job from."""
    if {"WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"} & set(environ):
        return None
    job = cfg.launch
    procs, scheduler = job.nodes * job.procs_per_node, job.scheduler.value
    if procs <= 1 and scheduler == "local":
        return None
    asked = f"{procs} processes ({job.nodes} node(s) x launch.procs_per_node={job.procs_per_node})" if procs > 1 else ""
    if scheduler != "local":
        asked = f"a {scheduler} job" + (f" of {asked}" if asked else "")
    return (f"the recipe's launch section asks for {asked}, and `flora-train run` trains in this one process; "
            "`flora-train launch RECIPE` starts what it asks for")


def run_training(cfg: DictConfig, resume: bool = False) -> dict[str, Any]:
    if note := launch_unread(cfg, dict(os.environ)):  # (by hand: one process, no other rank to repeat it)
        warn(note)
    # Signals are caught from the start: a preemption during set-up stops after the first step.
    with PreemptionWatch(cfg.train.checkpoint_every_minutes) as watch:
        session = prepare_session(cfg, fresh=not wants_resume(cfg, resume))
        try:
            return train_session(session, resume, watch)
        except RuntimeError as exc:
            if not fdist.lost_peers(exc):
                raise
            last = latest_checkpoint(session.run_dir)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise fdist.LostPeers(
                f"rank {fdist.rank()} of {fdist.world_size()} lost the job ({first}): another rank died, or the "
                f"network between the nodes was down for longer than train.collective_timeout_s="
                f"{cfg.train.collective_timeout_s:g}. "
                + (f"The last checkpoint, {last}, is intact: start the job again to resume from it"
                   if last is not None else "No checkpoint was written yet: start the job again")) from None
        finally:
            session.close()


def train_session(session: Session, resume: bool = False, watch: PreemptionWatch | None = None) -> dict[str, Any]:
    """Trains (or resumes) a prepared session; the caller closes it."""
    start_step, state = resume_point(session, resume)
    check_export(session)
    tracker = start_tracking(session, start_step, state.get("mlflow_run_id"))
    loop = TrainLoop(session, tracker)
    loop.trainer.row_streaks = dict(state.get("nonfinite_streaks", {}))
    loop.trainer.skipped_updates = dict(state.get("skipped_updates", {}))
    shared_seconds = first_shared_phase(session, tracker, loop.checkpoint, start_step)
    trained = loop.run(start_step, watch)
    swept = bool(session.cfg.train.sweep.lr)
    final = loop.checkpoint(trained.step, full=swept)
    sweep = collapse(session, final, tracker, trained.step) if swept else None
    return finish(session, tracker, trained, final, loop.total, sweep, shared_seconds)


def check_export(session: Session) -> None:
    """``export.users`` are users of this run and ``export.out`` may receive its export: found at
    the start, not by the export after training (a job that trained for hours then failed on a typo,
    its scheduler marking it failed)."""
    ex = session.cfg.export
    if ex.format.value == "none":
        return
    known = set(session.users())  # (under a sweep the store holds their variants until it chooses)
    unknown = [u for u in ex.users if u not in known]
    if unknown:
        from flora_train.export.base import close_matches

        raise RecipeError(f"key 'export.users': not users of this run's data or checkpoint: "
                          f"{close_matches(unknown, session.users())}")
    refused = ex.out and export_out_error(session.paths, Path(ex.out), ex.format.value)
    if refused:
        raise RecipeError(f"key 'export.out': {refused}")


def resume_point(session: Session, resume: bool) -> tuple[int, dict[str, Any]]:
    """The step to start from and the trainer state to go on with (the MLflow run to continue, ...):
    a checkpoint's when the run resumes (asked to, ``train.auto_resume``, or restarted by torchrun
    --max-restarts), else step 0 and none. Sets the phase the session trains (``phases.py``): a
    fresh run's, the checkpoint's, or a new one."""
    asked = wants_resume(session.cfg, resume)
    ckpt = agreed_checkpoint(session.run_dir) if asked else None
    if ckpt is None:
        if asked and fdist.rank() == 0:  # a mistyped run_dir under --resume must not start over unannounced
            print(f"{session.run_dir} holds no checkpoint to resume from: training from step 0")
        session.run_id = fdist.broadcast_object(new_run_id())
        first_phase(session)
        return 0, {}
    check_not_collapsed(read_state(ckpt), ckpt)
    state = load_checkpoint(ckpt, session.store, session.layout, session.user_tokens, verified=True)
    load_shared(ckpt, session)
    session.run_id = state.get("run_id")
    check_same_base(ckpt, state, session)
    check_same_run(ckpt, state, session)
    start = int(state["next_step"])
    if fdist.rank() == 0:
        print(f"resuming from {ckpt} at step {start}")
    return start, state


def start_tracking(session: Session, start_step: int, run_id: str | None) -> Tracker:
    """The MLflow run (continued on resume) with the recipe, its parameters and the bad-row counts."""
    cfg, run_dir = session.cfg, session.run_dir
    recipe_path = session.paths.recipe
    if fdist.rank() == 0:
        replace_text(recipe_path, recipe_to_yaml(recipe_as_recorded(cfg)))  # eval, serve and export read it
    tracker = Tracker(cfg.tracking.enabled, cfg.tracking.uri, cfg.tracking.experiment, run_dir, run_id=session.run_id)
    tracker.start(cfg.tracking.run_name, flatten(cfg), recipe_path, resume_run_id=run_id)
    bad = session.bad_rows
    tracker.log_metrics({"data/skipped_rows": float(bad.total), **{f"data/skipped_{k}": float(v) for k, v in bad.counts.items()}},
                        step=start_step)
    if bad.total and fdist.rank() == 0:
        print(f"skipped {'1 bad row: ' if bad.total == 1 else ''}{bad.summary()}")
    return tracker


def finish(session: Session, tracker: Tracker, trained: LoopResult, final: Path, total: int,
           sweep: dict[str, Any] | None = None, shared_seconds: float | None = None) -> dict[str, Any]:
    """Scores (per-user, base, shared), exports, logs and writes ``result.json``."""
    cfg, run_dir, step = session.cfg, session.run_dir, trained.step
    main = fdist.rank() == 0
    held, whole = resident_base_bytes(session.model)
    result: dict[str, Any] = {"run_dir": str(run_dir), "steps": step, "checkpoint": str(final), "mlflow_run_id": tracker.known_run_id,
                              "train_seconds": trained.seconds, "train_tokens_per_s": trained.tokens / max(trained.seconds, 1e-9),
                              "users": len(session.store), "store": trained.store_counters,
                              "base": {"zero_stage": cfg.base.zero_stage, "world_size": fdist.world_size(),
                                       "launcher": session.launch.launcher,
                                       "resident_bytes_per_rank": held, "total_bytes": whole}}
    finished_before = trained.first == trained.step and session.paths.result.is_file()
    if finished_before:  # resumed after its end (a requeue, --resume again): the training figures stay
        earlier = session.paths.read_result()
        if earlier is None and main:
            warn(f"{session.paths.result}: cannot be read; written again, with this resume's training figures "
                 "(train_seconds, train_tokens_per_s: it trained nothing) in place of the run's")
        result.update({k: earlier[k] for k in ("train_seconds", "train_tokens_per_s", "store", "shared_phase_seconds")
                       if k in (earlier or {})})
    if session.zero is not None:  # before scoring: what DeepSpeed's root hooks did in training
        result["base"]["zero_hooks"] = session.zero.hook_report()
    if sweep is not None:
        result["sweep"] = sweep
    if shared_seconds is not None:
        result["shared_phase_seconds"] = shared_seconds
    if session.eval is not None and cfg.eval.at_end:
        # With adapter.shared the comparison is the shared adapter itself: nothing is trained twice.
        baseline = cfg.train.compare_shared_baseline and session.shared is None
        shared_row = shared_baseline(session, total) if baseline else None
        result.update(score_run(session, step, tracker, shared_row))
    elif cfg.eval.at_end and main:  # else the run ends with no word on how its users did, nor why
        k, later = cfg.data.eval_examples_per_user, f"flora-train eval {run_dir} --data FILE"
        print(f"nothing evaluated: no user has more than {k} examples, and data.eval_examples_per_user={k} holds out "
              f"examples only of users with more (each keeps one to train on). Set data.eval_path, or later: {later}"
              if eval_is_held_out(cfg) else "nothing evaluated: the data holds no held-out examples (set "
              f"data.eval_path, or data.eval_examples_per_user=N to hold out N of each user's; or later: {later})")
    if cfg.export.format.value != "none":
        from flora_train.export import export_adapters

        # Every rank writes the users its shard holds; rank 0 writes the index once all are done.
        out = Path(cfg.export.out) if cfg.export.out else session.paths.export_dir(cfg.export.format.value)
        manifest = export_adapters(run_dir, cfg.export.format.value, list(cfg.export.users) or None, out, checkpoint=final,
                                   base_model_id=cfg.export.base_model_id, pack_size=cfg.export.pack_size,
                                   part=(fdist.rank(), fdist.world_size()), gather=fdist.all_gather_objects,
                                   just_written=True)
        tracker.log_artifact(out / "manifest.json", "export")
        result["export"] = {"out": str(out), "users": manifest["num_users"]}
    if not finished_before:
        tracker.log_metrics({"train/seconds": trained.seconds, "base/resident_mib_per_rank": held / 2**20}, step=step)
    tracker.end("FINISHED")
    if not main:
        return result
    skipped = read_state(final).get("skipped_updates", {})
    # A user whose every update was skipped took no step too, for that reason, named below.
    idle = sorted(u for u, n in saved_steps(checkpoint_chain(final)).items() if n == 0 and u not in skipped)
    result["users_without_steps"] = len(idle)
    result["users_with_skipped_updates"] = len(skipped)  # named in the checkpoint's state (forget reaches it)
    replace_text(session.paths.result, json.dumps(result, indent=2))
    if finished_before:
        print(f"\nnothing left to train: the run had finished at step {step} ({len(session.store)} users); run dir {run_dir}")
    else:
        users = f"{len(session.store) - len(idle)} of {len(session.store)}" if idle else f"{len(session.store)}"
        phase = session.phase_plan.phase
        if phase.index > 0:  # else "trained 12 users" when the phase trained the 4 new ones
            mine = set(session.phase_plan.planner.user_examples)
            print(f"\nphase {phase.index} trained {len(mine - set(idle))} user(s) for {step - phase.start_step} "
                  f"step(s) from step {phase.start_step} in {trained.seconds:.1f}s; the run: {users} users, {step} "
                  f"steps; run dir {run_dir}")
        else:
            print(f"\ntrained {users} users for {step} step{'' if step == 1 else 's'} in {trained.seconds:.1f}s; "
                  f"run dir {run_dir}")
    if idle:  # else "trained 12 users" counted users whose adapters never took a step (and were exported as such)
        why = f" (train.max_steps={cfg.train.max_steps} ended the run before their data came round)" if cfg.train.max_steps else ""
        names = ", ".join(repr(u) for u in idle[:5]) + (f" and {len(idle) - 5} more" if len(idle) > 5 else "")
        warn(f"{len(idle)} user{'' if len(idle) == 1 else 's'} took no step{why}, so their adapters are as "
             f"initialised: {names}")
    if skipped:  # else a user whose loss was never finite trained nothing, and the run said nothing
        worst = sorted(skipped, key=lambda u: (-skipped[u], u))
        names = ", ".join(f"{u!r} ({skipped[u]} step{'' if skipped[u] == 1 else 's'})" for u in worst[:5])
        names += f" and {len(worst) - 5} more" if len(worst) > 5 else ""
        warn(f"{len(skipped)} user{'' if len(skipped) == 1 else 's'} had updates skipped for a non-finite loss or "
             f"gradient (train.nonfinite={cfg.train.nonfinite.value}): {names}; their adapters hold their finite "
             f"steps only (look at their data, or their learning rate)")
    return result

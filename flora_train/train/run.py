"""`flora-train run`, top to bottom: prepare, (resume), train, checkpoint, score (per-user, base,
shared), export, track. Scoring and `flora-train eval` live in ``scoring.py``, resume checks in
``resume.py``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm import tqdm

from flora_train import dist as fdist
from flora_train.base.zero import resident_base_bytes
from flora_train.config import flatten, recipe_to_yaml
from flora_train.tracking import Tracker
from flora_train.train.checkpoint import load_checkpoint, save_checkpoint
from flora_train.train.evaluate import summarise
from flora_train.train.meter import Meter
from flora_train.train.resume import agreed_checkpoint, check_same_base, check_same_run
from flora_train.train.scoring import evaluate_adapters, run_eval, score_run, train_shared_baseline  # noqa: F401 (run_eval: API)
from flora_train.train.session import Session, prepare_session, train_settings
from flora_train.train.preemption import REQUEUE_EXIT_CODE, Preempted, PreemptionWatch
from flora_train.train.trainer import NonFiniteError, Trainer

log = logging.getLogger("flora_train")


def _trainer_state(session: Session, step: int, run_id: str | None, trainer: Trainer) -> dict[str, Any]:
    return {
        "next_step": step,
        "mlflow_run_id": run_id,
        "seed": session.cfg.train.seed,
        "nonfinite_steps": trainer.nonfinite_steps,
        "model_path": session.model_path,
        "base_fingerprint": session.base_fingerprint,
        "fingerprint": session.fingerprint.as_dict(),
    }


def run_training(cfg: DictConfig, resume: bool = False) -> dict[str, Any]:
    # Signals are caught from the start: a preemption during set-up stops after the first step.
    with PreemptionWatch(cfg.train.checkpoint_every_minutes) as watch:
        session = prepare_session(cfg)
        try:
            return train_session(session, resume, watch)
        finally:
            session.close()


def train_session(session: Session, resume: bool = False, watch: PreemptionWatch | None = None) -> dict[str, Any]:
    """Trains (or resumes) a prepared session; the caller closes it."""
    cfg = session.cfg
    run_dir, t = session.run_dir, cfg.train
    main = fdist.rank() == 0
    recipe_path = run_dir / "recipe.yaml"
    if main:
        recipe_path.write_text(recipe_to_yaml(cfg))
    start_step, run_id = 0, None
    # A job restarted by torchrun (--max-restarts) or asked to (train.auto_resume) picks up where
    # its last checkpoint left off instead of starting over.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    resume = resume or restarted or t.auto_resume
    ckpt = agreed_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, session.store, session.layout, session.user_tokens, verified=True)
        check_same_base(ckpt, state, session)
        check_same_run(ckpt, state, session)
        start_step, run_id = int(state["next_step"]), state.get("mlflow_run_id")
        if main:
            print(f"resuming from {ckpt} at step {start_step}")

    tracker = Tracker(cfg.tracking.enabled, cfg.tracking.uri, cfg.tracking.experiment, run_dir)
    params = flatten(cfg)
    run_id = tracker.start(cfg.tracking.run_name, params, recipe_path, resume_run_id=run_id)
    bad = session.bad_rows
    tracker.log_metrics({"data/skipped_rows": float(bad.total), **{f"data/skipped_{k}": float(v) for k, v in bad.counts.items()}}, step=start_step)
    if bad.total and main:
        print(f"skipped {bad.total} bad rows: " + "; ".join(bad.examples[:3]))

    trainer = Trainer(session.model, session.slot, session.store, session.step_examples, train_settings(session),
                      session.user_total_steps(), session.pad_id, session.device)

    def checkpoint(at: int) -> Path:
        state = _trainer_state(session, at, tracker.known_run_id, trainer)
        return save_checkpoint(run_dir, at, session.store, session.layout, state, t.keep_checkpoints,
                               t.full_checkpoint_every)

    total = session.planner.total_steps(t.epochs, t.max_steps)
    occupancy = session.planner.occupancy()
    tracker.log_metrics({f"plan/{k}": v for k, v in occupancy.items()}, step=start_step)
    if occupancy["occupancy_mean"] < 0.5 and main:
        log.warning("steps are %.0f%% full on average (%.0f%% hold a single user): a few users hold most of the data; "
                    "data.max_examples_per_user caps a user's examples per epoch", 100 * occupancy["occupancy_mean"],
                    100 * occupancy["single_user_steps"])
    meter, step, tokens = Meter(session.store), start_step, 0
    bar = tqdm(total=total, initial=start_step, desc="train", disable=not (t.progress and main), unit="step")
    status = "FAILED"
    started = time.perf_counter()
    own_watch = watch is None
    watch = watch or PreemptionWatch(t.checkpoint_every_minutes)
    watch.restart_clock()
    try:
        with watch if own_watch else contextlib.nullcontext():
            plans = session.planner.steps(t.epochs, t.max_steps, start=start_step)
            plan = next(plans, None)
            while plan is not None:
                following = next(plans, None)
                st = trainer.train_step(plan, following)
                meter.add(st)
                tokens += st.tokens
                step = plan.step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{st.loss:.3f}", tok_s=f"{st.tokens / st.seconds:.0f}", users_s=f"{st.users / st.seconds:.0f}")
                if step % t.log_every_steps == 0 or step == total:
                    tracker.log_metrics(meter.metrics(), step=step)
                    meter.reset()
                stop, due = watch.poll()
                if step < total and (due or (t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0)):
                    checkpoint(step)
                    watch.checkpointed()
                if stop and step < total:
                    raise Preempted(f"stopped by {watch.signal_name} after step {step} of {total}; "
                                    f"checkpointed, exiting with {REQUEUE_EXIT_CODE} to be run again")
                if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and session.eval and step < total:
                    tracker.log_metrics(summarise(evaluate_adapters(session, session.store)), step=step)
                plan = following
        status = "FINISHED"
    except NonFiniteError:
        checkpoint(step)
        raise
    except Preempted:
        status = "KILLED"
        tracker.end("KILLED")
        raise
    finally:
        bar.close()
        if status == "FAILED":
            tracker.end("FAILED")
    train_seconds = time.perf_counter() - started
    store_totals = meter.store_counters()
    final = checkpoint(step)
    held, whole = resident_base_bytes(session.model)
    result: dict[str, Any] = {"run_dir": str(run_dir), "steps": step, "checkpoint": str(final), "mlflow_run_id": tracker.known_run_id,
                              "train_seconds": train_seconds, "train_tokens_per_s": tokens / max(train_seconds, 1e-9),
                              "users": len(session.store), "store": store_totals,
                              "base": {"zero_stage": cfg.base.zero_stage, "world_size": fdist.world_size(),
                                       "launcher": session.launch.launcher,
                                       "resident_bytes_per_rank": held, "total_bytes": whole}}
    if session.eval is not None and cfg.eval.at_end:
        shared_row = train_shared_baseline(session, total) if t.compare_shared_baseline else None
        result.update(score_run(session, step, tracker, shared_row))
    if cfg.export.format.value != "none" and main:
        from flora_train.export import export_adapters

        out = Path(cfg.export.out) if cfg.export.out else run_dir / "export" / cfg.export.format.value
        manifest = export_adapters(run_dir, cfg.export.format.value, list(cfg.export.users) or None, out, checkpoint=final,
                                   base_model_id=cfg.export.base_model_id)
        tracker.log_artifact(out / "manifest.json", "export")
        result["export"] = {"out": str(out), "users": manifest["num_users"]}
    tracker.log_metrics({"train/seconds": train_seconds, "base/resident_mib_per_rank": held / 2**20}, step=step)
    tracker.end("FINISHED")
    if not main:
        return result
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    print(f"\ntrained {len(session.store)} users for {step} steps in {train_seconds:.1f}s; run dir {run_dir}")
    return result

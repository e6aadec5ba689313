"""`flora-train run` and `flora-train eval`, top to bottom: prepare, (resume), train, evaluate,
checkpoint, compare with a shared adapter, export, track."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from flora_train import dist as fdist
from flora_train.base.zero import resident_base_bytes
from flora_train.config import flatten, load_recipe, recipe_to_yaml
from flora_train.data import BatchPlanner
from flora_train.launch_env import read_launch_env
from flora_train.store import AdapterStore
from flora_train.store.sharded import ShardedAdapterStore
from flora_train.store.sharding import ShardPlan
from flora_train.tracking import Tracker
from flora_train.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from flora_train.train.evaluate import UserEval, evaluate, summarise, write_per_user
from flora_train.train.generation_eval import run_generation_eval
from flora_train.train.session import Session, make_row_init, prepare_session
from flora_train.train.preemption import REQUEUE_EXIT_CODE, Preempted, PreemptionWatch
from flora_train.train.trainer import NonFiniteError, StepStats, Trainer, TrainSettings

log = logging.getLogger("flora_train")
SHARED = "__shared__"


def train_settings(session: Session) -> TrainSettings:
    o, t = session.cfg.store.optimizer, session.cfg.train
    return TrainSettings(
        lr=o.lr,
        schedule=o.schedule.value,
        warmup_steps=o.warmup_steps,
        min_lr_ratio=o.min_lr_ratio,
        micro_batch_size=t.micro_batch_size,
        nonfinite=t.nonfinite.value,
        max_consecutive_nonfinite=t.max_consecutive_nonfinite,
        autocast_dtype=session.autocast_dtype,
    )


def _eval_owner(session: Session, user: str) -> int:
    """Eval users are split by owner; users with no row (never trained) by a stable hash."""
    if user in session.store:
        return session.store.owner(user)
    return zlib.crc32(user.encode()) % session.store.world


def _evaluate_store(session: Session, store: ShardedAdapterStore, shared: bool = False) -> dict[str, UserEval]:
    """Every rank evaluates the eval examples of the users it owns; all ranks get every result."""
    assert session.eval is not None
    ev, rank = session.eval, session.store.rank
    mine = [i for i, u in enumerate(ev["user_id"]) if _eval_owner(session, u) == rank]
    subset = {k: [v[i] for i in mine] for k, v in ev.items()}
    shared_row = store.fetch([SHARED], requires_grad=False).values.detach() if shared else None

    def rows_for(users: list[str]) -> torch.Tensor:
        if shared_row is not None:
            return shared_row.expand(len(users), -1)
        rows = store.row_init(users)  # users never trained keep their initial (identity/zero) adapter
        known = [u for u in users if u in store]
        if known:
            rows[[users.index(u) for u in known]] = store.read(known).to(rows)
        return rows

    batch_size = session.cfg.eval.batch_size
    total_batches = int(fdist.all_reduce(torch.tensor([-(-len(mine) // batch_size)]), "max").item())
    local = evaluate(
        session.model, session.slot, rows_for, subset, batch_size,
        session.pad_id, session.device, session.autocast_dtype, total_batches,
    )
    merged: dict[str, UserEval] = {}
    for part in fdist.all_gather_objects(local):
        merged.update(part)
    return merged


class _Meter:
    """Aggregates step stats between log lines (aggregates only; no per-user metric keys)."""

    def __init__(self, store: ShardedAdapterStore) -> None:
        self.store = store
        self.reset()

    def reset(self) -> None:
        self.steps, self.seconds, self.tokens, self.users, self.examples = 0, 0.0, 0, 0, 0
        self.loss_sum, self.skipped = 0.0, 0
        self.touched: set[str] = set()

    def add(self, st: StepStats) -> None:
        self.steps += 1
        self.seconds += st.seconds
        self.tokens += st.tokens
        self.users += st.users
        self.examples += st.examples
        self.loss_sum += st.loss if st.loss == st.loss else 0.0
        self.skipped += len(st.skipped_users)
        self.touched.update(st.user_losses)

    def store_counters(self) -> dict[str, float]:
        """The store's traffic summed over ranks, totals since the start of this process.
        Collective: every rank calls it at the same step."""
        counters = self.store.counters.as_dict()
        counters["cache_hits"], counters["cache_misses"] = self.store.cache_stats()
        values = fdist.all_reduce(torch.tensor(list(counters.values()), dtype=torch.float64))
        return {f"store/{k}": float(v) for k, v in zip(counters, values.tolist())}

    def metrics(self) -> dict[str, float]:
        s = max(self.seconds, 1e-9)
        return {**self.store_counters(),
            "train/loss": self.loss_sum / max(self.steps, 1),
            "train/tokens_per_s": self.tokens / s,
            "train/users_per_s": self.users / s,
            "train/examples_per_s": self.examples / s,
            "train/users_per_step": self.users / max(self.steps, 1),
            "train/users_touched": float(len(self.touched)),
            "train/skipped_user_updates": float(self.skipped),
        }


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


def _agreed_checkpoint(run_dir: Path) -> Path | None:
    """Rank 0 picks the checkpoint to resume from and every rank takes its word: on a shared
    filesystem that lags, ranks choosing their own "latest" could resume from different steps.
    (Each rank's ``load_checkpoint`` then checks the chosen files are there at their sizes.)"""
    choice: tuple[str | None, str | None] = (None, None)
    if fdist.rank() == 0:
        ckpt = latest_checkpoint(run_dir)
        root = run_dir / "checkpoints"
        if ckpt is None and root.is_dir() and any(root.iterdir()):
            choice = (None, f"{root}: no intact checkpoint to resume from")
        else:
            choice = (str(ckpt) if ckpt else None, None)
    path, error = fdist.broadcast_object(choice)
    if error:
        raise CheckpointError(error)
    return Path(path) if path else None


def check_same_run(ckpt: Path, state: dict[str, Any], session: Session) -> None:
    """Refuses to resume onto other data, another plan or another user set unless the recipe says
    how to go on (``train.on_data_change: new_phase``)."""
    changed = session.fingerprint.changes(state.get("fingerprint"))
    if not changed:
        return
    if session.cfg.train.on_data_change.value == "error":
        raise CheckpointError(
            f"{ckpt}: since this checkpoint {'; '.join(changed)} changed. Resuming would train a different "
            "schedule than the one the checkpoint belongs to. Restore the original data and recipe, start a new "
            "run_dir, or set train.on_data_change=new_phase to plan the remaining steps from the new data"
        )
    if fdist.rank() == 0:
        print(f"train.on_data_change=new_phase: {'; '.join(changed)} changed since {ckpt.name}; "
              "the remaining steps are planned from the new data")


def check_same_base(ckpt: Path, state: dict[str, Any], session: Session) -> None:
    """Refuses a checkpoint trained on another base (same shapes, other weights)."""
    saved = state.get("base_fingerprint")
    if saved is not None and saved != session.base_fingerprint:
        raise CheckpointError(
            f"{ckpt}: trained on base '{state.get('model_path')}' but this recipe's base is '{session.model_path}' "
            "(config or weights differ); adapters only fit the base they were trained on"
        )


def train_shared_baseline(session: Session, steps: int) -> dict[str, UserEval]:
    """One adapter for every user, trained on the same examples for the same number of steps.
    Across ranks its single row is fetched by all of them and its gradients summed at rank 0."""
    local = AdapterStore(session.layout.row_size, make_row_init(session.layout, session.cfg.store.init_seed),
                         session.store.hyper, "host", session.device)
    store = ShardedAdapterStore(local, ShardPlan.balanced({SHARED: 1}, session.store.world), "fetch")
    t = session.cfg.train
    planner = BatchPlanner({SHARED: range(len(session.train["user_id"]))}, 1, t.users_per_step * t.examples_per_user, t.seed)
    trainer = Trainer(session.model, session.slot, store, session.train, train_settings(session),
                      {SHARED: steps}, session.pad_id, session.device)
    plans = planner.steps(epochs=10**6, max_steps=steps)
    trainer.fit(tqdm(plans, total=steps, desc="shared baseline", disable=not t.progress, leave=False))
    return _evaluate_store(session, store, shared=True)


def _print_summary(summary: dict[str, float], shared: dict[str, float] | None, chance: float | None) -> None:
    rows = [("per-user adapters", summary)] + ([("one shared adapter", shared)] if shared else [])
    if fdist.rank() != 0:
        return
    print(f"\n{'':22s} {'users':>6s} {'acc mean':>9s} {'acc p10':>8s} {'acc p50':>8s} {'acc p90':>8s} {'loss mean':>10s}")
    for name, s in rows:
        print(
            f"{name:22s} {int(s.get('eval/users', 0)):6d} {s.get('eval/accuracy_mean', float('nan')):9.3f} "
            f"{s.get('eval/accuracy_p10', float('nan')):8.3f} {s.get('eval/accuracy_p50', float('nan')):8.3f} "
            f"{s.get('eval/accuracy_p90', float('nan')):8.3f} {s.get('eval/loss_mean', float('nan')):10.4f}"
        )
    if chance is not None:
        print(f"{'chance':22s} {'':6s} {chance:9.3f}")


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
    ckpt = _agreed_checkpoint(run_dir) if resume else None
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

    trainer = Trainer(session.model, session.slot, session.store, session.train, train_settings(session),
                      session.user_total_steps(), session.pad_id, session.device)

    def checkpoint(at: int) -> Path:
        state = _trainer_state(session, at, tracker.known_run_id, trainer)
        return save_checkpoint(run_dir, at, session.store, session.layout, state, t.keep_checkpoints)

    total = session.planner.total_steps(t.epochs, t.max_steps)
    meter, step = _Meter(session.store), start_step
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
                    tracker.log_metrics(summarise(_evaluate_store(session, session.store)), step=step)
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
                              "train_seconds": train_seconds, "users": len(session.store), "store": store_totals,
                              "base": {"zero_stage": cfg.base.zero_stage, "world_size": fdist.world_size(),
                                       "launcher": session.launch.launcher,
                                       "resident_bytes_per_rank": held, "total_bytes": whole}}
    if session.eval is not None and cfg.eval.at_end:
        per_user = _evaluate_store(session, session.store)
        if main:
            write_per_user(run_dir / "eval" / f"per_user-step{step}.jsonl", per_user)
        summary = summarise(per_user)
        tracker.log_metrics(summary, step=step)
        result["eval"] = summary
        if cfg.eval.generate:
            result["eval_generate"] = run_generation_eval(session, step, tracker)
        shared = None
        if t.compare_shared_baseline:
            shared = summarise(train_shared_baseline(session, total))
            tracker.log_metrics({k.replace("eval/", "eval_shared/"): v for k, v in shared.items()}, step=step)
            result["eval_shared"] = shared
        chance = 1.0 / cfg.data.synthetic.num_values if cfg.data.synthetic is not None else None
        _print_summary(summary, shared, chance)
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


def run_eval(run_dir: Path, checkpoint: Path | None = None) -> dict[str, float]:
    """Re-evaluates a finished (or interrupted) run from its latest checkpoint and logs to its MLflow run."""
    recipe = run_dir / "recipe.yaml"
    if not recipe.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no recipe.yaml)")
    cfg = load_recipe(recipe)
    if cfg.base.zero_stage == 3 and cfg.base.offload_params.value == "none" and not read_launch_env(os.environ).distributed:
        print("evaluating in one process: the base is loaded whole (base.zero_stage=0); "
              "start under torchrun to keep it partitioned")
        cfg.base.zero_stage = 0
    session = prepare_session(cfg)
    try:
        return _eval(session, cfg, run_dir, recipe, checkpoint)
    finally:
        session.close()


def _eval(session: Session, cfg: DictConfig, run_dir: Path, recipe: Path, checkpoint: Path | None) -> dict[str, float]:
    ckpt = checkpoint or latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no checkpoint to evaluate")
    state = load_checkpoint(ckpt, session.store, session.layout, session.user_tokens, verified=checkpoint is None)
    check_same_base(ckpt, state, session)
    if session.eval is None:
        raise ValueError(f"{recipe}: the recipe has no evaluation data (data.eval_path or data.eval_examples_per_user)")
    per_user = _evaluate_store(session, session.store)
    step = int(state["next_step"])
    if fdist.rank() == 0:
        write_per_user(run_dir / "eval" / f"per_user-step{step}.jsonl", per_user)
    summary = summarise(per_user)
    tracker = Tracker(cfg.tracking.enabled, cfg.tracking.uri, cfg.tracking.experiment, run_dir)
    run_id = state.get("mlflow_run_id")
    if cfg.tracking.enabled and run_id:
        tracker.start(None, {}, recipe, resume_run_id=run_id)
        tracker.log_metrics(summary, step=step)
    if cfg.eval.generate:
        summary.update(run_generation_eval(session, step, tracker))
    tracker.end("FINISHED")
    _print_summary(summary, None, 1.0 / cfg.data.synthetic.num_values if cfg.data.synthetic is not None else None)
    return summary

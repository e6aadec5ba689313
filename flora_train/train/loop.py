"""The step loop of a run: train each planned step, log, checkpoint by steps or time, stop cleanly
on a preemption signal, evaluate every ``eval.every_steps``."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path


from flora_train import dist as fdist
from flora_train.data.length_check import padding_report
from flora_train.launch_env import elastic_job
from flora_train.tracking import Tracker
from flora_train.run_dir.saving import save_checkpoint
from flora_train.train.evaluate import summarise
from flora_train.train.meter import Meter
from flora_train.train.pretune import pretune_kernels
from flora_train.train.preemption import REQUEUE_EXIT_CODE, Interrupted, Preempted, PreemptionWatch
from flora_train.train.scoring import evaluate_adapters
from flora_train.train.selection import Validator
from flora_train.train.session import Session, train_settings
from flora_train.train.trainer import NonFiniteError, Trainer

log = logging.getLogger("flora_train")


@dataclass
class LoopResult:
    """What a run of the step loop did (the recipe's finish reports it)."""

    first: int  # the step this process started at (== step: it had nothing left to train)
    step: int  # the next step to run: the steps done, counted from the start of the run
    seconds: float
    tokens: int
    store_counters: dict[str, float]


class TrainLoop:
    def __init__(self, session: Session, tracker: Tracker) -> None:
        self.session, self.tracker = session, tracker
        self.trainer = Trainer(session.model, session.slot, session.store, session.step_examples, train_settings(session),
                               session.user_total_steps(), session.pad_id, session.device, shared=session.shared,
                               user_lr=session.user_lr())
        t = session.cfg.train
        self.total = session.phase_plan.total_steps(t.epochs, t.max_steps)
        self.validator = Validator(session)

    def checkpoint(self, step: int, full: bool = False) -> Path:
        """``full``: a full checkpoint whatever the chain (a sweep rewrites it alone)."""
        s, t = self.session, self.session.cfg.train
        state = {
            "next_step": step, "mlflow_run_id": self.tracker.known_run_id, "seed": t.seed,
            "nonfinite_steps": self.trainer.nonfinite_steps, "model_path": s.model_path,
            "base_fingerprint": s.base_fingerprint, "fingerprint": s.fingerprint.as_dict(),
            "phase": s.phase_plan.phase.as_dict(), "run_id": s.run_id,
            "elastic_job": elastic_job(os.environ),  # torchrun's job: its restarts resume this run
        }
        if self.trainer.settings.stop_diverged_rows:  # a sweep's rows on their way to a stop: a resume goes on counting
            state["nonfinite_streaks"] = dict(sorted(self.trainer.row_streaks.items()))
        if self.trainer.skipped_updates:  # named at the run's end, a resume's end too
            state["skipped_updates"] = dict(sorted(self.trainer.skipped_updates.items()))
        return save_checkpoint(s.run_dir, step, s.store, s.layout, state, t.keep_checkpoints,
                               1 if full else t.full_checkpoint_every, s.run_id,
                               shared=s.shared.tensors() if s.shared is not None else None)

    def log_plan(self, start: int) -> None:
        planner = self.session.phase_plan.planner
        occupancy = planner.occupancy()
        # The first steps' padding, from the lengths alone (an estimate for one rank; the steps'
        # own plan/real_token_share follows as they run).
        occupancy["planned_real_token_share"], warning = padding_report(
            planner, self.trainer.example_lengths, self.trainer.batching, self.session.cfg.data.max_length)
        self.tracker.log_metrics({f"plan/{k}": v for k, v in occupancy.items()}, step=start)
        if self.total > start and warning is not None and fdist.rank() == 0:
            log.warning(warning)
        if self.total > start and occupancy["occupancy_mean"] < 0.5 and fdist.rank() == 0:
            log.warning("steps are %.0f%% full on average (%.0f%% hold a single user): a few users hold most of the "
                        "data; data.max_examples_per_user caps a user's examples per epoch",
                        100 * occupancy["occupancy_mean"], 100 * occupancy["single_user_steps"])

    def run(self, start: int, watch: PreemptionWatch | None = None) -> LoopResult:
        """Steps ``start`` to the end of the plan. A preemption checkpoints and raises ``Preempted``;
        a non-finite failure checkpoints what is good and re-raises."""
        cfg, t, tracker = self.session.cfg, self.session.cfg.train, self.tracker
        self.log_plan(start)
        meter, step, tokens = Meter(self.session.store), start, 0
        bar = self.session.progress(total=self.total, initial=start, desc="train", unit="step")
        status = "FAILED"
        started = time.perf_counter()
        own_watch = watch is None
        watch = watch or PreemptionWatch(t.checkpoint_every_minutes)
        watch.restart_clock()
        try:
            with watch if own_watch else contextlib.nullcontext():
                # Every kernel choice of the phase's first epoch before its first step: a resume is exact.
                if start < self.total:
                    pretune_kernels(self.trainer, self.session.phase_plan.steps(1, None, start=0))
                validator = self.validator
                validator.resume()
                if validator.enabled and start == self.session.phase_plan.phase.start_step:
                    tracker.log_metrics(validator.begin_phase(), step=start)
                plans = self.session.phase_plan.steps(t.epochs, t.max_steps, start=start)
                plan = next(plans, None)
                while plan is not None:
                    following = next(plans, None)
                    training = validator.training(plan)
                    if training is not None:  # else every user of the step has stopped
                        st = self.trainer.train_step(training, validator.training(following) if following else None)
                        if st.diverged_users:
                            validator.stop_diverged(st.diverged_users, plan.step)
                        meter.add(st)
                        tokens += st.tokens
                        bar.set_postfix(loss=f"{st.loss:.3f}", tok_s=f"{st.tokens / st.seconds:.0f}",
                                        users_s=f"{st.users / st.seconds:.0f}", real=f"{st.real_token_share:.0%}",
                                        refresh=False)  # drawn by update(), as often as the bar draws
                    step = plan.step + 1
                    bar.update(1)
                    if meter.steps and (step % t.log_every_steps == 0 or step == self.total):
                        tracker.log_metrics(meter.metrics(), step=step)
                        meter.reset()
                    if validator.due(step):
                        tracker.log_metrics(validator.validate(step), step=step)
                    self._between_steps(step, watch)
                    # (A sweep's users are scored once it has chosen: its rows are variants until then.)
                    if (cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and self.session.eval and step < self.total
                            and not t.sweep.lr):
                        tracker.log_metrics(summarise(evaluate_adapters(self.session, self.session.store)), step=step)
                    plan = following
            status = "FINISHED"
        except NonFiniteError:
            self.checkpoint(step)
            raise
        except Preempted:
            status = "KILLED"
            tracker.end("KILLED")
            raise
        finally:
            bar.close()
            if status == "FAILED":
                tracker.end("FAILED")
        return LoopResult(start, step, time.perf_counter() - started, tokens, meter.store_counters())

    def _between_steps(self, step: int, watch: PreemptionWatch) -> None:
        t = self.session.cfg.train
        stop, due = watch.poll()
        if step < self.total and (due or (t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0)):
            self.checkpoint(step)
            watch.checkpointed()
        if stop and step < self.total and watch.interrupted:
            raise Interrupted(f"stopped by Ctrl-C after step {step} of {self.total}, checkpointed; the same "
                              "command with --resume (or train.auto_resume=true) goes on from there")
        if stop and step < self.total:
            raise Preempted(f"stopped by {watch.signal_name} after step {step} of {self.total}; "
                            f"checkpointed, exiting with {REQUEUE_EXIT_CODE} to be run again")

"""Validation during training (``train.select: best``, ``train.patience``): when the personal phase
begins, every ``train.validate_every_steps`` (or at each epoch's end) and after the plan's last step,
each user's validation split is scored in mixed-user batches with the user's current row; the store
records it (``store/selection.py``: the kept row, early stopping), and the losses are written to
``eval/validation-stepN.jsonl`` beside each user's evaluation loss at the same moment, so the end
of the run can report the single best global moment chosen on the validation split alone.

When validations fall is a function of the step numbers only, so a resumed run validates at the
same steps as an uninterrupted one and stops the same users. Under ``train.select: best`` a user
with no validation example keeps its identity row whatever it trains, so it takes no personal step
(its steps would be computed and thrown away; with a joint shared adapter they train that adapter
too, and stay); under ``last`` it trains to the end.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import asdict
from typing import TYPE_CHECKING

from flora_train import dist as fdist
from flora_train.data.planner import StepPlan
from flora_train.errors import warn
from flora_train.files import replace_text
from flora_train.train.sweep import split_variant, user_of, variant

if TYPE_CHECKING:
    from pathlib import Path

    from flora_train.data.examples import TokenizedExamples
    from flora_train.train.evaluate import UserEval
    from flora_train.train.session import Session

log = logging.getLogger("flora_train")


class Validator:
    def __init__(self, session: "Session") -> None:
        t = session.cfg.train
        self.session = session
        self.every = t.validate_every_steps
        self.patience = t.patience
        self.enabled = session.validation is not None and (t.select.value == "best" or t.patience is not None)
        self.stopped: set[str] = set()
        self.unvalidated: frozenset[str] = frozenset()  # users left out of the plan (no validation example)
        # Validations fall at steps of the uncapped plan (each epoch's end, and its last step), so a run
        # cut short by train.max_steps and resumed with a larger one validates as one that never was.
        self.start = session.phase_plan.phase.start_step
        self.phase_index = session.phase_plan.phase.index
        # The rows this phase trains (a sweep's variants): only their selection moves; a user another
        # phase trained keeps its kept row and its stop as they were.
        self.phase_rows = frozenset(session.phase_plan.planner.user_examples)
        self.epoch_ends: set[int] = set()
        self.end = self.start
        if self.enabled:
            for n in session.phase_plan.planner.epoch_lengths(t.epochs):
                self.end += n
                self.epoch_ends.add(self.end)
            phase_users = {user_of(name) for name in self.phase_rows}
            missing = sorted(phase_users - set(session.validation.users()))  # type: ignore[union-attr]
            # (A joint shared adapter trains on every user's steps: they stay.)
            joint = session.cfg.adapter.shared is not None and t.shared_phase.value == "joint"
            if t.select.value == "best" and not joint:
                self.unvalidated = frozenset(missing)
            if missing and fdist.rank() == 0:
                fate = ("train to the end (train.patience cannot stop them)" if t.select.value != "best" else
                        "keep the identity row (the shared adapter, or the base) and take no step" if self.unvalidated
                        else "keep the identity row (the shared adapter, or the base); their steps train the shared "
                        "adapter")
                log.warning("%d user(s) have too few examples to spare one for validation and %s: %s%s", len(missing),
                            fate, ", ".join(map(repr, missing[:10])), " ..." if len(missing) > 10 else "")

    def resume(self) -> None:
        """The users a restored store says have stopped (collective)."""
        if self.enabled:
            self.stopped = self.session.store.stopped()

    def begin_phase(self) -> dict[str, float]:
        """The validation when the phase begins (its rows' identity: the first candidate); a later
        phase's users first choose afresh (collective). A user whose data changed was chosen and
        perhaps stopped on its old validation split; kept, the stop left it out of the phase that
        trains its new data."""
        if self.phase_index > 0:
            self.session.store.restart_selection(self.phase_rows)
            self.stopped = self.session.store.stopped()
        return self.validate(self.start)

    def due(self, step: int) -> bool:
        """Whether to validate after global step ``step`` (the number of steps done)."""
        if not self.enabled:
            return False
        if step == self.end:
            return True
        if self.every:
            return (step - self.start) % self.every == 0
        return step in self.epoch_ends

    def training(self, plan: StepPlan) -> StepPlan | None:
        """``plan`` without the users that left it or never joined it (None when none is left)."""
        if not self.stopped and not self.unvalidated:
            return plan
        groups = tuple(g for g in plan.groups if g[0] not in self.stopped and user_of(g[0]) not in self.unvalidated)
        return None if not groups else StepPlan(plan.step, plan.epoch, groups)

    def stop_diverged(self, rows: list[str], step: int) -> None:
        """A sweep's variants whose loss or gradient was non-finite in ``train.max_consecutive_nonfinite``
        of their own steps in a row leave the plan after ``step``, as a run at that rate alone would
        have stopped; the other rates of their users train on (every rank, the same ``rows``)."""
        self.session.store.stop(rows, step)
        self.stopped |= set(rows)
        if fdist.rank() == 0:
            lrs = list(self.session.cfg.train.sweep.lr)
            by_rate = Counter(lrs[split_variant(name)[1]] for name in rows)
            log.warning("after step %d, variants stopped on non-finite losses or gradients (%d of their own steps in "
                        "a row): %s; each keeps its best validated row, and their users' other rates train on", step,
                        self.session.cfg.train.max_consecutive_nonfinite,
                        ", ".join(f"lr {lr}: {n} user(s)" for lr, n in sorted(by_rate.items())))

    def validate(self, step: int) -> dict[str, float]:
        """Scores every user's validation split (and evaluation data) now, records it; returns metrics."""
        s = self.session
        assert s.validation is not None
        lrs = list(s.cfg.train.sweep.lr)
        losses: dict[str, float] = {}
        lines = []
        for k in range(max(len(lrs), 1)):  # a sweep's variants one after another (each pass is collective)
            def name(user: str, k: int = k) -> str:
                return variant(user, k) if lrs else user

            val = {u: e.loss for u, e in self._scores(s.validation, name).items()}
            ev = self._scores(s.eval, name) if s.eval is not None else {}
            losses.update({name(u): v for u, v in val.items()})
            lines += [{"user_id": u, "variant": k if lrs else None, "validation_loss": val.get(u),
                       "eval_loss": ev[u].loss if u in ev else None, "eval": asdict(ev[u]) if u in ev else None}
                      for u in s.users()]
        s.store.validated(losses, step, self.patience, users=self.phase_rows)
        stopped = s.store.stopped() if self.patience is not None else set()
        newly = stopped - self.stopped
        self.stopped = stopped
        if fdist.rank() == 0:
            path = s.paths.validation_file(step)
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_text(path, "".join(json.dumps(line) + "\n" for line in lines))
            if newly:
                log.info("after step %d, %d user(s) stopped (no better validation loss in %d validations)", step,
                         len(newly), self.patience)
        finite = [v for v in losses.values() if math.isfinite(v)]
        return {"validation/loss_mean": sum(finite) / max(len(finite), 1), "validation/stopped_users": float(len(stopped))}

    def _scores(self, examples: "TokenizedExamples", name) -> dict[str, "UserEval"]:
        """Each user's loss and accuracy on ``examples`` with the training row of ``name(user)``: every rank
        scores the examples of the rows it owns; all ranks get every result."""
        from flora_train.train.scoring import adapter_rows, evaluate_everywhere

        store = self.session.store
        names = examples.user_names
        mine = examples.select([i for i, c in enumerate(examples.user_codes)
                                if name(names[c]) in store and store.owner(name(names[c])) == store.rank])
        rows = adapter_rows(store, served=False)
        return evaluate_everywhere(self.session, lambda users: rows([name(u) for u in users]), mine)


def best_global_moment(session: "Session") -> tuple[str, dict[str, "UserEval"]] | None:
    """The single setting for every user (one validation moment, and under a sweep one rate) with the
    lowest mean validation loss, and every user's evaluation loss and accuracy then: the best global
    choice, made on the validation split as the per-user choice is, so the two compare fairly."""
    lrs = list(session.cfg.train.sweep.lr)
    best: tuple[float, str, dict[str, float]] | None = None
    for path in session.paths.validation_files():
        step = int(path.stem.split("step")[1])
        groups = _read_moment(path)
        if groups is None:
            continue
        for k, rows in groups.items():
            val = [r["validation_loss"] for r in rows if r["validation_loss"] is not None and math.isfinite(r["validation_loss"])]
            if not val:
                continue
            mean = sum(val) / len(val)
            if best is None or mean < best[0]:
                label = f"step {step}" + (f", lr {lrs[k]}" if k is not None and k < len(lrs) else "")
                best = (mean, label, {r["user_id"]: r["eval"] for r in rows if r["eval"] is not None})
    return None if best is None else (best[1], best[2])


def _read_moment(path: "Path") -> "dict[int | None, list[dict]] | None":
    """One validation file's lines by sweep variant, each line's ``eval`` a ``UserEval``; None, said on
    stderr, when a line cannot be read (torn by a disk fault): a mean over the users left would not
    compare with the other moments', so that moment is left out of the choice."""
    from flora_train.train.evaluate import UserEval

    groups: dict[int | None, list[dict]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        if fdist.rank() == 0:
            warn(f"{path}: cannot be read ({e}); its validation is left out of the best global choice")
        return None
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            row = json.loads(line)
            loss = row["validation_loss"]
            row = {**row, "eval": None if row.get("eval") is None else UserEval(**row["eval"]),
                   "validation_loss": None if loss is None else float(loss), "user_id": str(row["user_id"])}
        except (ValueError, TypeError, KeyError):
            if fdist.rank() == 0:
                warn(f"{path}:{number}: cannot be read (torn); the validation at this step is left out of the best "
                     "global choice")
            return None
        groups.setdefault(row.get("variant"), []).append(row)
    return groups

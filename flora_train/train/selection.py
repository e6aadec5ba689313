"""Validation during training (``train.select: best``, ``train.patience``): when the personal phase
begins, every ``train.validate_every_steps`` (or at each epoch's end) and after the last step, each
user's validation split is scored in mixed-user batches with the user's current row; the store
records it (``store/selection.py``: the kept row, early stopping), and the losses are written to
``eval/validation-stepN.jsonl`` beside each user's evaluation loss at the same moment, so the end
of the run can report the single best global moment chosen on the validation split alone.

When validations fall is a function of the step numbers only, so a resumed run validates at the
same steps as an uninterrupted one and stops the same users.
"""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING

from flora_train import dist as fdist
from flora_train.data.planner import StepPlan

if TYPE_CHECKING:
    from flora_train.train.session import Session

log = logging.getLogger("flora_train")


class Validator:
    def __init__(self, session: "Session", total: int) -> None:
        t = session.cfg.train
        self.session, self.total = session, total
        self.every = t.validate_every_steps
        self.patience = t.patience
        self.enabled = session.validation is not None and (t.select.value == "best" or t.patience is not None)
        self.stopped: set[str] = set()
        if self.enabled:
            users = set(session.user_tokens)
            missing = sorted(users - set(session.validation.users()))  # type: ignore[union-attr]
            if missing and fdist.rank() == 0:
                log.warning("%d user(s) have too few examples to spare one for validation and keep the identity row "
                            "(the shared adapter, or the base): %s%s", len(missing), ", ".join(map(repr, missing[:10])),
                            " ..." if len(missing) > 10 else "")

    def resume(self) -> None:
        """The users a restored store says have stopped (collective)."""
        if self.enabled:
            self.stopped = self.session.store.stopped()

    def due(self, step: int, plan: StepPlan, following: StepPlan | None) -> bool:
        """Whether to validate after global step ``step`` (the number of steps done)."""
        if not self.enabled:
            return False
        if step >= self.total or following is None:
            return True
        if self.every:
            return (step - self.session.phase_plan.phase.start_step) % self.every == 0
        return following.epoch != plan.epoch

    def training(self, plan: StepPlan) -> StepPlan | None:
        """``plan`` without the users that left it (None when none is left)."""
        if not self.stopped:
            return plan
        groups = tuple(g for g in plan.groups if g[0] not in self.stopped)
        return None if not groups else StepPlan(plan.step, plan.epoch, groups)

    def validate(self, step: int) -> dict[str, float]:
        """Scores every user's validation split (and evaluation data) now, records it; returns metrics."""
        from flora_train.train.scoring import adapter_rows, evaluate_everywhere, evaluate_rows

        s = self.session
        assert s.validation is not None
        store = s.store
        mine = s.validation.select([i for i, u in enumerate(s.validation.user_codes)
                                    if s.validation.user_names[u] in store and store.owner(s.validation.user_names[u]) == store.rank])
        rows_for = adapter_rows(store, served=False)
        losses = {u: e.loss for u, e in evaluate_everywhere(s, rows_for, mine).items()}
        evals = {u: e.loss for u, e in evaluate_rows(s, rows_for, lambda u: u in store).items()} if s.eval is not None else {}
        store.validated(losses, step, self.patience)
        stopped = store.stopped() if self.patience is not None else set()
        newly = stopped - self.stopped
        self.stopped = stopped
        if fdist.rank() == 0:
            lines = [json.dumps({"user_id": u, "validation_loss": losses.get(u), "eval_loss": evals.get(u)})
                     for u in sorted(s.user_tokens)]
            path = s.paths.validation_file(step)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n")
            if newly:
                log.info("after step %d, %d user(s) stopped (no better validation loss in %d validations)", step,
                         len(newly), self.patience)
        finite = [v for v in losses.values() if math.isfinite(v)]
        return {"validation/loss_mean": sum(finite) / max(len(finite), 1), "validation/stopped_users": float(len(stopped))}


def best_global_moment(session: "Session") -> tuple[int, dict[str, float]] | None:
    """The single validation moment (one step for every user) with the lowest mean validation loss,
    and every user's evaluation loss then: the best one global setting, chosen on the validation
    split like the per-user choice, so the two compare fairly."""
    best: tuple[float, int, dict[str, float]] | None = None
    for path in session.paths.validation_files():
        step = int(path.stem.split("step")[1])
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        val = [r["validation_loss"] for r in rows if r["validation_loss"] is not None and math.isfinite(r["validation_loss"])]
        if not val:
            continue
        mean = sum(val) / len(val)
        if best is None or mean < best[0]:
            best = (mean, step, {r["user_id"]: r["eval_loss"] for r in rows if r["eval_loss"] is not None})
    return None if best is None else (best[1], best[2])


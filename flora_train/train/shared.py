"""Training the shared adapter (``adapter.shared``): its row on the compute device, its own AdamW,
and the phase it is in. The row is replicated on every rank: each rank's micro-batches add to its
gradient, one all-reduce sums them, and every rank takes the same optimizer step, so the copies
never diverge (the data-parallel rule, for one small tensor).

``train.shared_phase: first`` trains it alone (every personal row at the identity, untouched) for
``train.shared_steps``, then freezes it: the personal rows trained on top of it stay independent
of each other, as without it. ``joint`` trains it in every step beside the personal rows.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig

from flora_train import dist as fdist
from flora_train.adapters import AdapterLayout
from flora_train.adapters.shared import SharedAdapter

if TYPE_CHECKING:
    from flora_train.tracking import Tracker
    from flora_train.train.session import Session


class SharedTraining:
    """The shared adapter of a session (on its slot) with the state that trains it."""

    def __init__(self, adapter: SharedAdapter, cfg: DictConfig, device: torch.device) -> None:
        o, s = cfg.store.optimizer, cfg.adapter.shared
        self.phase = cfg.train.shared_phase.value
        self.adapter = adapter
        self.row = adapter.row.to(device).requires_grad_(False)
        adapter.row = self.row
        self.optimizer = torch.optim.AdamW([self.row], lr=s.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                           weight_decay=o.weight_decay, foreach=False)
        self.steps = 0  # optimizer steps taken
        self.frozen = False  # first: set once its phase is done

    @property
    def layout(self) -> AdapterLayout:
        return self.adapter.layout

    @property
    def trains(self) -> bool:
        return not self.frozen

    def needs_phase(self) -> bool:
        """Whether ``first``'s own phase is still to run."""
        return self.phase == "first" and not self.frozen

    def begin_step(self) -> None:
        self.row.requires_grad_(self.trains)
        self.row.grad = None

    def end_step(self, users_ok: bool) -> bool:
        """Sums the step's gradient over ranks and steps every copy alike; skipped (False) when a user's
        loss was not finite (it reached this gradient too) or the summed gradient is not."""
        if not self.trains:
            return False
        grad = self.row.grad if self.row.grad is not None else torch.zeros_like(self.row)
        fdist.all_reduce(grad)
        ok = users_ok and bool(torch.isfinite(grad.sum()))
        if ok:
            self.row.grad = grad
            self.optimizer.step()
            self.steps += 1
        self.row.grad = None
        self.row.requires_grad_(False)
        return ok

    # -- checkpoint -----------------------------------------------------------------------------
    def tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """What a checkpoint keeps: the row, AdamW's moments, and the phase in the metadata."""
        out = {"row": self.row.detach().cpu().contiguous()}
        state = self.optimizer.state.get(self.row, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                out[f"optim.{key}"] = state[key].detach().cpu().contiguous()
        meta = {"layout": json.dumps(self.layout.to_dict()), "steps": str(self.steps), "frozen": str(int(self.frozen)),
                "phase": self.phase}
        return out, meta

    def load(self, tensors: dict[str, torch.Tensor], meta: dict[str, str], label: str) -> None:
        from flora_train.run_dir.checkpoints import CheckpointError

        saved = AdapterLayout.from_dict(json.loads(meta["layout"]))
        problems = self.layout.compatible_with(saved)
        if problems:
            raise CheckpointError(f"{label}: its shared adapter does not fit adapter.shared: {'; '.join(problems)}")
        with torch.no_grad():
            self.row.copy_(tensors["row"])
        self.steps, self.frozen = int(meta["steps"]), bool(int(meta["frozen"]))
        if "optim.exp_avg" in tensors:
            self.optimizer.state[self.row] = {
                "step": torch.tensor(float(self.steps)),
                "exp_avg": tensors["optim.exp_avg"].to(self.row.device),
                "exp_avg_sq": tensors["optim.exp_avg_sq"].to(self.row.device),
            }


def train_shared_phase(session: "Session", tracker: "Tracker", steps: int) -> list[float]:
    """``first``: the shared adapter alone for ``steps`` steps of its plan (every user's training data,
    a validation split drawn from it included: ``Session.shared_data``; each user's loss normalised by
    its own tokens), then frozen. Returns the step losses."""
    from flora_train.train.pretune import pretune_kernels
    from flora_train.train.session import train_settings
    from flora_train.train.trainer import Trainer

    shared = session.shared
    assert shared is not None
    t = session.cfg.train
    examples, planner = session.shared_data()
    trainer = Trainer(session.model, session.slot, session.store, examples, train_settings(session),
                      session.user_total_steps(), session.pad_id, session.device, shared=shared, train_personal=False)
    pretune_kernels(trainer, planner.steps(epochs=1, max_steps=steps))
    plans = planner.steps(epochs=10**6, max_steps=steps)
    losses = []
    for st in trainer.fit(session.progress(plans, total=steps, desc="shared adapter", leave=False)):
        losses.append(st.loss)
        if st.step % max(t.log_every_steps, 1) == 0 or st.step == steps - 1:
            tracker.log_metrics({"shared/loss": st.loss}, step=st.step)
    shared.frozen = True
    return losses


def first_shared_phase(session: "Session", tracker: "Tracker", checkpoint: Callable[[int], Path], start: int) -> float | None:
    """``train.shared_phase=first`` when its phase is still to run: the shared adapter on every user's
    data, frozen, then a checkpoint of its own before any personal row trains (a crash after it never
    retrains it). Its length defaults to the personal phase's plan before any max_steps (which only
    cuts the schedule short: a run cut and resumed trains the same shared adapter). Returns its seconds."""
    shared = session.shared
    if shared is None or not shared.needs_phase():
        return None
    t = session.cfg.train
    began = time.perf_counter()
    # (Its own plan: the users' data with any validation split given back, each user once under a sweep.)
    steps = t.shared_steps or session.shared_data()[1].total_steps(t.epochs, None)
    train_shared_phase(session, tracker, steps)
    seconds = time.perf_counter() - began
    tracker.log_metrics({"shared/seconds": seconds}, step=start)
    checkpoint(start)
    return seconds


def load_shared(ckpt: Path, session: "Session") -> None:
    """The checkpoint's shared adapter into the session; a run and its checkpoint must agree on having one."""
    from flora_train.run_dir.checkpoints import CheckpointError, read_shared_adapter

    saved = read_shared_adapter(ckpt)
    if (saved is None) != (session.shared is None):
        raise CheckpointError(f"{ckpt}: {'has no' if saved is None else 'has a'} shared adapter but adapter.shared is "
                              f"{'set' if saved is None else 'null'}; use the recipe the run was trained with")
    if saved is not None and session.shared is not None:
        session.shared.load(*saved, label=str(ckpt))


"""The step loop: fetch the step's rows, forward/backward each micro-batch through the frozen base
with every example on its own user's adapter, then one row-wise optimizer step on those rows.

Under ``torch.distributed`` every rank runs the same loop over the same global plan: it computes
its share of the step (the store's ``work``), the store's placement moves rows and gradients, and two small all-reduces tell every rank each step user's loss and whether it was finite,
so every rank takes the same decisions."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from flora_train import dist as fdist
from flora_train.adapters import AdapterSlot
from flora_train.data.examples import TokenizedExamples
from flora_train.data.planner import StepPlan
from flora_train.data.batching import Batch, MicroBatching, pack, pad
from flora_train.data.tokenize import IGNORE
from flora_train.store.sharded import OwnedStep, ShardedAdapterStore
from flora_train.store.sharding import RankWork
from flora_train.train.loss import batch_target_logits, per_user_loss
from flora_train.train.schedule import per_user_lr
from flora_train.train.shared import SharedTraining


class NonFiniteError(RuntimeError):
    pass


@dataclass(frozen=True)
class TrainSettings:
    lr: float
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    micro_batch_size: int | None = 64  # None: only the token budget bounds a micro-batch
    micro_batch_tokens: int | None = None
    packing: bool = False
    nonfinite: str = "skip_users"  # skip_users | skip_step | error
    max_consecutive_nonfinite: int = 3
    # A sweep's variants (skip_users): a row non-finite in this many of its own steps in a row stops
    # alone (a rate too high for it), not the run.
    stop_diverged_rows: bool = False
    autocast_dtype: torch.dtype | None = None

    @property
    def batching(self) -> MicroBatching:
        return MicroBatching(self.micro_batch_size, self.micro_batch_tokens, self.packing)


@dataclass
class StepStats:
    step: int
    loss: float  # mean over the step's users of each user's mean token loss
    users: int
    examples: int
    tokens: int  # real tokens (every rank)
    target_tokens: int
    seconds: float
    skipped_users: list[str] = field(default_factory=list)
    diverged_users: list[str] = field(default_factory=list)  # stop_diverged_rows: rows to stop now
    user_losses: dict[str, float] = field(default_factory=dict)
    computed_tokens: int = 0  # tokens the base computed, padding included (every rank)

    @property
    def real_token_share(self) -> float:
        return self.tokens / self.computed_tokens if self.computed_tokens else 1.0


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        slot: AdapterSlot,
        store: ShardedAdapterStore,
        examples: TokenizedExamples,
        settings: TrainSettings,
        user_total_steps: dict[str, int],
        pad_id: int,
        device: torch.device,
        shared: SharedTraining | None = None,
        train_personal: bool = True,
        user_lr: Mapping[str, float] | None = None,
    ) -> None:
        """``shared``: the shared adapter every example goes through (trained in the step unless it is
        frozen); ``train_personal=False``: the personal rows take part at their current values
        (the identity before training) and nothing of the store changes (``first``'s shared phase);
        ``user_lr``: a user's own base learning rate (a sweep's variants), else ``settings.lr``."""
        self.model = model
        self.slot = slot
        self.store = store
        self.examples = examples
        self.settings = settings
        self.user_total_steps = user_total_steps
        self.pad_id = pad_id
        self.device = device
        self.shared = shared
        self.train_personal = train_personal
        self.user_lr = dict(user_lr or {})
        self.consecutive_faults = 0
        self.nonfinite_steps = 0
        # stop_diverged_rows: each row's non-finite steps in a row (of its own steps), kept in checkpoints
        self.row_streaks: dict[str, int] = {}
        # Each user's updates skipped for a non-finite loss or gradient (train.nonfinite), kept in
        # checkpoints: the run's end names them (a sweep names its stopped variants itself).
        self.skipped_updates: dict[str, int] = {}
        self._planned: tuple[StepPlan, RankWork] | None = None
        self.example_targets = examples.target_counts()  # numpy: no Python int per example
        self.example_lengths = examples.lengths()  # from the Arrow offsets: grouping reads no tokens
        self.batching = settings.batching
        # Any row serves the padding micro-batch of an idle rank: its loss is multiplied by zero.
        self.null_row = store.row_init(["__null__"]).to(device).requires_grad_(True)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.settings.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _batch(self, ids: list[int]) -> Batch:
        examples = [(self.examples.input_ids(i), self.examples.labels(i)) for i in ids]
        return (pack(examples) if self.batching.packing else pad(examples, self.pad_id)).to(self.device)

    def rank_work(self, plan: StepPlan) -> RankWork:
        """This rank's users and micro-batches of ``plan``."""
        if self._planned is not None and self._planned[0] is plan:
            return self._planned[1]  # computed one step ahead for the prefetch
        work = self.store.work(((u, i) for u, ex in plan.groups for i in ex), self.batching, self.example_lengths)
        self._planned = (plan, work)
        return work

    def _dummy_batch(self) -> Batch:
        """One pad sequence with no targets: keeps this rank's module sequence in step with ranks
        that have more micro-batches (ZeRO-3 gathers parameters collectively)."""
        return pad([(np.array([self.pad_id]), np.array([IGNORE]))], self.pad_id).to(self.device)

    def train_step(self, plan: StepPlan, next_plan: StepPlan | None = None) -> StepStats:
        start = time.perf_counter()
        step_users = plan.user_ids
        work = self.rank_work(plan)
        local_users = work.user_ids
        rows = self.store.fetch(local_users, requires_grad=self.train_personal)
        if self.shared is not None:
            self.shared.begin_step()
        if next_plan is not None:
            self.store.prefetch(self.rank_work(next_plan).user_ids, exclude=step_users)
        position = {u: i for i, u in enumerate(local_users)}
        # Each user's target tokens over the whole step (all ranks, all micro-batches), so neither
        # micro-batching nor placement changes a user's loss.
        user_tokens = torch.zeros(len(local_users), dtype=torch.long)
        for u, ex in plan.groups:
            if u in position:
                user_tokens[position[u]] = int(self.example_targets[list(ex)].sum())
        user_tokens = user_tokens.to(self.device)
        user_loss = torch.zeros(len(local_users), device=self.device)
        n_tokens = computed = 0
        for mb in work.micro_batches:
            if mb:
                batch = self._batch([i for _, i in mb])
                pos = torch.tensor([position[u] for u, _ in mb], device=self.device)
                values = rows.values
            else:
                batch, pos = self._dummy_batch(), torch.zeros(1, dtype=torch.long, device=self.device)
                values = self.null_row
            with self.slot.activate(values, batch.token_index(pos)):
                with self._autocast():  # the forward only: PyTorch documents backward under autocast against
                    # The head runs at target positions only (none in a padding batch, whose loss is 0).
                    t = batch_target_logits(self.model, batch)
                    if mb:
                        objective, contrib = per_user_loss(t, pos, user_tokens)
                    else:
                        objective, contrib = t.logits.float().sum() * 0.0, None
                objective.backward()
            if contrib is not None:
                user_loss += contrib
                n_tokens += batch.real_tokens
                computed += batch.computed_tokens
        owned = None
        if self.train_personal:
            if rows.values.grad is None:  # a rank with no examples this step
                rows.values.grad = torch.zeros_like(rows.values)
            owned = self.store.reduce_grads(rows)
        # Every rank learns every step user's total loss, and which users must be skipped.
        step_pos = {u: i for i, u in enumerate(step_users)}
        loss_all = torch.zeros(len(step_users))
        if local_users:
            loss_all.index_add_(0, torch.tensor([step_pos[u] for u in local_users]), user_loss.detach().cpu())
        fdist.all_reduce(loss_all)
        ok_all = torch.ones(len(step_users))
        if owned is None:
            ok_all = torch.isfinite(loss_all).float()  # the same on every rank: the losses are all-reduced
        elif owned.user_ids:
            owned_pos = torch.tensor([step_pos[u] for u in owned.user_ids])
            # A row sum is NaN or inf when any value is: one read of the gradients instead of a
            # full-size mask. It also flags finite gradients whose sum overflows float32 (values
            # near 1e33), which no step should apply either.
            rows_finite = torch.isfinite(owned.grads.sum(dim=1)).cpu()
            finite = torch.isfinite(loss_all[owned_pos]) & rows_finite
            ok_all[owned_pos] = finite.float()
        fdist.all_reduce(ok_all, "min")
        skipped, diverged = self._apply(owned, step_users, ok_all.bool(), step_pos)
        if self.shared is not None:
            self.shared.end_step(users_ok=not skipped)
        tokens = torch.tensor([n_tokens, computed], dtype=torch.float64)
        fdist.all_reduce(tokens)
        seconds = time.perf_counter() - start
        finite = torch.isfinite(loss_all)
        return StepStats(
            step=plan.step,
            loss=float(loss_all[finite].mean()) if finite.any() else float("nan"),
            users=len(step_users),
            examples=plan.num_examples,
            tokens=int(tokens[0]),
            target_tokens=int(sum(self.example_targets[i] for _, ex in plan.groups for i in ex)),
            seconds=seconds,
            skipped_users=skipped,
            diverged_users=diverged,
            user_losses=dict(zip(step_users, loss_all.tolist())),
            computed_tokens=int(tokens[1]),
        )

    def _apply(self, owned: OwnedStep | None, users: list[str], ok: torch.Tensor,
               step_pos: dict[str, int]) -> tuple[list[str], list[str]]:
        """Runs the owners' sparse step on rows whose loss and gradient are finite everywhere;
        returns the skipped users and those to stop (the same lists on every rank). ``owned`` None:
        no personal step."""
        bad = [u for u, good in zip(users, ok.tolist()) if not good]
        diverged: list[str] = []
        if self.settings.stop_diverged_rows and self.settings.nonfinite == "skip_users":
            for u, good in zip(users, ok.tolist()):
                if good:
                    self.row_streaks.pop(u, None)
                    continue
                self.row_streaks[u] = self.row_streaks.get(u, 0) + 1
                if self.row_streaks[u] >= self.settings.max_consecutive_nonfinite:
                    diverged.append(u)
                    del self.row_streaks[u]  # its stop is in the store from now on
            self.nonfinite_steps += bool(bad)
        elif bad:
            self.nonfinite_steps += 1
            self.consecutive_faults += 1
            if self.settings.nonfinite == "error":
                raise NonFiniteError(f"non-finite loss or gradient for users {bad[:5]} (train.nonfinite=error)")
            if self.consecutive_faults >= self.settings.max_consecutive_nonfinite:
                raise NonFiniteError(
                    f"{self.consecutive_faults} consecutive steps with non-finite loss or gradient "
                    f"(last: users {bad[:5]}); stopping with the adapters of the last good step"
                )
            if self.settings.nonfinite == "skip_step":
                ok = torch.zeros_like(ok)
                bad = list(users)
        else:
            self.consecutive_faults = 0
        if not self.settings.stop_diverged_rows:
            for u in bad:
                self.skipped_updates[u] = self.skipped_updates.get(u, 0) + 1
        if owned is not None and owned.user_ids:
            s = self.settings
            keep = ok[torch.tensor([step_pos[u] for u in owned.user_ids])]
            steps = self.store.steps(owned.user_ids) + 1
            totals = torch.tensor([self.user_total_steps.get(u, 1) for u in owned.user_ids])
            base = (torch.tensor([self.user_lr.get(u, s.lr) for u in owned.user_ids], dtype=torch.float64)
                    if self.user_lr else s.lr)
            lr = per_user_lr(base, s.schedule, s.warmup_steps, s.min_lr_ratio, steps, totals)
            self.store.apply(owned, lr, keep=keep)
        return bad, diverged

    def fit(self, plans: Iterable[StepPlan], on_step: Callable[[StepStats], None] | None = None) -> list[StepStats]:
        stats = []
        plans = iter(plans)
        plan = next(plans, None)
        while plan is not None:
            following = next(plans, None)
            st = self.train_step(plan, following)
            stats.append(st)
            if on_step is not None:
                on_step(st)
            plan = following
        return stats

"""The step loop: fetch the step's rows, forward/backward each micro-batch through the frozen base
with every example on its own user's adapter, then one row-wise optimizer step on those rows."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flora_train.adapters import AdapterSlot
from flora_train.data.planner import StepPlan
from flora_train.data.tokenize import collate
from flora_train.store import AdapterStore
from flora_train.train.loss import per_user_loss, target_tokens
from flora_train.train.schedule import per_user_lr


class NonFiniteError(RuntimeError):
    pass


@dataclass(frozen=True)
class TrainSettings:
    lr: float
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    micro_batch_size: int = 64
    nonfinite: str = "skip_users"  # skip_users | skip_step | error
    max_consecutive_nonfinite: int = 3
    autocast_dtype: torch.dtype | None = None


@dataclass
class StepStats:
    step: int
    loss: float  # mean over the step's users of each user's mean token loss
    users: int
    examples: int
    tokens: int
    target_tokens: int
    seconds: float
    skipped_users: list[str] = field(default_factory=list)
    user_losses: dict[str, float] = field(default_factory=dict)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        slot: AdapterSlot,
        store: AdapterStore,
        examples: dict[str, list[Any]],
        settings: TrainSettings,
        user_total_steps: dict[str, int],
        pad_id: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.slot = slot
        self.store = store
        self.input_ids: list[list[int]] = examples["input_ids"]
        self.labels: list[list[int]] = examples["labels"]
        self.settings = settings
        self.user_total_steps = user_total_steps
        self.pad_id = pad_id
        self.device = device
        self.consecutive_faults = 0
        self.nonfinite_steps = 0

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.settings.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _batch(self, ids: list[int]) -> dict[str, torch.Tensor]:
        batch = collate([{"input_ids": self.input_ids[i], "labels": self.labels[i]} for i in ids], self.pad_id)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, plan: StepPlan) -> StepStats:
        start = time.perf_counter()
        users = plan.user_ids
        rows = self.store.fetch(users, requires_grad=True)
        position = rows.position()
        micro = plan.micro_batches(self.settings.micro_batch_size)
        batches = [self._batch([i for _, i in mb]) for mb in micro]
        # Each user's target tokens over the whole step, so micro-batching never changes the result.
        user_tokens = torch.zeros(len(users), dtype=torch.long, device=self.device)
        poss = []
        for mb, batch in zip(micro, batches):
            pos = torch.tensor([position[u] for u, _ in mb], device=self.device)
            user_tokens.index_add_(0, pos, target_tokens(batch["labels"]))
            poss.append(pos)
        user_loss = torch.zeros(len(users), device=self.device)
        n_tokens = 0
        for batch, pos in zip(batches, poss):
            with self.slot.activate(rows.values, pos), self._autocast():
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                objective, contrib = per_user_loss(logits, batch["labels"], pos, user_tokens)
                objective.backward()
            user_loss += contrib
            n_tokens += int(batch["attention_mask"].sum())
        skipped = self._apply(rows, users, user_loss)
        seconds = time.perf_counter() - start
        finite = torch.isfinite(user_loss)
        losses = user_loss.tolist()
        return StepStats(
            step=plan.step,
            loss=float(user_loss[finite].mean()) if finite.any() else float("nan"),
            users=len(users),
            examples=plan.num_examples,
            tokens=n_tokens,
            target_tokens=int(user_tokens.sum()),
            seconds=seconds,
            skipped_users=skipped,
            user_losses=dict(zip(users, losses)),
        )

    def _apply(self, rows, users: list[str], user_loss: torch.Tensor) -> list[str]:
        """Runs the sparse step on rows whose loss and gradient are finite; returns skipped users."""
        grad = rows.values.grad
        ok = torch.isfinite(user_loss) & torch.isfinite(grad).all(dim=1)
        bad = [u for u, good in zip(users, ok.tolist()) if not good]
        if bad:
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
        s = self.settings
        steps = self.store.steps(users) + 1
        totals = torch.tensor([self.user_total_steps.get(u, 1) for u in users])
        lr = per_user_lr(s.lr, s.schedule, s.warmup_steps, s.min_lr_ratio, steps.cpu(), totals)
        self.store.apply(rows, lr, keep=ok)
        return bad

    def fit(self, plans: Iterable[StepPlan], on_step: Callable[[StepStats], None] | None = None) -> list[StepStats]:
        stats = []
        for plan in plans:
            st = self.train_step(plan)
            stats.append(st)
            if on_step is not None:
                on_step(st)
        return stats

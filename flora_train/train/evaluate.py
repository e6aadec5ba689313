"""Per-user held-out loss and accuracy, many users mixed in every batch.

Accuracy is exact match: an example counts as correct when the argmax prediction is right on
every one of its target tokens (teacher-forced). Aggregates are over users (each user weighs
the same), reported as mean and percentiles; per-user figures go to a file, never to one metric
key per user.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flora_train.adapters import AdapterSlot
from flora_train.data.examples import TokenizedExamples
from flora_train.data.tokenize import IGNORE, collate
from flora_train.files import replaced
from flora_train.train.loss import example_losses, target_logits


@dataclass
class UserEval:
    examples: int = 0
    correct: int = 0
    loss_sum: float = 0.0
    tokens: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.examples if self.examples else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens if self.tokens else float("nan")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def summarise(per_user: dict[str, UserEval], prefix: str = "eval") -> dict[str, float]:
    acc = [u.accuracy for u in per_user.values() if u.examples]
    loss = [u.loss for u in per_user.values() if u.tokens]
    out = {f"{prefix}/users": float(len(acc))}
    for name, vals in (("accuracy", acc), ("loss", loss)):
        if vals:
            out[f"{prefix}/{name}_mean"] = sum(vals) / len(vals)
            for q in (0.1, 0.5, 0.9):
                out[f"{prefix}/{name}_p{int(q * 100)}"] = _percentile(vals, q)
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    slot: AdapterSlot,
    rows_for: Callable[[list[str]], torch.Tensor],
    examples: TokenizedExamples,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    total_batches: int = 0,
) -> dict[str, UserEval]:
    """``rows_for(user_ids) -> [len(user_ids), row_size]`` supplies each user's adapter row.

    ``total_batches`` > the batches this rank's examples fill: the rest are one-token forwards, so
    every rank runs the same module sequence (ZeRO-3 gathers each layer collectively)."""
    order = np.argsort(examples.user_codes, kind="stable").tolist()
    results: dict[str, UserEval] = {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            ids = order[start : start + batch_size]
            users = [examples.user(i) for i in ids]
            unique = list(dict.fromkeys(users))
            pos = {u: k for k, u in enumerate(unique)}
            index = torch.tensor([pos[u] for u in users], device=device)
            rows = rows_for(unique).to(device)
            batch = collate([{"input_ids": examples.input_ids(i), "labels": examples.labels(i)} for i in ids], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
            with slot.activate(rows, index), ctx:
                t = target_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            losses = example_losses(t)
            wrong = torch.zeros(len(ids), dtype=torch.long, device=device).index_add_(
                0, t.example, (t.logits.argmax(-1) != t.targets).long())
            right = wrong == 0
            mask = batch["labels"][:, 1:] != IGNORE
            for k, user in enumerate(users):
                r = results.setdefault(user, UserEval())
                r.examples += 1
                r.correct += int(right[k])
                r.loss_sum += float(losses[k])
                r.tokens += int(mask[k].sum())
        pad = collate([{"input_ids": [pad_id], "labels": [IGNORE]}], pad_id)
        for _ in range(total_batches - -(-len(order) // batch_size)):
            ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
            with slot.activate(rows_for(["__pad__"]).to(device), torch.zeros(1, dtype=torch.long)), ctx:
                model(input_ids=pad["input_ids"].to(device), attention_mask=pad["attention_mask"].to(device))
    finally:
        model.train(was_training)
    return results


def write_per_user(path: Path, per_user: dict[str, UserEval]) -> None:
    """One JSON line per user: id, examples, accuracy, loss."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for user, r in sorted(per_user.items()):
            f.write(json.dumps({"user_id": user, "examples": r.examples, "accuracy": r.accuracy, "loss": r.loss}) + "\n")

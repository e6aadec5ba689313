"""Per-user selection (``train.select: best``, ``train.patience``): beside each user's training row
the store keeps the row to serve (``kept``, no optimizer state; under ``train.select: best`` only),
the best validation loss and the step it is from, and the validations since it last improved.
They are ordinary columns of the store's table, so every tier, the sharding, incremental
checkpoints and restores at another world size carry them like the optimizer's moments.

A user's kept row is the best on its own validation split of: its row when its phase began (the
identity: the shared adapter alone, or the base) and its row at each validation since. A user with
no validation example keeps the first (so it keeps the shared adapter). Nothing here depends on
any other user's loss. Under ``train.select: last`` (``train.patience`` alone) there is no kept row:
a user is served its last row, the one it stopped with.
"""

from __future__ import annotations

import torch

from flora_train.store.table import Column

KEPT = "select.kept"
BEST_LOSS = "select.best_loss"
BEST_STEP = "select.best_step"
STALE = "select.stale"  # validations with a loss since the best one
SEEN = "select.seen"  # validations so far (0: kept holds nothing yet; readers use the row)
STOPPED_AT = "select.stopped_at"  # 1 + the step after which the user left the plan (0: training)


def selection_columns(row_size: int, keep_best: bool) -> dict[str, Column]:
    """The columns for ``train.select: best`` (``keep_best``: the kept row too) or ``last``."""
    kept = {KEPT: Column((row_size,), torch.float32)} if keep_best else {}
    return {**kept, BEST_LOSS: Column((), torch.float32), BEST_STEP: Column((), torch.int64),
            STALE: Column((), torch.int64), SEEN: Column((), torch.int64), STOPPED_AT: Column((), torch.int64)}


def select_update(columns: dict[str, torch.Tensor], losses: torch.Tensor, step: int,
                  patience: int | None) -> dict[str, torch.Tensor]:
    """The selection columns after a validation at ``step`` (``columns``: the users' current ``rows``
    and selection columns, ``select.kept`` where the store keeps one; ``losses [users]``: NaN for a
    user with no validation loss)."""
    first = columns[SEEN] == 0
    has = torch.isfinite(losses)
    # A finite loss beats a NaN best (a first validation that had none).
    improved = first | (has & ((losses < columns[BEST_LOSS]) | torch.isnan(columns[BEST_LOSS])))
    stale = torch.where(improved, torch.zeros_like(columns[STALE]), columns[STALE] + has.long())
    out = {
        **({KEPT: torch.where(improved.unsqueeze(1), columns["rows"], columns[KEPT])} if KEPT in columns else {}),
        BEST_LOSS: torch.where(improved, losses.to(columns[BEST_LOSS].dtype), columns[BEST_LOSS]),
        BEST_STEP: torch.where(improved, torch.full_like(columns[BEST_STEP], step), columns[BEST_STEP]),
        STALE: stale,
        SEEN: columns[SEEN] + 1,
        STOPPED_AT: columns[STOPPED_AT],
    }
    if patience is not None:
        stop = (columns[STOPPED_AT] == 0) & (stale >= patience)
        out[STOPPED_AT] = torch.where(stop, torch.full_like(columns[STOPPED_AT], step + 1), columns[STOPPED_AT])
    return out


def fresh_selection(n: int) -> dict[str, torch.Tensor]:
    """The scalar selection columns of ``n`` users that start choosing afresh (a new phase trains
    them on new data: their earlier losses were on another validation split, and a stop then is no
    reason to stop now). With nothing seen, each is served its row until its next validation."""
    return {BEST_LOSS: torch.full((n,), float("nan")), BEST_STEP: torch.zeros(n, dtype=torch.int64),
            STALE: torch.zeros(n, dtype=torch.int64), SEEN: torch.zeros(n, dtype=torch.int64),
            STOPPED_AT: torch.zeros(n, dtype=torch.int64)}


def served_rows(rows: torch.Tensor, kept: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """What a user is served with: its kept row once a validation chose one, else its row."""
    return torch.where((seen > 0).reshape(-1, 1), kept, rows)

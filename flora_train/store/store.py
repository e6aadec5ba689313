"""The single-process adapter store: registry + table of rows + row-wise optimizer.

A step fetches the rows of its users as one leaf tensor on the compute device, the model writes
their gradients into it, and ``apply`` runs the optimizer on exactly those rows. Work per step is
proportional to the rows in the step, never to the rows in the table (``index_select`` /
``index_copy_`` on row numbers). A sharded store (other placements) keeps this interface.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flora_train.store.disk_table import DiskTable
from flora_train.store.optimizers import OptimizerHyper, RowAccess, make_optimizer
from flora_train.store.registry import UserRegistry
from flora_train.store.selection import (BEST_LOSS, KEPT, SEEN, STOPPED_AT, fresh_selection, select_update,
                                         selection_columns, served_rows)
from flora_train.store.table import Column, HotRowCache, RowTable, saved_key
from flora_train.store.tiers import tier_named
from flora_train.store.transfer import Download, HostLink, Upload

RowInit = Callable[[Sequence[str]], torch.Tensor]


@dataclass
class StepRows:
    """The rows of one step's users on the compute device: ``values [users, row_size]`` is a leaf."""

    user_ids: list[str]
    row_ids: torch.Tensor
    values: torch.Tensor

    def position(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.user_ids)}


INIT_CHUNK = 65_536  # users whose rows are initialised together when users are added


class AdapterStore:
    """One shard's users: registry, a ``RowTable`` of rows + optimizer columns on a tier, and an
    optional hot-row cache on the compute device. ``ShardedAdapterStore`` places many of these."""

    def __init__(
        self,
        row_size: int,
        row_init: RowInit,
        hyper: OptimizerHyper,
        tier: str = "host",
        compute_device: torch.device | str = "cpu",
        directory: Path | None = None,
        cache_rows: int = 0,
        select: str | None = None,
    ) -> None:
        """``select``: keep per-user selection columns beside the rows (``selection.py``): ``best``
        (each user served the row its validations chose) or ``last`` (validated only to stop users)."""
        if select not in (None, "best", "last"):
            raise ValueError(f"select must be None, 'best' or 'last', got {select!r}")
        self.row_size = row_size
        self.row_init = row_init
        self.hyper = hyper
        self.compute_device = torch.device(compute_device)
        self.registry = UserRegistry()
        self.optimizer = make_optimizer(hyper)
        columns = {"rows": Column((row_size,), torch.float32), **self.optimizer.columns(row_size),
                   **(selection_columns(row_size, keep_best=select == "best") if select else {})}
        tier_kind = tier_named(tier)
        self.table: RowTable | DiskTable = tier_kind.table(columns, self.compute_device, directory)
        # The cache only pays when rows live away from the compute device. Rows whose home is the
        # host (no cache) cross to the device for a step and their gradients come back (transfer.py).
        cached = bool(cache_rows) and not tier_kind.on_compute_device
        self.link = HostLink(host_home=not tier_kind.on_compute_device and not cached, compute=self.compute_device)
        self.cache = HotRowCache(self.table, cache_rows, self.compute_device, self.link.transfers) if cached else None
        self.access: RowAccess = self.cache if self.cache is not None else self.table
        # Rows changed since the checkpoint named ``saved_at`` (an incremental checkpoint writes
        # only these). Touched by the training thread only; the prefetch thread never writes rows.
        self._changed: set[int] = set()
        self.saved_at: str | None = None

    def __len__(self) -> int:
        return len(self.registry)

    @property
    def capacity(self) -> int:
        return self.table.capacity

    def add_users(self, user_ids: Sequence[str]) -> list[str]:
        """Registers unknown users with freshly initialised rows; returns the new ids."""
        start = len(self)
        new = [u for u in dict.fromkeys(user_ids) if u not in self.registry]
        if new:
            self.table.reserve(start + len(new))  # amortised growth: the table is never rebuilt per user
            # Initialised a chunk at a time: a million users' rows at once would be gigabytes of
            # temporaries on top of the table.
            for k in range(0, len(new), INIT_CHUNK):
                some = new[k : k + INIT_CHUNK]
                init = self.row_init(some)
                if init.shape != (len(some), self.row_size):
                    raise ValueError(f"row_init returned {tuple(init.shape)}, expected {(len(some), self.row_size)}")
                self.table.scatter("rows", torch.arange(start + k, start + k + len(some)), init)
            self.registry.add(new)
            self._changed.update(range(start, start + len(new)))
        return new

    def row_ids(self, user_ids: Sequence[str]) -> torch.Tensor:
        return torch.tensor(self.registry.rows(user_ids), dtype=torch.int64)

    @property
    def selects(self) -> bool:
        """Whether users are validated (``train.select: best`` or ``train.patience``)."""
        return SEEN in self.table.columns

    def read(self, user_ids: Sequence[str], served: bool = False) -> torch.Tensor:
        """A copy of the users' rows ``[len(user_ids), row_size]``; ``served``: the row each user is
        served with (its kept row once a validation chose one, under ``train.select: best``)."""
        rows = self.row_ids(user_ids)
        access = self.access
        if self.cache is not None and len(user_ids) > self.cache.capacity:
            self.cache.flush()  # a bulk read (evaluation, export) reads through, leaving hot rows be
            access = self.table
        if served and KEPT in self.table.columns:
            return served_rows(access.gather("rows", rows), access.gather(KEPT, rows), access.gather(SEEN, rows))
        return access.gather("rows", rows)

    def validated(self, user_ids: Sequence[str], losses: torch.Tensor, step: int, patience: int | None) -> None:
        """Records a validation at ``step`` (``losses``: NaN where a user had none; ``selection.py``)."""
        names = ["rows", *(n for n in self.table.columns if n.startswith("select."))]

        def updated(rows: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
            current = {n: self.table.gather(n, rows).cpu() for n in names}
            return select_update(current, losses[k : k + len(rows)].cpu(), step, patience)

        self._rewrite_selection(user_ids, updated)

    def restart_selection(self, user_ids: Sequence[str]) -> None:
        """The users choose afresh from their next validation on (``selection.fresh_selection``)."""
        self._rewrite_selection(user_ids, lambda rows, k: fresh_selection(len(rows)))

    def stop(self, user_ids: Sequence[str], step: int) -> None:
        """The users leave the plan after ``step``, as a patience stop leaves it (a sweep's variant
        whose loss went non-finite); a user already stopped keeps its step."""

        def columns(rows: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
            at = self.table.gather(STOPPED_AT, rows).cpu()
            return {STOPPED_AT: torch.where(at == 0, torch.full_like(at, step + 1), at)}

        self._rewrite_selection(user_ids, columns)

    def _rewrite_selection(self, user_ids: Sequence[str],
                           columns: Callable[[torch.Tensor, int], dict[str, torch.Tensor]]) -> None:
        """Writes ``columns(rows, k)`` for the users from ``user_ids[k]`` on, a chunk at a time. Every
        user at once: through the table, the cache starting afresh."""
        if self.cache is not None:
            self.cache.flush()
            self.cache.invalidate()
        for k in range(0, len(user_ids), INIT_CHUNK):
            rows = self.row_ids(user_ids[k : k + INIT_CHUNK])
            self.table.scatter_columns(rows, columns(rows, k))
            self._changed.update(rows.tolist())

    def best_losses(self) -> dict[str, float]:
        """Each user's kept row's validation loss (NaN before its first validation)."""
        if not self.selects or not len(self):
            return {}
        if self.cache is not None:
            self.cache.flush()
        every = torch.arange(len(self))
        loss = self.table.gather(BEST_LOSS, every).cpu()
        loss = torch.where(self.table.gather(SEEN, every).cpu() > 0, loss, torch.full_like(loss, float("nan")))
        return dict(zip(self.registry.ids, loss.tolist()))

    def stopped(self) -> list[str]:
        """Users that left the plan (``train.patience``)."""
        if not self.selects or not len(self):
            return []
        if self.cache is not None:
            self.cache.flush()
        at = self.table.gather(STOPPED_AT, torch.arange(len(self))).cpu()
        return [self.registry.ids[i] for i in (at > 0).nonzero().squeeze(1).tolist()]

    def write(self, user_ids: Sequence[str], values: torch.Tensor) -> None:
        """Overwrites the users' rows (e.g. loading an exported adapter); optimizer state is kept."""
        rows = self.row_ids(user_ids)
        self.access.scatter("rows", rows, values)
        self._changed.update(rows.tolist())

    def steps(self, user_ids: Sequence[str]) -> torch.Tensor:
        """Each user's optimizer step counter (how many steps it has trained)."""
        return self.access.gather("step", self.row_ids(user_ids)).cpu()

    def fetch(self, user_ids: Sequence[str], requires_grad: bool = True) -> StepRows:
        if len(set(user_ids)) != len(user_ids):
            raise ValueError("fetch takes each user once")
        row_ids = self.row_ids(user_ids)
        values = self.link.upload(self.step_rows(row_ids)).wait()
        return StepRows(list(user_ids), row_ids, values.requires_grad_(requires_grad))

    def step_rows(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Table rows read for a step's compute, where they live (counted if they leave the host)."""
        return self.link.leaving(self.access.gather("rows", row_ids))

    def upload(self, user_ids: Sequence[str], background: bool = False) -> Upload:
        """The users' rows for a step, on their way to the compute device."""
        return self.link.upload(self.step_rows(self.row_ids(user_ids)), background)

    def download(self, grad: torch.Tensor) -> Download:
        """Starts a step's gradients towards their rows' home: the optimizer runs where the state
        lives (the host for host and disk tiers: the moments never cross)."""
        return self.link.download(grad, self.access.device)

    def apply(self, step: StepRows, lr: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """One optimizer step on the step's rows from ``step.values.grad``.

        ``lr [users]`` is each row's learning rate; ``keep [users]`` (bool) leaves rows out of the
        update entirely (weights, moments and step counter untouched).
        """
        grad = step.values.grad
        if grad is None:
            raise RuntimeError("no gradient on the step's rows; did backward run inside the adapter slot?")
        self.update(step.row_ids, grad, lr, keep)

    def update(self, row_ids: torch.Tensor, grad: torch.Tensor | Download, lr: torch.Tensor,
               keep: torch.Tensor | None = None) -> None:
        """The optimizer step on table rows ``row_ids`` from their gradients, where the rows live
        (``grad``: on any device, or a ``download`` already on its way there)."""
        grad = (grad if isinstance(grad, Download) else self.download(grad)).wait()
        if keep is not None and not bool(keep.all()):
            sel = keep.cpu().nonzero().squeeze(1)
            row_ids, grad, lr = row_ids[sel], grad[sel.to(grad.device)], lr[sel]
        if row_ids.numel() == 0:
            return
        self.optimizer.update(self.access, row_ids, grad, lr)
        self._changed.update(row_ids.tolist())

    # -- persistence ---------------------------------------------------------------------------

    def state_tensors(self, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every column of every user (or of table ``rows`` only), keyed ``rows`` and
        ``optim.<state>``, on the CPU. Whole columns of a host or disk table are views, not copies
        (on the disk tier strided views of its compacted records: copying them would put the
        whole table in private memory); ``save_rows`` writes them a slice at a time. ``rows`` are
        gathered (a delta checkpoint: the disk tier's log stays as it is)."""
        if self.cache is not None:
            self.cache.flush()
        n = len(self)
        out = {}
        for name in self.table.columns:
            column = self.table.column(name)[:n] if rows is None else self.table.gather(name, rows)
            out[saved_key(name)] = column.detach().cpu()
        return out

    def changed_rows(self) -> torch.Tensor:
        """Table rows changed since ``saved_at``, in row order."""
        return torch.tensor(sorted(self._changed), dtype=torch.int64)

    def mark_saved(self, checkpoint: str | None, changed: Sequence[int] = ()) -> None:
        """The store now equals ``checkpoint`` except for table rows ``changed``."""
        self.saved_at = checkpoint
        self._changed = set(changed)

    def check_state(self, n: int, shapes: dict[str, tuple[int, ...]], source: str) -> None:
        """That ``n`` users' saved columns have this store's keys and shapes (before anything changes)."""
        for name, col in self.table.columns.items():
            key = saved_key(name)
            if key not in shapes:
                raise ValueError(f"{source}: {key} missing (saved with another optimizer than {self.hyper.name}, or "
                                 "another train.select?)")
            if tuple(shapes[key]) != (n, *col.shape):
                raise ValueError(f"{source}: {key} has shape {tuple(shapes[key])}, expected {(n, *col.shape)} for {n} users")

    def begin_load(self, user_ids: Sequence[str], source: str) -> None:
        """Replaces the users with ``user_ids`` (rows ``0..n-1`` in that order); ``load_rows`` fills them."""
        registry = UserRegistry(user_ids)
        if len(registry) != len(user_ids):
            raise ValueError(f"{source}: duplicate user ids")
        if self.registry.keys_indexed:
            registry.index_keys()  # the restored users are checked as the ones they replace were
        self.registry = registry
        self.table.reserve(len(user_ids))
        if self.cache is not None:
            self.cache.invalidate()

    def load_rows(self, rows: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        """Writes saved columns (``state_tensors``' keys) into table ``rows`` (a restore, a chunk at a
        time); the caller has checked their keys and shapes (``check_state``)."""
        self.table.scatter_columns(rows, {name: tensors[saved_key(name)] for name in self.table.columns})

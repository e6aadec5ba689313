"""Training phases: adding users to a trained population without touching the others.

A run trains every user of its data: phase 0. Resumed with users added, or with some users' data
changed (``train.on_data_change: new_phase``), it plans a new phase of just those users: new users
start from fresh rows, changed users go on from theirs, and every other user keeps its row and
optimizer state bit for bit. The step counter goes on across phases.

To tell who changed, each phase writes ``run_dir/phases/phase-NNNNN.parquet`` when it starts: a
hash of every user's examples (tokens and labels, in order), which users the phase trains, and the
steps each had taken before it (so a continuing user's per-user LR schedule spans all its steps).
The checkpoint's state names its phase, so a resume mid-phase replans exactly that phase.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flora_train import dist as fdist
from flora_train.data.examples import TokenizedExamples
from flora_train.data.planner import BatchPlanner, StepPlan
from flora_train.files import replaced
from flora_train.run_dir import RunDir
from flora_train.run_dir.checkpoints import CheckpointError

if TYPE_CHECKING:
    from flora_train.train.session import Session


@dataclass(frozen=True)
class Phase:
    index: int = 0
    start_step: int = 0  # the global step the phase's first step has
    end_step: int | None = None  # the global step its plan ends at (None: not known, an older checkpoint)
    users_file: str | None = None  # under run_dir/phases; None: a checkpoint from before phases

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "Phase":
        saved = state.get("phase")
        return cls(**saved) if saved else cls()


@dataclass(frozen=True)
class PhaseUsers:
    """One phase's file: every user's data hash when it started, whom it trains, their prior steps."""

    hashes: dict[str, str]
    trained: list[str]
    steps_before: dict[str, int]
    run_id: str | None = None  # the run that wrote it (schema metadata; None in files from before run ids)


PHASE_COLUMNS = {"user_id": pa.string(), "data_hash": pa.string(), "trained": pa.bool_(), "steps_before": pa.int64()}


def phase_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).phases


def user_data_hashes(examples: TokenizedExamples) -> dict[str, str]:
    """Per user, a hash of its examples' tokens and labels in order (what training sees of it)."""
    out = {}
    for user, idx in examples.by_user().items():
        h = hashlib.blake2b(digest_size=12)
        for i in idx.tolist():
            ids, labels = examples.input_ids(i), examples.labels(i)
            h.update(np.int64(len(ids)).tobytes() + ids.astype("<i4").tobytes() + labels.astype("<i4").tobytes())
        out[user] = h.hexdigest()
    return out


def write_phase_users(run_dir: Path, index: int, users: PhaseUsers) -> str:
    """Rank 0 writes the phase's file atomically (a temporary name, then a rename); returns its name."""
    name = f"phase-{index:05d}.parquet"
    folder = phase_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    trained = set(users.trained)
    ids = sorted(users.hashes)
    table = pa.table({
        "user_id": ids,
        "data_hash": [users.hashes[u] for u in ids],
        "trained": [u in trained for u in ids],
        "steps_before": [users.steps_before.get(u, 0) for u in ids],
    }, schema=pa.schema(PHASE_COLUMNS, metadata={"run_id": users.run_id} if users.run_id else None))
    with replaced(folder / name) as tmp:
        pq.write_table(table, tmp)
    return name


def read_phase_table(path: Path) -> pa.Table:
    """A phase file, or a ``CheckpointError`` naming it when it is missing, unreadable or not one."""
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint's phase names this file, which says who the phase "
                              "trains (was the run directory copied without its phases/ folder?)") from None
    except (OSError, pa.ArrowException) as exc:
        raise CheckpointError(f"{path}: not a readable phase file ({exc}); it is written once, atomically, when "
                              "a phase starts: restore it from a copy of the run directory") from None
    names = set(table.schema.names)
    wrong = sorted(k for k, t in PHASE_COLUMNS.items() if k not in names or table.schema.field(k).type != t)
    if wrong:
        raise CheckpointError(f"{path}: not a phase file (columns {', '.join(wrong)} missing or of another type)")
    return table


def read_phase_users(run_dir: Path, name: str, run_id: str | None = None) -> PhaseUsers:
    """A phase file; with ``run_id``, one that another run wrote is refused (a file of a run that
    was replaced must never plan this run's phase)."""
    path = phase_dir(run_dir) / name
    arrow = read_phase_table(path)
    written_by = (arrow.schema.metadata or {}).get(b"run_id", b"").decode() or None
    if run_id is not None and written_by != run_id:
        raise CheckpointError(f"{path}: written by run {written_by}, but the checkpoint is of run {run_id}; the phase "
                              "files of this run_dir belong to another run")
    table = arrow.to_pydict()
    ids = table["user_id"]
    return PhaseUsers(
        hashes=dict(zip(ids, table["data_hash"])),
        trained=[u for u, t in zip(ids, table["trained"]) if t],
        steps_before={u: s for u, s in zip(ids, table["steps_before"]) if s},
        run_id=written_by,
    )


def changed_users(now: Mapping[str, str], before: Mapping[str, str]) -> list[str]:
    """Users whose data is new or differs from what the earlier phase saw, sorted."""
    return sorted(u for u, h in now.items() if before.get(u) != h)


def gather_steps(store: Any, users: list[str]) -> dict[str, int]:
    """Every rank gets the step counters of ``users`` from their owners (collective)."""
    owned = [u for u in users if store.owns(u)]
    mine = dict(zip(owned, store.steps(owned).tolist())) if owned else {}
    merged: dict[str, int] = {}
    for part in fdist.all_gather_objects({u: int(s) for u, s in mine.items() if s}):
        merged.update(part)
    return merged


@dataclass
class PhasePlan:
    """A phase's planner with its steps numbered from the phase's start (global step numbers)."""

    planner: BatchPlanner
    phase: Phase
    steps_before: dict[str, int]

    def total_steps(self, epochs: int, max_steps: int | None) -> int:
        """The global step the phase ends at (``max_steps`` caps each phase's own plan)."""
        return self.phase.start_step + self.planner.total_steps(epochs, max_steps)

    def steps(self, epochs: int, max_steps: int | None, start: int) -> Iterator[StepPlan]:
        offset = self.phase.start_step
        for plan in self.planner.steps(epochs, max_steps, start=max(start - offset, 0)):
            yield replace(plan, step=plan.step + offset)

    def user_total_steps(self, epochs: int) -> dict[str, int]:
        """Each user's steps over the run: those before this phase plus this phase's (its epochs'
        plan, whatever ``train.max_steps`` cuts off it)."""
        counts = self.planner.user_step_counts(epochs)
        return {u: n + self.steps_before.get(u, 0) for u, n in counts.items()}


def set_phase(session: "Session", phase: Phase, users: list[str] | None, steps_before: dict[str, int]) -> None:
    """Points the session at ``phase``: its planner covers ``users`` (None: every user)."""
    t = session.cfg.train
    planner = session.planner if users is None else session.planner.restricted(users)
    plan = PhasePlan(planner, phase, steps_before)
    session.phase_plan = replace(plan, phase=replace(phase, end_step=plan.total_steps(t.epochs, t.max_steps)))


def first_phase(session: "Session") -> None:
    """A fresh run's phase 0 trains every user; rank 0 records their data hashes for later phases."""
    name = None
    if fdist.rank() == 0:
        name = write_phase_users(session.run_dir, 0, PhaseUsers(user_data_hashes(session.train), session.train.users(), {},
                                                                 session.run_id))
    set_phase(session, Phase(0, 0, None, fdist.broadcast_object(name)), None, {})


def continue_phase(session: "Session", state: Mapping[str, Any]) -> None:
    """A resume onto the data its checkpoint's phase trains: that phase's plan again."""
    phase = Phase.from_state(state)
    if phase.index == 0 or phase.users_file is None:
        set_phase(session, phase, None, {})
        return
    saved = read_phase_users(session.run_dir, phase.users_file, session.run_id)
    set_phase(session, phase, saved.trained, saved.steps_before)


def next_phase(session: "Session", ckpt: Path, state: Mapping[str, Any]) -> None:
    """Users were added or their data changed (``train.on_data_change: new_phase``): a new phase
    trains exactly those users, from the checkpoint's step on; everyone else is left as it is."""
    old, at = Phase.from_state(state), int(state["next_step"])
    if old.end_step is not None and at < old.end_step:
        raise CheckpointError(
            f"{ckpt}: stopped at step {at} of phase {old.index}, whose plan runs to step {old.end_step}; adding or changing "
            "users now would leave the others part-way through their schedule. Finish the run on the data it was "
            "started with (resume without the change, or set train.max_steps to stop where it is), then add the users"
        )
    # A checkpoint from before phases were recorded names no file: every user then counts as changed.
    before = read_phase_users(session.run_dir, old.users_file, session.run_id) if old.users_file is not None else None
    now = user_data_hashes(session.train)
    train = changed_users(now, before.hashes if before else {})
    steps_before = gather_steps(session.store, train)
    index, name = old.index + 1, None
    if fdist.rank() == 0:
        # Users absent from this data keep their last hash, so coming back unchanged is not a change.
        hashes = {**(before.hashes if before else {}), **now}
        name = write_phase_users(session.run_dir, index, PhaseUsers(hashes, train, steps_before, session.run_id))
        why = "" if before else " (its checkpoint has no per-user data hashes, so every user counts as changed)"
        print(f"train.on_data_change=new_phase: phase {index} from step {at} trains {len(train)} user(s) whose data is "
              f"new or changed{why}; the other {len(now) - len(train)} keep their adapters as they are")
    set_phase(session, Phase(index, at, None, fdist.broadcast_object(name)), train, steps_before)


def check_phase_files(run_dir: Path) -> None:
    """Every phase file reads (before ``forget`` rewrites anything, so it never stops half-way)."""
    for path in sorted(phase_dir(run_dir).glob("phase-*.parquet")):
        read_phase_table(path)


def forget_in_phases(run_dir: Path, forget: set[str]) -> int:
    """Rewrites each phase file without the forgotten users (``flora-train forget``); returns the
    entries removed."""
    removed = 0
    for path in sorted(phase_dir(run_dir).glob("phase-*.parquet")):
        table = read_phase_table(path)
        keep = pc.invert(pc.is_in(table.column("user_id"), value_set=pa.array(sorted(forget), pa.string())))
        kept = table.filter(keep)
        if kept.num_rows == table.num_rows:
            continue
        removed += table.num_rows - kept.num_rows
        with replaced(path) as tmp:
            pq.write_table(kept, tmp)
    return removed

"""Where everything of a run lives on disk. The only code that joins a name onto a run directory:
training, inference, export, lifecycle and the CLI ask this class for a path.

```
run_dir/
  .lock                     the writer's lock (lock.py)
  recipe.yaml               the recipe as trained (resolved; local paths absolute)
  checkpoints/step-NNNNNNNN one folder per checkpoint (checkpoints.py); .tmp-* while written
  checkpoints/.readers/     readers' leases on checkpoints, exports against forget (readers.py)
  phases/phase-NNNNN.parquet who each training phase trains (train/phases.py)
  shared_adapter.safetensors the adapter shared by every user (train.compare_shared_baseline)
  shared_adapter.removed.json its steps, once forget removed it (forget --retrain-shared trains it again)
  eval/                     per-user evaluations, summaries, generation reports
  eval/data-<name>-<hash>/  the same for `flora-train eval --data FILE` (the run's own stay as they were)
  export/<format>/          exports written by the run (index.json + manifest.json each)
  exports-elsewhere.jsonl   exports written outside export/ (`export --out`): forget and users reach them
  data/ data_cache/ base_model/ kernels/ store_tier/   derived: rebuilt from the data and recipe
  tracking-buffer*.jsonl    metrics not yet sent to MLflow
  mlflow.db mlartifacts/    the embedded MLflow store (tracking.uri unset); mlflow.db.lock: its openers
                            take turns on it (mlflow_store.py: a new store's tables are made once)
  result.json               what the last finished run reported
  replaced/                 runs moved aside by train.overwrite=true
```
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flora_train.errors import UserError, warn
from flora_train.files import read_json
from flora_train.run_dir.lock import LOCK_NAME

# What a run leaves that is its own: train.overwrite moves these aside, checkpoints first (a run
# directory without checkpoints holds no run to mix with). The data, its cache, a tiny base, the
# kernel choices and the MLflow store (one database of many runs) stay for the next run.
RUN_OWNED = ("checkpoints", "phases", "shared_adapter.safetensors", "shared_adapter.removed.json", "eval", "export",
             "exports-elsewhere.jsonl", "result.json", "recipe.yaml", "tracking-buffer.jsonl", "tracking-buffer-eval.jsonl",
             "store_tier")


class NotARunDir(UserError, FileNotFoundError):
    """A command that reads a run was given another path: says what is there and what to name."""


class InterruptedForget(UserError):
    """A ``flora-train forget`` was killed before it finished: until it is run again, the run's files
    may still hold the users it removes (and a checkpoint may be halfway through its swap)."""


class TornJournal(UserError):
    """``forget-pending.json`` is there but cannot be read whole: the users an interrupted ``forget``
    was removing are not all known. ``legible``: the names still whole in it (a cut keeps those before it)."""

    def __init__(self, path: Path, legible: list[str], why: str) -> None:
        super().__init__(f"{path}: cannot be read whole ({why})")
        self.path, self.legible, self.why = path, legible, why

    def legible_hint(self) -> str:
        if not self.legible:
            return " (no user's name is legible in it)"
        names = ", ".join(map(repr, self.legible[:5])) + (" ..." if len(self.legible) > 5 else "")
        return f" (still legible in it, and forgotten with them: {names})"


def _legible_names(text: str) -> list[str]:
    """The whole JSON strings in a torn ``{"users": [...]}``, but its key."""
    names = []
    for quoted in re.findall(r'"(?:[^"\\\n]|\\.)*"', text):
        try:
            name = json.loads(quoted)
        except ValueError:
            continue
        if name != "users":
            names.append(name)
    return names


@dataclass(frozen=True)
class RunDir:
    path: Path
    eval_of: str | None = None  # the evaluation files of another data file: eval/<eval_of>/ (eval_scope)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __str__(self) -> str:
        return str(self.path)

    @property
    def holds_run(self) -> bool:
        """Whether a run lives here (its recipe or its checkpoints), not an export or nothing."""
        return self.recipe.is_file() or self.checkpoints.is_dir()

    def require(self, command: str) -> None:
        """Raises ``NotARunDir`` unless the path holds a run (its recipe or its checkpoints), naming
        what it is instead: nothing, an export folder (and the run it came from) or a checkpoint;
        ``InterruptedForget`` while a killed ``forget`` waits to be completed (but for forget)."""
        path = self.path
        if self.holds_run:
            if command != "forget":
                self.refuse_interrupted_forget()
            return
        if not path.exists():
            raise NotARunDir(f"{path}: no such folder; {command} reads a run directory (the recipe's run_dir)")
        manifest = path / "manifest.json"
        if (path / "index.json").is_file() and manifest.is_file():
            info = json.loads(manifest.read_text())
            source = Path(str(info.get("checkpoint", ""))).parent.parent
            enclosing = RunDir(path.absolute().parent.parent)
            if path.absolute().parent == enclosing.exports and enclosing.holds_run:  # its run's export/<format>
                source = enclosing.path
            where = "" if str(source) == "." else f", {source}" + (
                "" if RunDir(source).holds_run else " (no run is there now: name the run directory where it is)")
            raise NotARunDir(f"{path}: a --format {info.get('format')} export, not a run directory; {command} reads "
                             f"the run it was exported from{where}")
        if (path / "layout.json").is_file():
            raise NotARunDir(f"{path}: a checkpoint, not a run directory; name its run, {path.parent.parent}"
                             + (", and --checkpoint " + str(path) if command in {"eval", "export"} else ""))
        raise NotARunDir(f"{path}: not a run directory (no recipe.yaml, no checkpoints/)")

    @property
    def forget_pending(self) -> Path:
        """The users a ``forget`` removes, written before it changes anything and deleted when it is
        done: a second ``forget`` completes a killed one from it."""
        return self.path / "forget-pending.json"

    def forget_pending_users(self) -> list[str]:
        """The users ``forget_pending`` names; none when there is none. ``TornJournal`` when it is there
        but cannot be read whole (a disk fault: it is written in one rename): who it named is not known."""
        try:
            text = self.forget_pending.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise TornJournal(self.forget_pending, [], str(exc)) from None
        try:
            users = json.loads(text)["users"]
            if isinstance(users, list) and all(isinstance(u, str) for u in users):
                return users
        except (ValueError, KeyError, TypeError):
            pass
        raise TornJournal(self.forget_pending, _legible_names(text), "torn")

    def refuse_interrupted_forget(self) -> None:
        """Raises ``InterruptedForget`` while ``forget_pending`` is there: reading or training the run
        then could serve, export or train on the users being forgotten."""
        if not self.forget_pending.is_file():
            return
        try:
            users = self.forget_pending_users()
        except TornJournal as torn:
            raise InterruptedForget(
                f"{self.path}: a `flora-train forget` was interrupted and its journal ({torn.path.name}) cannot be "
                f"read whole ({torn.why}); its users may still be in the run's files, so nothing reads or trains the "
                f"run until it is completed: `flora-train forget {self.path} --users ...` naming every user that "
                f"forget was given{torn.legible_hint()}") from None
        some = users[0] if users else "USER"
        raise InterruptedForget(
            f"{self.path}: a `flora-train forget` of {len(users)} user(s) was interrupted "
            f"({self.forget_pending.name}); its users may still be in the run's files, so nothing reads or trains "
            f"the run until it is completed: "
            f"`flora-train forget {self.path} --users {some}` (any of its users: it finishes them all)")

    @property
    def lock(self) -> Path:
        return self.path / LOCK_NAME

    @property
    def recipe(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def phases(self) -> Path:
        return self.path / "phases"

    @property
    def shared_adapter(self) -> Path:
        return self.path / "shared_adapter.safetensors"

    @property
    def shared_adapter_removed(self) -> Path:
        """The steps of the shared adapter that a forget removed, so that a later
        ``forget --retrain-shared`` can train it again as the run did."""
        return self.path / "shared_adapter.removed.json"

    def read_shared_adapter(self) -> tuple[Any, dict[str, str]] | None:
        """The shared adapter's row and its file's metadata (``steps``, ``trained_for``); None when
        there is none. A torn file or one that is not safetensors is ``UnreadableTensors`` naming it:
        the row is derived (the run trains it again), so each reader says what it does without it."""
        from flora_train.files import open_tensors

        if not self.shared_adapter.is_file():
            return None
        with open_tensors(self.shared_adapter) as f:
            return f.get_tensor("row"), dict(f.metadata() or {})

    def read_result(self) -> dict[str, Any] | None:
        """What the last finished run reported; None when there is none or it cannot be read (torn:
        the run's next end writes it again; the caller says what it does without it)."""
        result = read_json(self.result)
        return result if isinstance(result, dict) else None

    def run_steps(self) -> int:
        """The steps the last finished run reported (0 when its report cannot be read): what the
        shared adapter is trained for, where its own note of them is lost."""
        try:
            return int((self.read_result() or {}).get("steps", 0))
        except (TypeError, ValueError):
            return 0

    def removed_shared_steps(self) -> int | None:
        """The steps of a shared adapter a forget removed and nothing has retrained (None: none)."""
        if not self.shared_adapter_removed.is_file() or self.shared_adapter.is_file():
            return None
        noted = read_json(self.shared_adapter_removed)
        try:
            return int(noted["steps"])
        except (TypeError, KeyError, ValueError):
            steps = self.run_steps()
            warn(f"{self.shared_adapter_removed}: cannot be read; the shared adapter a forget removed trains again "
                 f"for the run's {steps} steps")
            return steps

    @property
    def eval(self) -> Path:
        return self.path / "eval" / self.eval_of if self.eval_of else self.path / "eval"

    @staticmethod
    def eval_scope(data: Path) -> str:
        """The folder name for scores on ``data`` (its name, and its absolute path's hash: two
        ``eval.jsonl`` of different folders stay apart)."""
        digest = hashlib.blake2b(str(Path(data).absolute()).encode(), digest_size=4).hexdigest()
        return f"data-{Path(data).name.split('.')[0][:40]}-{digest}"

    def eval_file(self, name: str) -> Path:
        return self.eval / name

    def validation_file(self, step: int) -> Path:
        """Each user's validation (and evaluation) loss at a validation of ``train.select``/``patience``."""
        return self.eval / f"validation-step{step}.jsonl"

    def validation_files(self) -> list[Path]:
        return sorted(self.eval.glob("validation-step*.jsonl"), key=lambda p: int(p.stem.split("step")[1]))

    def per_user_evals(self) -> list[Path]:
        """``eval/per_user-stepN.jsonl`` files, oldest step first."""
        return sorted(self.eval.glob("per_user-step*.jsonl"), key=lambda p: int(p.stem.split("step")[1]))

    @property
    def exports(self) -> Path:
        return self.path / "export"

    def export_dir(self, fmt: str) -> Path:
        return self.exports / fmt

    @property
    def exports_elsewhere(self) -> Path:
        """One line per export written outside ``export/`` (``--out`` anywhere): forget and users find them."""
        return self.path / "exports-elsewhere.jsonl"

    def run_id(self) -> str | None:
        """The id of the run held here (its newest readable checkpoint manifest's); None when none."""
        from flora_train.run_dir.checkpoints import list_checkpoints, read_manifest

        for ckpt in reversed(list_checkpoints(self.path)):
            try:
                return read_manifest(ckpt).get("run_id")
            except UserError:
                continue
        return None

    def foreign_checkpoint_error(self, checkpoint: Path) -> str | None:
        """Why ``checkpoint`` (a ``--checkpoint``) is not one of this run's (None: it is). Another
        run's exported, served or scored as this one's would mix the two: its export recorded
        with this run, which its own run's `forget` never reaches; this run's recipe and eval files."""
        folder = Path(checkpoint).resolve()
        if folder.parent == self.checkpoints.resolve():
            return None
        owner = folder.parent.parent
        if RunDir(owner).recipe.is_file():
            return f"--checkpoint {checkpoint}: a checkpoint of another run, {owner}; name that run"
        return f"--checkpoint {checkpoint}: not one of this run's checkpoints (they are in {self.checkpoints})"

    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def data_cache(self) -> Path:
        return self.path / "data_cache"

    @property
    def base_model(self) -> Path:
        return self.path / "base_model"

    def trained_base(self, recorded: str | None, built_here: bool) -> str:
        """The base this run's checkpoints fit: its own ``base_model/`` when the run built it
        (``base.tiny``), wherever the directory is now (the recorded path names the directory it
        trained in, perhaps relative to where it ran); otherwise the path its checkpoint records."""
        return str(self.base_model.absolute()) if built_here else str(recorded or "")

    def kernel_record(self, rank: int) -> Path:
        return self.path / "kernels" / f"rank-{rank}.json"

    @property
    def store_tier(self) -> Path:
        return self.path / "store_tier"

    def tracking_buffer(self, kind: str = "train") -> Path:
        return self.path / ("tracking-buffer.jsonl" if kind == "train" else f"tracking-buffer-{kind}.jsonl")

    @property
    def mlflow_db(self) -> Path:
        return self.path / "mlflow.db"

    @property
    def mlartifacts(self) -> Path:
        return self.path / "mlartifacts"

    @property
    def result(self) -> Path:
        return self.path / "result.json"

    @property
    def launch(self) -> Path:
        return self.path / "launch"

    @property
    def replaced(self) -> Path:
        return self.path / "replaced"

    def moved_aside(self, run_id: str | None = None) -> list["RunDir"]:
        """The runs ``train.overwrite`` moved aside into this directory (``replaced/<run id>-<time>/``,
        oldest first), or only run ``run_id``'s."""
        if not self.replaced.is_dir():
            return []
        prefix = "" if run_id is None else f"{run_id}-"
        return [RunDir(p) for p in sorted(self.replaced.iterdir()) if p.is_dir() and p.name.startswith(prefix)]

    @property
    def rank0_token(self) -> Path:
        return self.path / ".rank0-token"

    @property
    def derived(self) -> tuple[Path, ...]:
        """Rebuilt by the next run from the data and a checkpoint (``forget`` removes them)."""
        return (self.data_cache, self.store_tier)

"""Where a run's MLflow store is and how a client of it is opened (``tracking.Tracker`` sends through it).

The embedded default is a SQLite file in the run directory. The openers of a SQLite store take
turns on a lock file beside it, so a new file's tables are made once however many runs open it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flora_train.run_dir import RunDir


def default_uri(run_dir: Path) -> str:
    return f"sqlite:///{RunDir(run_dir).mlflow_db.resolve()}"


def unreachable_errors() -> tuple[type[BaseException], ...]:
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    return (MlflowException, RequestException, OSError)


def mlflow_client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)  # a server: nothing is asked of it here (it may hang)
    with _one_opener_at_a_time(Path(uri.removeprefix("sqlite:///"))):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # a new file gets its tables by now
    return client


@contextmanager
def _one_opener_at_a_time(db: Path) -> Iterator[None]:
    """The first client of a new SQLite store makes its tables and runs its migrations. Runs opening a
    new shared file at once (tracking.uri=sqlite:///shared.db, jobs of one sweep) raced there: every
    one but the first failed ('table experiments already exists', 'duplicate column name'). An
    exclusive flock on a file beside it makes them take turns."""
    try:
        fd = os.open(db.with_name(db.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:  # no such folder, or read-only: MLflow's own error says so
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the flock

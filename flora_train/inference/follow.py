"""`serve --follow`: the server watches its run and serves each new intact checkpoint.

A thread looks for the run's newest intact checkpoint every ``interval_s``. A new one (full or
delta) is indexed in the background (its user lists; rows are read by slices when asked for) into
a fresh adapter cache, which the engine swaps in between two steps: requests that start later get
it, requests already running finish on the adapters they started with. A corrupt newest checkpoint
is passed over with a warning (the run directory's reader does that) and the old one keeps serving;
one whose adapters no longer fit the served base is refused with a warning the same way.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from flora_train.cpu_threads import release_thread_team
from flora_train.inference.engine import Engine
from flora_train.inference.adapter_cache import AdapterCache
from flora_train.inference.rows import CheckpointRows, run_of
from flora_train.inference.trained import InferenceError, TrainedAdapters
from flora_train.run_dir.checkpoints import read_state

log = logging.getLogger("flora_train")


class Follower:
    def __init__(self, trained: TrainedAdapters, engine: Engine, interval_s: float) -> None:
        if trained.source.checkpoint is None:
            raise InferenceError(f"{trained.source.label}: --follow watches a run directory; this is an export")
        self.trained, self.engine, self.interval_s = trained, engine, interval_s
        self.run_dir = trained.source.checkpoint.parent.parent
        self._lock = threading.Lock()
        self._served = str(trained.source.checkpoint)
        # The base the served adapters were trained on: a newer checkpoint of another run (train.overwrite)
        # is followed only where it was trained on it too.
        self._base = read_state(trained.source.checkpoint).get("base_fingerprint")
        self._served_run = run_of(trained.source.checkpoint)
        self._refused: set[tuple[str, str | None]] = set()  # intact, but not servable by this server
        self._unverified: dict[str, int] = {}  # newer than the newest intact: how many looks found it so
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="flora-follow", daemon=True)
        self._thread.start()

    @property
    def served(self) -> str:
        with self._lock:
            return self._served

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - watching must never stop serving
                log.warning("--follow: %s; still serving %s", exc, self.served)
            finally:  # a new cache's table made an OpenMP team here: it would slow the engine's (cpu_threads.py)
                release_thread_team()

    def check(self) -> bool:
        """Swaps in the newest intact checkpoint if it is new; True when it did."""
        from flora_train.run_dir.checkpoints import (checkpoint_chain, leased_latest_checkpoint, list_checkpoints,
                                                     read_shared_adapter, saved_layout)

        found = leased_latest_checkpoint(self.run_dir, warn_skipped=False)
        newest, lease = found if found is not None else (None, None)
        for path in reversed(list_checkpoints(self.run_dir)):
            if newest is not None and path.name <= newest.name:
                break
            # One being written does not verify yet either: named once, when a second look finds it
            # still broken, and looked at again every time (it may yet complete).
            self._unverified[str(path)] = looks = self._unverified.get(str(path), 0) + 1
            if looks == 2:
                log.warning("--follow: %s does not verify (corrupt or incomplete); still serving %s", path, self.served)
        # (Another run's checkpoint of the served one's name is new too: train.overwrite, trained again.)
        same = newest is not None and str(newest) == self.served and run_of(newest) == self._served_run
        if newest is None or same or (str(newest), run_of(newest)) in self._refused:
            if lease is not None:
                lease.close()  # the served one holds its own
            return False
        problems = self.trained.layout.compatible_with(saved_layout(newest))
        if read_state(newest).get("base_fingerprint") != self._base:
            problems.append("it was trained on another base than the served one (another run: train.overwrite; "
                            "restart the server to serve it)")
        shared = read_shared_adapter(newest)
        current = self.trained.slot.shared
        if (shared is None) != (current is None) or (shared is not None and not shared[0]["row"].equal(current.row.cpu())):
            problems.append("its shared adapter differs from the served one (restart the server to serve it)")
        if problems:
            lease.close()
            self._refused.add((str(newest), run_of(newest)))
            log.warning("--follow: not serving %s: %s; still serving %s", newest, "; ".join(problems), self.served)
            return False
        old = self.engine.adapters
        rows = CheckpointRows(checkpoint_chain(Path(newest)), lease)  # the old rows' lease goes with them
        self.engine.swap_adapters(AdapterCache(rows, self.trained.layout, self.trained.source.init_seed,
                                               old.table.shape[0], old.table.device, old.version + 1))
        with self._lock:
            self._served, self._served_run = str(newest), rows.run_id
        log.warning("--follow: now serving %s (adapters version %d)", newest, old.version + 1)
        return True


__all__ = ["Follower"]

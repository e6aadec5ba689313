"""A thread's OpenMP team ends when the thread asks, and the thread computes the same after: what a
server does on each thread but the engine's (``flora_train/cpu_threads.py``)."""

import threading
from pathlib import Path

import torch

from flora_train.cpu_threads import release_thread_team


def _threads_python_did_not_start() -> int:
    tids = {int(p.name) for p in Path("/proc/self/task").iterdir()}
    return len(tids - {t.native_id for t in threading.enumerate()})


def test_a_threads_team_ends_when_it_asks_and_comes_back_when_it_computes():
    counts: dict[str, int] = {}
    results: list[torch.Tensor] = []
    x = torch.arange(1 << 20, dtype=torch.float32)  # above ATen's grain: x * 3 is a parallel operator

    def work() -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(2)  # the suite runs one thread a worker: no team would form
        try:
            counts["before"] = _threads_python_did_not_start()
            results.append(x * 3)
            counts["team"] = _threads_python_did_not_start()
            counts["released"] = release_thread_team()
            counts["after"] = _threads_python_did_not_start()
            results.append(x * 3)
            counts["again"] = _threads_python_did_not_start()
        finally:
            torch.set_num_threads(threads)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert counts["released"] is True  # libgomp, as PyTorch's Linux wheels ship it
    # A team of two is this thread and one worker; released, the worker is gone, and it comes back.
    assert counts["team"] == counts["before"] + 1, counts
    assert counts["after"] == counts["before"], counts
    assert counts["again"] == counts["before"] + 1, counts
    assert torch.equal(results[0], results[1])
    assert release_thread_team()  # a thread with no team: nothing to end, no error

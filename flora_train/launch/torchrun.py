"""torchrun as every launched job starts it, with its end reported in one line.

``python -m torch.distributed.run`` ends a failed job with its own traceback (``ChildFailedError``
raised through ``@record``), and a signalled agent with ``SignalException``'s. The ranks have
already printed the cause (``flora-train: error: ...`` names the key, file or user), so this
runs the same torchrun (its own argument parser and ``run``) and, when it fails, says which rank
failed with which exit code, and exits with that code: 2 for bad input, 143 for a preempted run,
instead of torchrun's 1 for everything. Every restart round gets a fresh rendezvous store.
"""

from __future__ import annotations

import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Each rendezvous round gets its own store (hosted by the round's rank 0) instead of the agent's
    # store shared by every round: a restarted round then never reads the failed round's keys,
    # whichever node restarted and however many times (``dist.init_from_env``).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -9: killed by signal 9
        print(f"flora-train launch: the job failed: rank {rank} exited with code {code} (its output above says why); "
              f"{len(exc.failures)} process(es) failed", file=sys.stderr, flush=True)
        return code
    except SignalException as exc:
        print(f"flora-train launch: torchrun stopped by {signal.Signals(exc.sigval).name}", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())

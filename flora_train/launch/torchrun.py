"""torchrun as every launched job starts it, with its end reported in one line.

``python -m torch.distributed.run`` ends a failed job with its own traceback (``ChildFailedError``
raised through ``@record``), and a signalled agent with ``SignalException``'s. The ranks have
already printed the cause (``flora-train: error: ...`` names the key, file or user), so this
runs the same torchrun (its own argument parser and ``run``) and, when it fails, says which rank
failed with which exit code, and exits with that code: 2 for bad input, 143 for a preempted run,
instead of torchrun's 1 for everything. Every restart round gets a fresh rendezvous store.

A round in which a rank failed on bad input (exit code 2: the recipe, the data or the run
directory) or stopped on a non-finite loss (3: the resumed run repeats the same steps bit for bit)
is not restarted: it fails the same way every round, and each round would load the base again and
print the same error again. torchrun restarts any failure
``--max-restarts`` times; its agent (``LocalElasticAgent``) is made here with a
``_monitor_workers`` (the method torch's ``SimpleElasticAgent`` leaves to its agents) that ends the
restarts on that exit code. A crash, a lost peer (4) or a signal is restarted as before. A node
whose agent was about to restart when another node ended the job finds the rendezvous gone and
says so in one line (exit code 1), instead of torchrun's traceback.
"""

from __future__ import annotations

import os
import signal
import sys

import torch.distributed.launcher.api as launcher_api
from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousError
from torch.distributed.run import parse_args, run

from flora_train.errors import BAD_INPUT_EXIT_CODE, NONFINITE_EXIT_CODE

NOT_RESTARTED = (BAD_INPUT_EXIT_CODE, NONFINITE_EXIT_CODE)


class NoRetryOnBadInputAgent(LocalElasticAgent):
    """torchrun's agent, except that workers that failed on bad input or stopped on a non-finite
    loss are not started again."""

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        result = super()._monitor_workers(worker_group)
        if result.state == WorkerState.FAILED and any(f.exitcode in NOT_RESTARTED for f in result.failures.values()):
            self._remaining_restarts = 0
        return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Each rendezvous round gets its own store (hosted by the round's rank 0) instead of the agent's
    # store shared by every round: a restarted round then never reads the failed round's keys,
    # whichever node restarted and however many times (``dist.init_from_env``).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # torchrun's launch_agent makes its agent from this module name; no argument selects another.
    launcher_api.LocalElasticAgent = NoRetryOnBadInputAgent
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -9: killed by signal 9
        print(f"flora-train launch: the job failed: rank {rank} exited with code {code} (its output above says why); "
              f"{len(exc.failures)} process(es) failed", file=sys.stderr, flush=True)
        return code
    except RendezvousError as exc:
        # Another node's agent ended the job (its ranks failed on bad input, or it ran out of
        # restarts) while this one waited to start its workers again: the rendezvous is closed, or
        # its store went with the agent that hosted it.
        print(f"flora-train launch: the job ended on another node, whose output says why ({type(exc).__name__})",
              file=sys.stderr, flush=True)
        return 1
    except SignalException as exc:
        print(f"flora-train launch: torchrun stopped by {signal.Signals(exc.sigval).name}", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`flora-train` with one injected fault, for the crash-safety tests (a subprocess, so SIGKILL and
a failing disk hit a real process):

    FLORA_TEST_FAULT=kill_in_save:N   SIGKILL this process inside the N-th checkpoint save, after
                                      the shards are written and before the manifest and rename
    FLORA_TEST_FAULT=enospc_on_save:N the N-th checkpoint save fails with ENOSPC (disk full)
"""

import errno
import os
import signal
import sys

from flora_train.cli import main
from flora_train.store.sharded import ShardedAdapterStore
from flora_train.run_dir import saving as checkpoint

kind, _, nth = os.environ["FLORA_TEST_FAULT"].partition(":")
calls = {"n": 0}

if kind == "kill_in_save":
    finish = checkpoint._finish

    def _finish(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
        return finish(*args, **kwargs)

    checkpoint._finish = _finish
elif kind == "enospc_on_save":
    save_shard = ShardedAdapterStore.save_shard

    def _save_shard(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(nth):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]))
        return save_shard(self, *args, **kwargs)

    ShardedAdapterStore.save_shard = _save_shard
else:
    raise SystemExit(f"unknown FLORA_TEST_FAULT {kind!r}")

sys.exit(main(sys.argv[1:]))

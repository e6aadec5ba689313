"""The GPU-collective check: a CPU run fails where a GPU job's NCCL would refuse a tensor.

Runs in a subprocess (a one-rank gloo group, so this process's torch.distributed stays clean)."""

import subprocess
import sys
import textwrap

import pytest

from flora_train.collective_check import served_devices

SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from flora_train import dist as fdist
    from flora_train.collective_check import CollectiveDeviceError, install
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    install(sys.argv[1])
    def attempt(fn):
        try:
            fn()
            return "ok"
        except CollectiveDeviceError as exc:
            return "refused: " + str(exc)
    print(attempt(lambda: fdist.all_reduce(torch.zeros(3))))
    print(attempt(lambda: dist.all_to_all_single(torch.empty(1, dtype=torch.int64), torch.ones(1, dtype=torch.int64),
                                                 group=dist.new_group(backend="nccl" if sys.argv[2] == "nccl" else None))))
    print(attempt(lambda: fdist.all_gather_objects({"a": 1})))
    dist.destroy_process_group()  # left to interpreter teardown, gloo may abort the process
""")


def _run(gpu_backend: str, subgroup: str = "default") -> list[str]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, gpu_backend, subgroup], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


def test_served_devices():
    assert served_devices("cpu:gloo,cuda:nccl") == {"cpu", "cuda"}
    assert served_devices("nccl") == {"cuda"} and served_devices("gloo") == {"cpu"}


def test_nccl_alone_refuses_host_tensors():
    """What the trainer did before: a plain ``nccl`` group on GPUs. Its per-step loss all-reduce of a
    CPU tensor is refused (as NCCL refuses it), naming the call site."""
    reduce, exchange, objects = _run("nccl")
    assert reduce.startswith("refused: all_reduce at") and "dist.py" in reduce and "'nccl'" in reduce
    assert exchange.startswith("refused: all_to_all_single")


def test_the_group_flora_train_makes_on_gpus_serves_both():
    from flora_train.dist import backend_for

    assert _run(backend_for("cuda")) == ["ok", "ok", "ok"]
    # ... but a subgroup made with NCCL alone is still caught.
    assert _run(backend_for("cuda"), "nccl")[1].startswith("refused: all_to_all_single")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_backend_for(device):
    from flora_train.dist import backend_for

    assert served_devices(backend_for(device)) >= {"cpu"}
    if device == "cuda":
        assert "cuda" in served_devices(backend_for(device))

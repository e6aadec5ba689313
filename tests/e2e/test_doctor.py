"""`flora-train doctor` is the GPU self-check; on CPU (no GPU here) it must run every check to the
end, so the script is known to work before it meets a GPU."""

import json
import subprocess
import sys

import pytest

from tests.e2e.helpers import REPO

pytestmark = pytest.mark.slow


def test_doctor_runs_every_check_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flora_train.cli", "doctor", "--device", "cpu", "--small", "--no-bench",
                           "--jobs", "2", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert report["failed"] == [] and set(report["checks"]) == {
        "collectives", "float16 refused", "flora r1, bf16", "flora r4, bf16", "lora r8, bf16", "ia3, bf16",
        "zero-3 + offload, 1 rank", "lora r8, device tier"}
    assert "collectives ok on gloo" in report["checks"]["collectives"]["detail"]
    assert "base.dtype" in report["checks"]["float16 refused"]["detail"]
    for name, check in report["checks"].items():
        if name not in ("collectives", "float16 refused"):
            assert check["steps"] > 0 and check["eval_loss"] == check["eval_loss"], name
            # The host tier moves a step's rows up and their gradients down, the same bytes; the device tier none.
            moved = (check["bytes_h2d_per_step"], check["bytes_d2h_per_step"])
            assert moved == (0, 0) if "device tier" in name else moved[0] == moved[1] > 0, (name, moved)
    hooks = report["checks"]["zero-3 + offload, 1 rank"]["zero_hooks"]
    assert hooks["trace_complete"] and hooks["forward_starts"] >= report["checks"]["zero-3 + offload, 1 rank"]["steps"]


def test_doctor_refuses_a_jobs_count_below_one():
    proc = subprocess.run([sys.executable, "-m", "flora_train.cli", "doctor", "--jobs", "0"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "argument --jobs: must be a whole number >= 1, got '0'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv,message", [
    (["bench", "lengths", "--device", "gpu"], "argument --device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    (["doctor", "--device", "cuda:99"], "argument --device: cuda:99: this machine has"),
])
def test_a_device_flag_naming_no_device_here_is_one_usage_line(argv, message):
    """Before, the name reached torch.device (or a CUDA call) inside the command: a traceback."""
    proc = subprocess.run([sys.executable, "-m", "flora_train.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr

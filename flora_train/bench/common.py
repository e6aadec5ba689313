"""What every benchmark suite shares: the machine line, the device and dtype, JSON and plots."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """PEFT, the baseline some benches run, without its FutureWarning on transformers 5
    (``is_gradient_checkpointing``, which PEFT reads as it wraps a model): PEFT's to fix, not the
    bench's reader."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory in MiB from /proc (Linux): ``VmRSS`` now, or ``VmHWM``, its peak
    since the process began or since ``reset_peak_rss``. Benches read the peak here, not from
    getrusage's ``ru_maxrss``: a process started by fork and exec keeps its parent's high-water mark
    there, so a bench process started by a large one (``doctor``, ``bench all``) measured nothing."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Sets ``VmHWM`` to the resident memory now (Linux 4.0+; elsewhere nothing)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def bench_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def bench_dtype(device: torch.device) -> torch.dtype:
    """What `train.precision: auto` computes in: bf16 where the GPU does it natively, else float32."""
    from flora_train.train.session import autocast_dtype_for

    return autocast_dtype_for("auto", device) or torch.float32


def bench_precision(device: torch.device) -> str:
    """The `train.precision` a benchmark's runs take: bf16 on a GPU (what the figures there are for;
    packing's flash-attention varlen kernel has no float32), float32 on a CPU (bf16 is emulated)."""
    return "bf16" if device.type == "cuda" else "fp32"


def machine(device: torch.device | None = None) -> str:
    cpu = platform.processor() or platform.machine()
    text = f"{cpu}, {os.cpu_count()} cpus, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if device is not None and device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def write_json(out: Path, name: str, result: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def new_figure(panels: int) -> tuple[Any, list[Any]]:
    """A row of ``panels`` matplotlib axes on a non-interactive backend (works without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig: Any, out: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    path = out / f"bench_{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

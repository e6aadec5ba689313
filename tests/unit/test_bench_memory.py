"""Peak memory as the benches measure it, in a bench process started by a large one."""

import torch

from flora_train.bench.loss import bench_loss


def test_bench_loss_measures_its_peak_when_started_by_a_large_process(tmp_path):
    """Each variant's process read its peak from getrusage's ru_maxrss, which a child started by fork
    and exec inherits from its parent: started by `doctor` (gigabytes by then), both variants measured
    0 MiB and the table said "0.00x less"."""
    held = torch.ones(2**28)  # this process holds 1 GiB (touched), more than either variant's process ever does
    result = bench_loss("cpu", tmp_path, dict(vocab_size=4096, tokens=128, num_layers=1))
    peaks = result["peak_mib"]
    full = 4 * 128 * 8 * 4096 / 2**20  # one float32 copy of these logits: 16 MiB
    assert peaks["full_logits"] > full and peaks["target_chunked"] > 0, peaks
    assert peaks["full_logits"] > peaks["target_chunked"] and held.sum() == 2**28

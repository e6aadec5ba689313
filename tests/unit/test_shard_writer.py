"""The chunked shard writer writes what safetensors' own save_file writes: the same header (the
library orders metadata keys arbitrarily: compared as JSON) and the same data bytes."""

import json

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from flora_train.store.shard_writer import save_rows


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 40), width=st.integers(1, 7), chunk=st.integers(1, 9))
def test_chunked_writes_equal_save_file_bytes(tmp_path_factory, rows, width, chunk):
    tmp = tmp_path_factory.mktemp("w")
    g = torch.Generator().manual_seed(rows * 100 + width)
    base = torch.randn(rows, 3 * width, generator=g)
    tensors = {
        "rows": base[:, :width],  # a strided view: what a disk tier's column may be
        "optim.exp_avg_sq": torch.randn(rows, width, generator=g).to(torch.bfloat16),
        "optim.step": torch.arange(rows, dtype=torch.int64),
    }
    meta = {"users": str(rows), "layout": "{\"x\": 1}"}
    save_rows(tensors, tmp / "ours.safetensors", meta, chunk_rows=chunk)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "theirs.safetensors"), metadata=meta)
    ours, theirs = (_parts((tmp / name).read_bytes()) for name in ("ours.safetensors", "theirs.safetensors"))
    assert ours == theirs
    loaded = load_file(str(tmp / "ours.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def _parts(raw: bytes) -> tuple[int, dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8 : 8 + n]), raw[8 + n :]


"""Writing a store shard as a safetensors file a slice of rows at a time.

``safetensors.torch.save_file`` turns every tensor into one ``bytes`` object before writing: for a
full checkpoint of 10^6 users that is the whole table again in private memory (5 GB for FLoRA r1
on q/v with AdamW). This writes the same file (header, then each tensor's bytes, in the library's
order: widest dtype first, then by name) with at most ``chunk_rows`` rows of one tensor copied at a
time; the safetensors library reads it as any other file (a test checks header and data against
``save_file``'s).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def save_rows(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None,
              chunk_rows: int = 65_536) -> None:
    """Writes ``tensors`` (each indexed by row along dim 0) to ``path`` in the safetensors format."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in order:
        t = tensors[key]
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for key in order:
            t = tensors[key].detach()
            if t.dim() == 0:
                t = t.reshape(1)
            for a in range(0, t.shape[0], chunk_rows):
                f.write(t[a : a + chunk_rows].cpu().contiguous().view(torch.uint8).numpy())  # its buffer, not a bytes copy

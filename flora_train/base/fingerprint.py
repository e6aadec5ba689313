"""A cheap identity for a base model, so a checkpoint is never resumed onto a different base.

Adapter shapes alone cannot tell two fine-tunes of one architecture apart. The fingerprint hashes
the config and, for each weight file, its size and its first and last MiB (the start of the tensor
data differs between any two trainings): a few MiB read whatever the model's size.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
SAMPLE = 1 << 20


def _sample_hash(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(SAMPLE))
        if size > 2 * SAMPLE:
            f.seek(size - SAMPLE)
            h.update(f.read(SAMPLE))
    return h.hexdigest()


def base_fingerprint(name_or_path: str, gguf_file: str | None = None) -> str:
    """Hex digest over the config and weight samples of a local model; for a hub id, over the id."""
    root = Path(name_or_path)
    h = hashlib.sha256()
    if not root.is_dir():
        h.update(f"hub:{name_or_path}:{gguf_file or ''}".encode())
        return h.hexdigest()
    files = sorted(p for p in root.iterdir() if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)
    if gguf_file:
        files = [root / gguf_file]
    for path in files:
        h.update(path.name.encode())
        h.update(_sample_hash(path).encode())
    return h.hexdigest()


def base_changed(recorded: str | None, name_or_path: str, gguf_file: str | None = None) -> bool:
    """Whether the local base at ``name_or_path`` is no longer the one whose fingerprint a
    checkpoint or export recorded (False when nothing was recorded, or for a hub id)."""
    if recorded is None or not Path(name_or_path).is_dir():
        return False
    return recorded != base_fingerprint(name_or_path, gguf_file)


def recorded_id_only(recorded: str | None, trained_on: str | None, gguf_file: str | None = None) -> bool:
    """Whether ``recorded`` is the fingerprint of the hub id ``trained_on`` (a run trained on a hub
    id records the id, not its files): then a local folder of that model cannot be checked against
    it, only taken as it."""
    return (recorded is not None and trained_on is not None and not Path(trained_on).is_dir()
            and recorded == base_fingerprint(trained_on, gguf_file))

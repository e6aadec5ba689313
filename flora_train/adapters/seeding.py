"""Per-user random numbers that depend on the user alone (never on who else is in the table)."""

from __future__ import annotations

import hashlib

import torch


def user_seed(base_seed: int, user_id: str) -> int:
    """A 63-bit seed that depends only on the run's init seed and the user id."""
    digest = hashlib.blake2b(f"{base_seed}\x00{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _to_signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def counter_uniform(seeds: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    """Uniform [0, 1) numbers ``[users, count]`` from SplitMix64 over ``(seed, offset + i)``: one
    stream per user.

    Vectorised over all users at once (a million rows initialise in seconds) and identical on
    every platform, unlike per-user ``torch.Generator`` objects.
    """
    golden = _to_signed(0x9E3779B97F4A7C15)
    counters = torch.arange(offset, offset + count, dtype=torch.int64)
    z = seeds.to(torch.int64).unsqueeze(1) + (counters + 1).unsqueeze(0) * golden
    z = (z ^ _shr(z, 30)) * _to_signed(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _to_signed(0x94D049BB133111EB)
    z = z ^ _shr(z, 31)
    return _shr(z, 11).to(torch.float64).mul_(2.0**-53).to(torch.float32)

"""Where each adapted module's tensors live inside one flat per-user row.

A row is a float vector of ``row_size`` numbers holding every adapted module's tensors back to
back. The layout turns a ``[users, row_size]`` tensor into per-module views without copying, and
makes a user's initial row from a seed derived from that user alone, so that a user starts from
the same adapter whatever other users share its table or in which order they arrived.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from flora_train.adapters.functional import kernel_error

METHODS = ("flora", "lora", "ia3")


@dataclass(frozen=True)
class AdapterSpec:
    """The adapter method and its hyper-parameters (shared by every user)."""

    method: str = "flora"
    rank: int = 1
    alpha: float = 16.0
    kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"adapter.method must be one of {METHODS}, got {self.method!r}")
        if self.rank < 1:
            raise ValueError(f"adapter.rank must be >= 1, got {self.rank}")
        error = kernel_error(self.method, self.kernel)
        if error:
            raise ValueError(f"adapter.kernel: {error}")

    @property
    def scaling(self) -> float:
        """LoRA's ``alpha / r`` (unused by FLoRA and IA3)."""
        return self.alpha / self.rank

    def param_shapes(self, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        """Per-user tensor shapes of one adapted ``Linear(in, out)``."""
        r = self.rank
        if self.method == "flora":
            return {"a": (r, out_features), "b": (r, in_features)}
        if self.method == "ia3":
            return {"a": (1, out_features)}
        return {"lora_a": (r, in_features), "lora_b": (out_features, r)}


@dataclass(frozen=True)
class ParamSlice:
    module: str
    name: str
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class AdapterLayout:
    """The flat row layout for a spec and an ordered list of ``(module name, in, out)``."""

    spec: AdapterSpec
    modules: list[tuple[str, int, int]]
    slices: dict[str, dict[str, ParamSlice]] = field(init=False)
    row_size: int = field(init=False)

    def __post_init__(self) -> None:
        offset = 0
        self.slices = {}
        for name, fan_in, fan_out in self.modules:
            per_module = {}
            for pname, shape in self.spec.param_shapes(fan_in, fan_out).items():
                s = ParamSlice(name, pname, offset, shape)
                per_module[pname] = s
                offset += s.numel
            self.slices[name] = per_module
        self.row_size = offset

    def views(self, rows: torch.Tensor, module: str) -> dict[str, torch.Tensor]:
        """Per-user views ``[users, *shape]`` of one module's tensors inside ``rows [users, row_size]``."""
        users = rows.shape[0]
        return {
            s.name: rows.narrow(1, s.offset, s.numel).view(users, *s.shape)
            for s in self.slices[module].values()
        }

    def split(self, rows: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Every module's per-user views of ``rows [users, row_size]``, from one ``split``.

        One autograd node for all of them: its backward writes the whole row gradient once. Taking
        each view by ``narrow`` instead costs a zero-filled ``[users, row_size]`` gradient per
        tensor in the backward, which for LoRA on every linear layer is most of a step.
        """
        users = rows.shape[0]
        order = [s for module_slices in self.slices.values() for s in module_slices.values()]
        pieces = rows.split([s.numel for s in order], dim=1)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for s, piece in zip(order, pieces):
            out.setdefault(s.module, {})[s.name] = piece.view(users, *s.shape)
        return out

    def init_rows(self, seeds: torch.Tensor) -> torch.Tensor:
        """Initial rows for users with the given int64 seeds: identity FLoRA/IA3, PEFT-style LoRA."""
        n = seeds.shape[0]
        rows = torch.empty(n, self.row_size, dtype=torch.float32)
        for module_slices in self.slices.values():
            for s in module_slices.values():
                block = rows.narrow(1, s.offset, s.numel)
                if s.name == "lora_a":
                    # kaiming_uniform_(a=sqrt(5)) as PEFT does: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
                    bound = 1.0 / math.sqrt(s.shape[1])
                    u = counter_uniform(seeds, s.offset, s.numel)
                    block.copy_((u * 2.0 - 1.0) * bound)
                elif s.name == "lora_b":
                    block.zero_()
                else:
                    block.fill_(1.0)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.spec.method,
            "rank": self.spec.rank,
            "alpha": self.spec.alpha,
            "modules": [list(m) for m in self.modules],
            "row_size": self.row_size,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], kernel: str = "auto") -> "AdapterLayout":
        spec = AdapterSpec(method=d["method"], rank=int(d["rank"]), alpha=float(d["alpha"]), kernel=kernel)
        return cls(spec, [(str(m[0]), int(m[1]), int(m[2])) for m in d["modules"]])

    def compatible_with(self, other: "AdapterLayout") -> list[str]:
        """Human-readable differences that make rows of ``other`` unusable with this layout."""
        problems = []
        for key in ("method", "rank", "row_size"):
            mine, theirs = self.to_dict()[key], other.to_dict()[key]
            if mine != theirs:
                problems.append(f"{key}: {theirs} != {mine}")
        if self.modules != other.modules:
            problems.append("adapted modules or their shapes differ")
        return problems


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
    """Uniform [0, 1) numbers from SplitMix64 over ``(seed, offset + i)``: one stream per user.

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

"""Where each adapted module's tensors live inside one flat per-user row.

A row is a float vector of ``row_size`` numbers holding every adapted module's tensors back to
back. The layout turns a ``[users, row_size]`` tensor into per-module views without copying, and
makes a user's initial row from a seed derived from that user alone, so that a user starts from
the same adapter whatever other users share its table or in which order they arrived.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from flora_train.adapters.functional import kernel_error
from flora_train.adapters.methods import METHODS, AdapterMethod, get_method

@dataclass(frozen=True)
class AdapterSpec:
    """The adapter method and its hyper-parameters (shared by every user).

    ``feedforward_modules``: module-name suffixes of feed-forward output layers (IA3 scales their
    input, not their output); None until ``inject_adapters`` resolves it from the architecture.
    """

    method: str = "flora"
    rank: int = 1
    alpha: float = 16.0
    kernel: str = "auto"
    feedforward_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"adapter.method must be one of {tuple(METHODS)}, got {self.method!r}")
        if self.rank < 1:
            raise ValueError(f"adapter.rank must be >= 1, got {self.rank}")
        error = kernel_error(self.method, self.kernel)
        if error:
            raise ValueError(f"adapter.kernel: {error}")

    @property
    def impl(self) -> AdapterMethod:
        return get_method(self.method)

    @property
    def scaling(self) -> float:
        """LoRA's ``alpha / r`` (unused by FLoRA and IA3)."""
        return self.alpha / self.rank

    def is_feedforward(self, module: str) -> bool:
        return any(module == f or module.endswith("." + f) for f in self.feedforward_modules or ())

    def param_shapes(self, in_features: int, out_features: int, module: str = "") -> dict[str, tuple[int, ...]]:
        """Per-user tensor shapes of one adapted ``Linear(in, out)`` named ``module``."""
        return self.impl.param_shapes(in_features, out_features, self.rank, self.is_feedforward(module))


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
    # Modules keeping their weight as [in, out] (GPT-2's Conv1D): PEFT's fan_in_fan_out. (Older
    # checkpoints did not record them: none.)
    transposed: tuple[str, ...] = ()
    slices: dict[str, dict[str, ParamSlice]] = field(init=False)
    row_size: int = field(init=False)

    def __post_init__(self) -> None:
        offset = 0
        self.slices = {}
        for name, fan_in, fan_out in self.modules:
            per_module = {}
            for pname, shape in self.spec.param_shapes(fan_in, fan_out, name).items():
                s = ParamSlice(name, pname, offset, shape)
                per_module[pname] = s
                offset += s.numel
            self.slices[name] = per_module
        self.row_size = offset

    def module_starts(self) -> tuple[int, ...]:
        """Where each adapted module's numbers start in a row (row-wise optimizers group by them)."""
        return tuple(min(sl.offset for sl in per.values()) for per in self.slices.values())

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
        """Initial rows for users with the given int64 seeds (each method's own init; the identity)."""
        n = seeds.shape[0]
        rows = torch.empty(n, self.row_size, dtype=torch.float32)
        for module_slices in self.slices.values():
            for s in module_slices.values():
                rows.narrow(1, s.offset, s.numel).copy_(self.spec.impl.init_param(s.name, s.shape, seeds, s.offset))
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.spec.method,
            "rank": self.spec.rank,
            "alpha": self.spec.alpha,
            "feedforward_modules": list(self.spec.feedforward_modules or ()),
            "modules": [list(m) for m in self.modules],
            "row_size": self.row_size,
            "transposed": list(self.transposed),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], kernel: str = "auto") -> "AdapterLayout":
        spec = AdapterSpec(method=d["method"], rank=int(d["rank"]), alpha=float(d["alpha"]), kernel=kernel,
                           feedforward_modules=tuple(d.get("feedforward_modules", ())))
        return cls(spec, [(str(m[0]), int(m[1]), int(m[2])) for m in d["modules"]], tuple(d.get("transposed", ())))

    def compatible_with(self, other: "AdapterLayout") -> list[str]:
        """Human-readable differences that make rows of ``other`` unusable with this layout."""
        problems = []
        for key in ("method", "rank", "row_size", "feedforward_modules"):
            mine, theirs = self.to_dict()[key], other.to_dict()[key]
            if mine != theirs:
                problems.append(f"{key}: {theirs} != {mine}")
        if self.spec.impl.uses_alpha and self.spec.alpha != other.spec.alpha:
            problems.append(f"alpha: {other.spec.alpha} != {self.spec.alpha}")
        if self.modules != other.modules:
            problems.append("adapted modules or their shapes differ")
        return problems

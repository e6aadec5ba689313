"""``AdaptedLinear``: a frozen linear layer that applies each example's own adapter.

The layer holds no adapter parameters. It reads them, for the duration of a step, from an
``AdapterSlot`` shared by every adapted layer of a model: the step's rows ``[users, row_size]``
(one leaf tensor, so all gradients land in one place) and the index, which maps each example
(``[batch]``) or each token (``[batch, seq]``: packed rows, where examples of different users share
a row) to its user's row. Per-token routing runs every method's kernels with each token as an
example of one token: FLoRA and IA3 scale each token by its user's vectors, LoRA gathers each
token's A and B or runs one GEMM pair per user over its tokens (the segment kernel, Punica's SGMV
shape), whichever the tuner measures faster. Training on packed rows and serving a continuous
batch both route through it. That slot is
the single narrow handle between the model and whoever owns the rows; nothing is threaded through
Hugging Face forward signatures.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from flora_train.adapters import functional as Fa
from flora_train.adapters.layout import AdapterLayout
from flora_train.adapters.shared import SharedAdapter
from flora_train.adapters.tuning import KernelTuner


class AdapterSlot:
    """The step's adapter rows, visible to every ``AdaptedLinear`` of one model while active.

    It also carries the kernel tuner the layers consult under ``adapter.kernel: auto``, and the
    shared adapter (``shared.py``) that every example goes through under its user's row, if any.
    """

    def __init__(self, layout: AdapterLayout, tuner: KernelTuner | None = None) -> None:
        self.layout = layout
        self.tuner = tuner if tuner is not None else KernelTuner()
        self._rows: torch.Tensor | None = None
        self._index: torch.Tensor | None = None
        self._distinct: int | None = None
        self._views: dict[str, dict[str, torch.Tensor]] | None = None
        self._block: int | None = None
        self._base_only = False
        self.shared: SharedAdapter | None = None
        self._shared_views: dict[str, dict[str, torch.Tensor]] | None = None

    @property
    def active(self) -> bool:
        return self._rows is not None

    @property
    def runs_base(self) -> bool:
        return self._base_only

    @contextmanager
    def base_only(self) -> Iterator[None]:
        """Runs the model as the plain base (no adapter) inside the block. Outside this block and
        outside ``activate`` an adapted layer refuses to run: a forward that forgot its rows would
        otherwise silently compute the base and train or score nothing."""
        if self.active:
            raise RuntimeError("adapter slot is active; base_only must not nest inside activate")
        previous, self._base_only = self._base_only, True
        try:
            yield
        finally:
            self._base_only = previous

    @contextmanager
    def activate(self, rows: torch.Tensor, index: torch.Tensor) -> Iterator[None]:
        """Makes ``rows [users, row_size]`` the adapters of examples ``index [batch] -> users``, or
        of tokens ``index [batch, seq] -> users``.

        Run backward inside the block when the base uses activation checkpointing: recomputed
        forwards read the slot again.
        """
        if rows.dim() != 2 or rows.shape[1] != self.layout.row_size:
            raise ValueError(f"rows must be [users, {self.layout.row_size}], got {tuple(rows.shape)}")
        if index.dim() not in (1, 2) or (index.numel() and int(index.max()) >= rows.shape[0]):
            raise ValueError("index must be [batch] or [batch, seq] row positions within rows")
        if self.active:
            raise RuntimeError("adapter slot is already active; steps must not nest")
        self._rows, self._index = rows, index.to(rows.device)
        self._views = self.layout.split(rows)
        self._block = _uniform_block(self._index, rows.shape[0]) if index.dim() == 1 else None
        self._shared_views = self.shared.split() if self.shared is not None else None
        try:
            yield
        finally:
            self._rows, self._index, self._distinct, self._views, self._block = None, None, None, None, None
            self._shared_views = None

    @contextmanager
    def without_shared(self) -> Iterator[None]:
        """Runs the personal rows on the plain base inside the block (the base model's own score)."""
        if self.active:
            raise RuntimeError("adapter slot is active; without_shared must not nest inside activate")
        shared, self.shared = self.shared, None
        try:
            yield
        finally:
            self.shared = shared

    def distinct_users(self) -> int:
        """Distinct users in the active micro-batch (counted once per activation: one device sync)."""
        if self._distinct is None:
            assert self._index is not None
            self._distinct = int(torch.unique(self._index).numel())
        return self._distinct

    def current(self, module: str) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        """The active micro-batch's per-user tensors of ``module`` and the index; None when the slot is
        not active or ``module`` is adapted by the shared adapter only."""
        if self._views is None or module not in self._views:
            return None
        assert self._index is not None
        return self._views[module], self._index

    def shared_weight(self, module: str, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's weight and bias with the shared adapter folded in (unchanged without one)."""
        if self._shared_views is None or module not in self._shared_views:
            return weight, bias
        assert self.shared is not None
        return self.shared.fold(self._shared_views[module], weight, bias)

    @property
    def index(self) -> torch.Tensor:
        """The active micro-batch's index: each example's (``[batch]``) or token's (``[batch, seq]``) row."""
        assert self._index is not None, "the adapter slot is not active"
        return self._index

    @property
    def rows_count(self) -> int:
        """Rows of the active step (the users the index points into)."""
        assert self._rows is not None, "the adapter slot is not active"
        return int(self._rows.shape[0])

    @property
    def block(self) -> int | None:
        """k when examples come as k-example blocks of users 0, 1, 2, ... in row order, else None."""
        return self._block


def _uniform_block(index: torch.Tensor, users: int) -> int | None:
    """``k`` when ``index == [0]*k + [1]*k + ... + [users-1]*k`` (how the planner packs a step whose
    users each bring k examples), else None. Then the batch reshapes to ``[users, k * tokens, in]``
    and every kernel runs on the rows as they are: no per-example gather forward, no scatter-add
    backward (for LoRA on every layer that gather is most of the adapter's cost)."""
    n = index.numel()
    if users == 0 or n % users:
        return None
    k = n // users
    expected = torch.arange(users, device=index.device, dtype=index.dtype).repeat_interleave(k)
    return k if torch.equal(index, expected) else None


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D``: a linear layer storing its weight as ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        shape = getattr(module.weight, "ds_shape", module.weight.shape)  # a ZeRO-3 partition's own shape is [0]
        return shape[0], shape[1]
    raise TypeError(f"{type(module).__name__} is not a linear layer")


class AdaptedLinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` (or GPT-2 ``Conv1D``); it runs as the base layer only inside
    ``slot.base_only()``, and with each example's adapter inside ``slot.activate``."""

    def __init__(self, base: nn.Module, name: str, slot: AdapterSlot) -> None:
        super().__init__()
        self.base_layer = base
        self.adapter_name = name
        self.in_features, self.out_features = linear_shape(base)
        self._transposed = is_conv1d(base)
        # A plain attribute, not a submodule: the slot is shared by every layer and holds no parameters.
        object.__setattr__(self, "slot", slot)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as ``[out, in]`` (a view for ``Conv1D``)."""
        w = self.base_layer.weight
        return w.t() if self._transposed else w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.slot.active:
            if not self.slot.runs_base:
                raise RuntimeError(
                    f"{self.adapter_name}: forward outside AdapterSlot.activate(rows, index); every example needs its "
                    "user's rows (use `with slot.base_only():` to run the plain base on purpose)"
                )
            return self.base_layer(x)
        weight, bias = self.slot.shared_weight(self.adapter_name, self.weight, self.bias)
        current = self.slot.current(self.adapter_name)
        if current is None:  # a layer only the shared adapter adapts
            return torch.nn.functional.linear(x, weight, bias)
        params, index = current
        if index.dim() == 2:
            return self._per_token(x, weight, bias, params, index)
        if x.shape[0] != index.shape[0]:
            raise RuntimeError(
                f"{self.adapter_name}: input batch {x.shape[0]} != {index.shape[0]} examples in the adapter index"
            )
        spec = self.slot.layout.spec
        kernel, shape = self.kernel(x.shape, weight, bias)
        if self.slot.block is not None:
            # Each user's k examples side by side as one long sequence: the rows are per "example".
            y = Fa.adapted_linear(spec.method, kernel, x.reshape(shape), weight, bias, params, None, spec.scaling)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return Fa.adapted_linear(spec.method, kernel, x, weight, bias, params, index, spec.scaling)

    def kernel(self, x_shape: torch.Size, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[str, torch.Size]:
        """The kernel this layer runs on an input of ``x_shape`` under the slot as it is active now
        (the tuner's choice under ``adapter.kernel: auto``), and the shape it runs it on: packed
        tokens as one-token examples, a uniform block as one sequence per user. A forward and the
        kernel pre-tuning before a run (``train/pretune.py``) ask the same way."""
        spec, index = self.slot.layout.spec, self.slot.index
        shape, kernel, users = x_shape, spec.kernel, None
        if index.dim() == 2:
            shape = torch.Size([x_shape[0] * x_shape[1], 1, x_shape[-1]])
        elif self.slot.block is not None:
            users = self.slot.rows_count
            shape = torch.Size([users, x_shape[:-1].numel() // users, x_shape[-1]])
            kernel = spec.impl.block_kernel(kernel)
        if kernel == "auto":
            users = self.slot.distinct_users() if users is None else users
            kernel = self.slot.tuner.choose(spec.method, spec.rank, weight, bias, shape, users, spec.scaling)
        return kernel, shape

    def _per_token(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   params: dict[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        """Each token on its own user's adapter: the tokens as a batch of one-token examples."""
        if x.shape[:2] != index.shape:
            raise RuntimeError(f"{self.adapter_name}: input tokens {tuple(x.shape[:2])} != the adapter index {tuple(index.shape)}")
        spec = self.slot.layout.spec
        kernel, shape = self.kernel(x.shape, weight, bias)
        y = Fa.adapted_linear(spec.method, kernel, x.reshape(shape), weight, bias, params, index.reshape(-1),
                              spec.scaling)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return f"name={self.adapter_name}, in={self.in_features}, out={self.out_features}"


def personal_layers(model: nn.Module, slot: AdapterSlot) -> dict[tuple[int, int, bool, torch.dtype], "AdaptedLinear"]:
    """One adapted layer of each ``(out, in, bias, dtype)`` that carries users' adapters (a layer
    only the shared adapter adapts runs plain): what kernel tuning measures before a run or a server."""
    personal = {name for name, _, _ in slot.layout.modules}
    layers: dict[tuple[int, int, bool, torch.dtype], AdaptedLinear] = {}
    for module in model.modules():
        if isinstance(module, AdaptedLinear) and module.adapter_name in personal:
            key = (module.out_features, module.in_features, module.bias is not None, module.weight.dtype)
            layers.setdefault(key, module)
    return layers

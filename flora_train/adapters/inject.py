"""Put ``AdaptedLinear`` layers into any ``nn.Module`` by module-name patterns (PEFT's rules).

``target_modules`` is either a list of names, each matching a module whose full name equals it or
ends with ``.name`` (``["q_proj", "v_proj"]``), a single string used as a regular expression that
must match the whole module name, or ``"all-linear"`` (every linear layer except the output head).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from torch import nn

from flora_train.adapters.layer import AdaptedLinear, AdapterSlot, is_conv1d, linear_shape
from flora_train.adapters.layout import AdapterLayout, AdapterSpec
from flora_train.adapters.shared import SharedAdapter
from flora_train.adapters.tuning import KernelTuner
from flora_train.errors import UserError


class TargetModulesError(UserError, ValueError):
    """The recipe's adapter targets do not fit the base: no layer matched, or IA3 needs the
    feed-forward layers of an architecture with no known list."""


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _output_head_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {name for name, m in model.named_modules() if head is not None and m is head}


def match_target_modules(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the linear layers selected by ``target_modules``, in module order."""
    linear = [name for name, m in model.named_modules() if name and _is_linear(m)]
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            heads = _output_head_names(model)
            return [n for n in linear if n not in heads]
        pattern = re.compile(target_modules)
        return [n for n in linear if pattern.fullmatch(n)]
    targets = list(target_modules)
    return [n for n in linear if any(_named(n, t) for t in targets)]


def feedforward_modules(model: nn.Module, spec: AdapterSpec) -> tuple[str, ...]:
    """The feed-forward output layers of ``model`` (name suffixes): the spec's own list, else PEFT's
    list for the architecture (``down_proj`` for Llama, ``mlp.c_proj`` for GPT-2, ``wo`` for T5...)."""
    if spec.feedforward_modules is not None:
        return tuple(spec.feedforward_modules)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as KNOWN

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in KNOWN:
        return tuple(KNOWN[model_type])
    if spec.impl.uses_feedforward:
        raise TargetModulesError(
            f"adapter.feedforward_modules: {spec.method} needs the feed-forward output layers of this model "
            f"(architecture {model_type or type(model).__name__!r} has no known list); name them, e.g. [down_proj]"
        )
    return ()


def _named(name: str, target: str) -> bool:
    """Whether a list entry names the layer ``name``: itself, or a suffix of its dotted path."""
    return name == target or name.endswith("." + target)


def _resolved(model: nn.Module, spec: AdapterSpec, target_modules: str | Sequence[str], what: str) -> tuple[AdapterSpec, list[str]]:
    names = match_target_modules(model, target_modules)
    linear = [n for n, m in model.named_modules() if n and _is_linear(m)]
    if not names:
        raise TargetModulesError(
            f"{what}.target_modules={target_modules!r} matched no linear layer; linear layers look like {linear[:8]}"
        )
    ends = sorted({n.rsplit(".", 1)[-1] for n in linear})
    if not isinstance(target_modules, str):  # a misspelt name beside good ones adapted the others alone
        missing = [t for t in target_modules if not any(_named(n, t) for n in linear)]
        if missing:
            raise TargetModulesError(f"{what}.target_modules: {', '.join(map(repr, missing))} matched no linear layer "
                                     f"of this model; its linear layers end in {ends} (name some of them, or set "
                                     f"{what}.target_modules=all-linear)")
    heads = sorted(_output_head_names(model).intersection(names))
    if heads:  # the loss runs the head on the scored tokens of every user at once, not example by example
        raise TargetModulesError(f"{what}.target_modules selects the output head ({', '.join(heads)}), which is not "
                                 "adapted per user; leave it out ('all-linear' does)")
    return dataclasses.replace(spec, feedforward_modules=feedforward_modules(model, spec)), names


def check_feedforward(model: nn.Module, spec: AdapterSpec, target_modules: str | Sequence[str], what: str) -> None:
    """A recipe's own IA3 feed-forward list names adapted layers only, as PEFT requires: one outside
    the targets scaled nothing. (Not checked in ``inject_adapters``: a trained layout records PEFT's
    whole default list, whose layers a run may leave out of its targets.)"""
    if spec.feedforward_modules is None or not spec.impl.uses_feedforward:
        return
    names = match_target_modules(model, target_modules)
    stray = [f for f in spec.feedforward_modules if not any(_named(n, f) for n in names)]
    if stray:
        raise TargetModulesError(f"{what}.feedforward_modules: {', '.join(map(repr, stray))} is no adapted layer "
                                 f"(the feed-forward layers are some of {what}.target_modules)")


def inject_adapters(
    model: nn.Module, spec: AdapterSpec, target_modules: str | Sequence[str], tuner: KernelTuner | None = None,
    shared: tuple[AdapterSpec, str | Sequence[str], int] | None = None,
) -> tuple[AdapterSlot, AdapterLayout]:
    """Freezes ``model`` and replaces the targeted linear layers by ``AdaptedLinear`` in place.

    Returns the slot through which a step hands the layers their rows and the row layout. The base
    parameters are only frozen (``requires_grad=False``), never copied or modified. ``shared``:
    ``(spec, target_modules, seed)`` of a shared adapter (``shared.py``), put on the slot at its
    identity init; the layers of both adapters' targets are wrapped.
    """
    if any(isinstance(m, AdaptedLinear) for m in model.modules()):
        raise ValueError("model already has adapters injected")
    spec, names = _resolved(model, spec, target_modules, "adapter")
    model.requires_grad_(False)

    def layout_of(adapter: AdapterSpec, selected: list[str]) -> AdapterLayout:
        layers = [(name, model.get_submodule(name)) for name in selected]
        return AdapterLayout(adapter, [(name, *linear_shape(layer)) for name, layer in layers],
                             tuple(name for name, layer in layers if is_conv1d(layer)))

    layout = layout_of(spec, names)
    slot = AdapterSlot(layout, tuner)
    wrapped = list(names)
    if shared is not None:
        shared_spec, shared_names = _resolved(model, shared[0], shared[1], "adapter.shared")
        slot.shared = SharedAdapter.initial(layout_of(shared_spec, shared_names), shared[2])
        wrapped += [n for n in shared_names if n not in names]
    for name in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, AdaptedLinear(getattr(parent, child), name, slot))
    return slot, layout

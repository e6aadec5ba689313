"""Adapter methods, one file each behind ``AdapterMethod``; ``get_method`` is the only lookup."""

from flora_train.adapters.methods.base import AdapterMethod
from flora_train.adapters.methods.flora import FLORA, flora_linear
from flora_train.adapters.methods.ia3 import IA3_METHOD, ia3_linear
from flora_train.adapters.methods.lora import LORA, lora_linear

METHODS: dict[str, AdapterMethod] = {m.name: m for m in (FLORA, LORA, IA3_METHOD)}


def get_method(name: str) -> AdapterMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown adapter method {name!r}; expected one of {', '.join(METHODS)}") from None


__all__ = ["AdapterMethod", "METHODS", "get_method", "flora_linear", "ia3_linear", "lora_linear"]

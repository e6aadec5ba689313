"""Per-example adapter math and layers. Knows nothing of users, storage or distribution."""

from flora_train.adapters.functional import dense_adapted_weight, flora_linear, ia3_linear, lora_linear
from flora_train.adapters.inject import inject_adapters, match_target_modules
from flora_train.adapters.layer import AdaptedLinear, AdapterSlot
from flora_train.adapters.layout import AdapterLayout, AdapterSpec
from flora_train.adapters.seeding import user_seed

__all__ = [
    "AdaptedLinear",
    "AdapterLayout",
    "AdapterSlot",
    "AdapterSpec",
    "dense_adapted_weight",
    "flora_linear",
    "ia3_linear",
    "inject_adapters",
    "lora_linear",
    "match_target_modules",
    "user_seed",
]

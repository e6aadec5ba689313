"""The closed sets of values a recipe key takes: enums, so OmegaConf rejects anything else with
the list of valid ones (``schema.py`` uses them). Methods, their kernels, optimizers, export
formats and schedulers are the keys of their registries, so a new one is one file and one registry entry."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from flora_train.adapters.methods import METHODS
from flora_train.export import EXPORT_FORMATS
from flora_train.launch import SCHEDULERS
from flora_train.store.optimizers import OPTIMIZERS, STATE_DTYPES
from flora_train.store.tiers import TIERS


def _registry_enum(name: str, values: Iterable[str], doc: str) -> type[Enum]:
    enum = Enum(name, [(v, v) for v in values], type=str, module=__name__, qualname=name)
    enum.__doc__ = doc
    return enum


Method = _registry_enum("Method", METHODS, "adapter.method: the adapter methods (adapters/methods/).")
Kernel = _registry_enum("Kernel", ["auto", *dict.fromkeys(k for m in METHODS.values() for k in m.kernels)],
                        "How an adapter method is computed (each method's ``kernels``). auto measures the "
                        "method's kernels and keeps the fastest.")
OptimizerName = _registry_enum("OptimizerName", OPTIMIZERS, "store.optimizer.name: the row-wise optimizers "
                               "(store/optimizers/).")
StateDtype = _registry_enum("StateDtype", STATE_DTYPES, "store.optimizer.state_dtype: the optimizer's state in "
                            "float32, or bfloat16 for half its bytes where the optimizer allows it (its state_dtypes).")
StoreTier = _registry_enum("StoreTier", TIERS, "store.tier: where the rows live (store/tiers.py).")
ExportFormat = _registry_enum("ExportFormat", ["none", *(n for n, e in EXPORT_FORMATS.items() if e.in_recipe)],
                              "export.format: what a run exports at its end (none: nothing).")


class DataFormat(str, Enum):
    auto = "auto"
    jsonl = "jsonl"
    parquet = "parquet"
    csv = "csv"
    tsv = "tsv"  # csv with tabs between fields
    arrow = "arrow"


class BadRowPolicy(str, Enum):
    error = "error"
    skip = "skip"


class DataChangePolicy(str, Enum):
    error = "error"  # a resume whose data, plan or users changed fails before training
    new_phase = "new_phase"  # the step counter goes on; the rest is planned from the new data


class NonFinitePolicy(str, Enum):
    skip_users = "skip_users"
    skip_step = "skip_step"
    error = "error"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Schedule(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


class Placement(str, Enum):
    owner = "owner"
    fetch = "fetch"


class OffloadDevice(str, Enum):
    none = "none"
    cpu = "cpu"


class Selection(str, Enum):
    last = "last"  # every user keeps its last row
    best = "best"  # each user keeps the best on its validation split of: its row at the identity (the
    # shared adapter alone, or the base) and its row at each validation


class SharedPhase(str, Enum):
    first = "first"  # train the shared adapter on every user's data, freeze it, then the personal rows
    joint = "joint"  # both in the same steps (the shared gradient sums every user's normalised loss)


class SyntheticTaskKind(str, Enum):
    rules = "rules"  # each user a hidden key -> value rule (prompt/completion; the quickstart)
    persona_chat = "persona_chat"  # each user's greeting and sign-off in chat replies (messages)


class RetainTargets(str, Enum):
    base = "base"
    data = "data"


Scheduler = _registry_enum("Scheduler", SCHEDULERS, "launch.scheduler: where `flora-train launch` starts the job "
                           "(launch/).")

"""The closed sets of values a recipe key takes: enums, so OmegaConf rejects anything else with
the list of valid ones (``schema.py`` uses them)."""

from __future__ import annotations

from enum import Enum


class Method(str, Enum):
    flora = "flora"
    lora = "lora"
    ia3 = "ia3"


class Kernel(str, Enum):
    """How an adapter method is computed. auto measures the method's kernels and keeps the fastest."""

    auto = "auto"
    bmm = "bmm"  # LoRA: gather each example's A, B; two batched matmuls
    segment = "segment"  # LoRA: sort by user; one pair of GEMMs per user
    loop = "loop"  # LoRA: one pair of GEMMs per user, no sort
    stacked = "stacked"  # FLoRA: the r scaled inputs in one GEMM
    rankwise = "rankwise"  # FLoRA: r GEMMs of the base's shape
    fused = "fused"  # IA3: its only kernel


class DataFormat(str, Enum):
    auto = "auto"
    jsonl = "jsonl"
    parquet = "parquet"
    csv = "csv"
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


class OptimizerName(str, Enum):
    adamw = "adamw"
    adagrad = "adagrad"
    rowwise_adagrad = "rowwise_adagrad"  # TorchRec's: one accumulator per row and module


class StateDtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"  # adamw's moments in half the bytes


class Schedule(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


class ExportFormat(str, Enum):
    none = "none"
    peft = "peft"
    flora = "flora"
    packed = "packed"  # pack-NNNNN.safetensors of up to export.pack_size users each, for huge populations


class StoreTier(str, Enum):
    device = "device"
    host = "host"
    disk = "disk"


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


class Scheduler(str, Enum):
    local = "local"
    slurm = "slurm"
    k8s = "k8s"

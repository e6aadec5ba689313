"""What each `flora-train` command does once its flags are parsed (``parser.py``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flora_train.cli.parser import parse_args
from flora_train.errors import BAD_INPUT_EXIT_CODE, INTERRUPTED_EXIT_CODE
from flora_train.files import STORAGE_ERRNOS, replaced


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Read by transformers when it is imported (its errors only, no progress bars), so commands that
    # never load a model (launch, users, forget, data) do not pay its 2 s import; a user's own
    # setting wins, and launched processes inherit these.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its loggers from it when imported
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed 0.19 gathers ZeRO-3 partitions with a call torch 2.13 deprecates; nothing to act on.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise warn that it fell back


def _print_footprint(cfg: Any) -> None:
    """The per-user bytes of the recipe's adapter and optimizer, when the base's config is at hand
    (a hub id with no local copy is not fetched: the line then says why it is missing). Targets that
    match no layer of the base fail validation, as they would fail the run."""
    from flora_train.base import ModelLoadError
    from flora_train.errors import UserError
    from flora_train.store.footprint import describe, footprint

    try:
        print(describe(cfg, footprint(cfg)))
    except ModelLoadError as exc:  # a hub id not downloaded yet: the recipe may be right, its size is unknown
        print(f"# per-user bytes: not computed ({str(exc).splitlines()[0][:300]})")
    except UserError:  # the recipe does not fit its base (adapter.target_modules): the run would fail too
        raise
    except Exception as exc:  # the recipe itself is valid; only the size estimate is unavailable
        print(f"# per-user bytes: not computed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")


def _generate(args: argparse.Namespace) -> int:
    import json

    from flora_train.inference import GenerationSettings, generate, load_trained
    from flora_train.inference.prompts import read_prompts

    users, prompts = read_prompts(args.prompts, chat=args.chat)
    if args.users is not None:
        keep = [i for i, u in enumerate(users) if u in set(args.users)]
        if not keep:
            print(f"flora-train: error: --users: no prompt in {args.prompts} is of these users", file=sys.stderr)
            return BAD_INPUT_EXIT_CODE
        users, prompts = [users[i] for i in keep], [prompts[i] for i in keep]
    try:
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                      num_beams=args.num_beams, seed=args.seed, stop=tuple(args.stop), chat=args.chat)
    except ValueError as exc:
        print(f"flora-train: error: {exc}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    if args.out.is_dir():  # found before generating, not when writing what took minutes
        print(f"flora-train: error: {args.out}: is a directory, name a file in it (e.g. preds.jsonl)", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    if args.out.exists() and args.out.samefile(args.prompts):  # the prompts would be written over
        print(f"flora-train: error: --out {args.out} is the --prompts file: name another file", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(args.out.parent, os.W_OK):  # found now, not after the generation it would hold
        print(f"flora-train: error: --out {args.out}: its folder is not writable", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    trained = load_trained(args.source, args.checkpoint, args.device, base=args.base)
    results, stats = generate(trained, prompts, users, settings, args.batch_size, progress=True)
    # an earlier --out stays whole until this one is
    with replaced(args.out) as tmp, tmp.open("w", encoding="utf-8") as f:
        for user, prompt, r in zip(users, prompts, results):
            f.write(json.dumps({"user_id": user, "prompt": prompt, "completion": r.text, "tokens": r.tokens,
                                "adapter": "user" if r.user_known else "base"}, ensure_ascii=False) + "\n")
    print(f"generated {stats.new_tokens} token{'' if stats.new_tokens == 1 else 's'} for {stats.prompts} "
          f"prompt{'' if stats.prompts == 1 else 's'} in {stats.seconds:.1f}s "
          f"({stats.tokens_per_s:.0f} tokens/s); {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    _quiet_libraries()
    from flora_train import dist as fdist
    from flora_train.host_memory import keep_freed_blocks

    keep_freed_blocks()

    clean = False
    try:
        code = _dispatch(args)
        clean = code == 0
        return code
    except BrokenPipeError:  # the reader went away (`flora-train users RUN | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except KeyboardInterrupt:  # Ctrl-C outside training's steps (which checkpoint first), or a second one
        print("\nflora-train: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    finally:
        fdist.shutdown(clean)


def _validate(args: argparse.Namespace) -> None:
    from flora_train.config import load_recipe, recipe_to_yaml
    from flora_train.train.data_setup import length_report

    cfg = load_recipe(args.recipe, args.overrides)
    print(recipe_to_yaml(cfg), end="")
    _print_footprint(cfg)
    line, warning = length_report(cfg)
    print(line)
    if warning is not None:
        print(f"flora-train: warning: {warning}", file=sys.stderr)


def _run(args: argparse.Namespace) -> None:
    from flora_train.config import load_recipe
    from flora_train.train.run import run_training

    run_training(load_recipe(args.recipe, args.overrides), resume=args.resume)


def _launch(args: argparse.Namespace) -> int:
    from flora_train.cli.parser import LAUNCH_FLAGS
    from flora_train.config import load_recipe
    from flora_train.launch import launch

    flags = {k: getattr(args, k) for k in LAUNCH_FLAGS}
    made = {f"launch.{k}={v}": f"{LAUNCH_FLAGS[k]} {v}" for k, v in flags.items() if v is not None}
    given = (*(k for k, v in flags.items() if v is not None), *(("wait",) if args.wait else ()))
    return launch(load_recipe(args.recipe, [*args.overrides, *made], written_as=made), dry_run=args.dry_run,
                  wait=args.wait, given=given)


def _eval(args: argparse.Namespace) -> None:
    from flora_train.train.scoring import run_eval

    run_eval(args.run_dir, args.checkpoint, args.data, base=args.base)


def _users(args: argparse.Namespace) -> None:
    from flora_train.lifecycle import list_users, users_table

    rows = list_users(args.run_dir, args.users)
    for line in [json.dumps(r, ensure_ascii=False) for r in rows] if args.json else users_table(rows):
        print(line)


def _forget(args: argparse.Namespace) -> None:
    from flora_train.config import load_recipe
    from flora_train.inference.trained import base_for_training_on
    from flora_train.lifecycle import forget_users
    from flora_train.run_dir import RunDir

    rd = RunDir(args.run_dir)
    base = None
    if args.retrain_shared and rd.recipe.is_file():  # the base it retrains on, found before anything is forgotten
        base = base_for_training_on(args.run_dir, load_recipe(rd.recipe), args.base)
    steps = rd.removed_shared_steps()  # removed by an earlier forget, not retrained since
    forgotten: set[str] = set()
    if args.users is not None:
        out = forget_users(args.run_dir, args.users)
        forgotten = set(out["users"])
        aside = f" (runs train.overwrite moved aside: {out['moved_aside_runs']})" if out["moved_aside_runs"] else ""
        print(f"forgot {len(out['users'])} user(s): {out['checkpoint_rows']} saved rows in {out['checkpoints']} "
              f"checkpoint(s){aside}, {out['export_folders']} export folder(s), {out['jsonl_lines']} JSONL line(s); "
              f"removed {', '.join(out['removed_derived']) or 'nothing derived'} (rebuilt by the next run)")
        if out["exports_elsewhere"]:
            print(f"also removed from the exports outside the run: {', '.join(out['exports_elsewhere'])}")
        if out["removed_moved_aside_shared"]:
            print(f"removed {', '.join(out['removed_moved_aside_shared'])}: trained on the forgotten users' data "
                  "too, in a run train.overwrite moved aside (nothing retrains it)")
        for line in out["recovered"]:
            print(f"completed an interrupted forget: {line}")
        if out["removed_shared_adapter"]:
            steps = out["shared_adapter_steps"]
            if not args.retrain_shared:
                print("removed shared_adapter.safetensors: it was trained on the forgotten users' data too; retrain "
                      f"it with `flora-train forget {args.run_dir} --retrain-shared`")
    if not args.retrain_shared:
        return
    if steps is not None:
        from flora_train.train.shared_baseline import retrain_shared_baseline

        n = retrain_shared_baseline(args.run_dir, forgotten, steps, base)
        print(f"retrained the shared adapter for {steps} steps on {n} examples of the remaining users")
    elif rd.shared_adapter.is_file():
        print("the shared adapter holds no forgotten user's data: nothing to retrain")
    else:
        print("no shared adapter to retrain: this run has none (train it with train.compare_shared_baseline=true)")


def _export(args: argparse.Namespace) -> None:
    from flora_train.export import export_adapters

    m = export_adapters(args.run_dir, args.format, args.users, args.out, checkpoint=args.checkpoint,
                        base_model_id=args.base_model_id, pack_size=args.pack_size, base=args.base)
    n = m["num_users"]
    print(f"exported {n} user{'' if n == 1 else 's'} ({m['format']}) to {args.out}")


def _bench(args: argparse.Namespace) -> None:
    from flora_train.bench.suites import run_bench

    run_bench(args)


def _serve(args: argparse.Namespace) -> None:
    from flora_train.arg_types import api_key_error
    from flora_train.errors import warn
    from flora_train.inference import load_trained
    from flora_train.inference.listen import listen_socket, loopback, run_app
    from flora_train.inference.server import API_KEY_ENV, check_cache_users, create_app
    from flora_train.inference.trained import InferenceError

    check_cache_users(args.cache_users, args.max_batch)  # the flags alone: before anything loads
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if key is not None and (error := api_key_error(key)):
        raise InferenceError(f"${API_KEY_ENV}: {error}")
    sock = listen_socket(args.host, args.port)
    if key is None and not loopback(args.host):
        warn(f"serving on {args.host} without --api-key (or ${API_KEY_ENV}): whoever reaches it can use every "
             "user's adapter")
    trained = load_trained(args.source, args.checkpoint, args.device, args.dtype, base=args.base)
    app = create_app(trained, model_name=args.model_name, strict_users=args.strict_users,
                     max_batch=args.max_batch, prefill_tokens=args.prefill_tokens,
                     max_prompt_tokens=args.max_prompt_tokens, max_queue=args.max_queue,
                     cache_users=args.cache_users, follow_s=args.follow, api_key=key)
    # Only once the app stands: a limit the model refuses must not follow a line saying it serves.
    print(f"serving {len(trained.users)} users' {trained.layout.spec.method} adapters on "
          f"http://{args.host}:{sock.getsockname()[1]} (model {args.model_name!r})", flush=True)
    run_app(app, sock)


def _doctor(args: argparse.Namespace) -> int:
    from flora_train.doctor import doctor

    return doctor(args.device, args.out, small=args.small, bench=not args.no_bench, jobs=args.jobs)


def _base(args: argparse.Namespace) -> None:  # base convert
    from flora_train.base.convert import convert_gguf

    out = convert_gguf(args.folder, args.gguf_file, args.out, args.dtype)
    print(f"converted {args.folder}/{args.gguf_file} to {out} (checked: the folder gives the GGUF model's logits, "
          f"bit for bit): use base.name_or_path={out} (no base.gguf_file)")


def _data(args: argparse.Namespace) -> None:  # data synth
    from flora_train.data import SyntheticTask
    from flora_train.data.persona_chat import PersonaChatTask
    from flora_train.errors import UserError

    task = (PersonaChatTask if args.task == "persona_chat" else SyntheticTask)(
        args.users, args.train_examples, args.eval_examples, seed=args.seed)
    there = [args.out / name for name in task.FILES if (args.out / name).exists()]
    if there and not args.overwrite:  # --out data/ beside the user's own train.jsonl replaced it
        raise UserError(f"--out {args.out}: {', '.join(p.name for p in there)} already there; --overwrite "
                        "replaces them, or name another folder")
    written = task.write(args.out)
    paths = list(written.values() if isinstance(written, dict) else written)
    for path in paths:
        print(path)


# Each command of the parser (parser.py) and what runs it; an exit code, or None for 0.
COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {
    "run": _run, "launch": _launch, "validate": _validate, "eval": _eval, "export": _export, "bench": _bench,
    "generate": _generate, "users": _users, "forget": _forget, "serve": _serve, "doctor": _doctor, "base": _base,
    "data": _data,
}


def _file_in_the_way(exc: OSError) -> Path | None:
    """The file (a device such as /dev/null too) standing where a folder of ``exc``'s path is to be:
    mkdir's bare "File exists", or "Not a directory" naming a path under it, named neither."""
    if not isinstance(exc, (FileExistsError, NotADirectoryError)) or exc.filename is None:
        return None
    path = Path(str(exc.filename))
    for place in (path, *path.parents):
        if place.exists():
            return place if not place.is_dir() else None
    return None


def _dispatch(args: argparse.Namespace) -> int:
    from flora_train.dist import LOST_PEERS_EXIT_CODE, LostPeers
    from flora_train.errors import NONFINITE_EXIT_CODE, UserError
    from flora_train.train.preemption import REQUEUE_EXIT_CODE, Interrupted, Preempted
    from flora_train.train.trainer import NonFiniteError

    try:
        return COMMANDS[args.command](args) or 0
    except (UserError, FileNotFoundError) as exc:  # bad input: one line, never a traceback
        print(f"flora-train: error: {exc}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    except (IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError) as exc:  # an --out or path that
        # cannot be written there: one line naming it (a file where a folder is to be made is mkdir's FileExistsError)
        in_the_way = _file_in_the_way(exc)
        said = (f"{in_the_way}: a file is there where a folder is needed" if in_the_way
                else f"{exc.filename}: {exc.strerror}")
        print(f"flora-train: error: {said}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        # the disk, not the input (full, over quota, read-only): one line naming the file; each file
        # written goes through files.replaced, so what was there before is as it was
        print(f"flora-train: error: {exc.filename or 'writing'}: {exc.strerror}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    except NonFiniteError as exc:
        print(f"flora-train: training stopped: {exc}", file=sys.stderr)
        return NONFINITE_EXIT_CODE
    except Interrupted as exc:
        print(f"flora-train: interrupted: {exc}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except Preempted as exc:
        print(f"flora-train: preempted: {exc}", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    except LostPeers as exc:
        print(f"flora-train: error: {exc}", file=sys.stderr)
        return LOST_PEERS_EXIT_CODE

"""`flora-train run | validate | eval | export | bench | data` — the command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from flora_train.arg_types import at_least_one, port_number, positive_seconds, user_list, whole_number
from flora_train.devices import device_arg


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flora-train", description="Jointly fine-tune thousands of per-user adapters.")
    # The deepspeed launcher passes --local_rank=N to every process; LOCAL_RANK carries the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train from a recipe")
    run.add_argument("recipe", type=Path)
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run_dir")

    la = sub.add_parser("launch", help="submit a recipe as a job (local torchrun, Slurm, Kubernetes)")
    la.add_argument("recipe", type=Path)
    la.add_argument("overrides", nargs="*", help="key.sub=value overrides (launch.* included)")
    la.add_argument("--scheduler", choices=["local", "slurm", "k8s"], help="launch.scheduler")
    for flag, key in (("--nodes", "nodes"), ("--procs-per-node", "procs_per_node"), ("--gpus-per-node", "gpus_per_node")):
        la.add_argument(flag, type=int, dest=key, help=f"launch.{key}")
    for flag, key in (("--partition", "partition"), ("--time", "time_limit"), ("--image", "image"), ("--job-name", "job_name")):
        la.add_argument(flag, dest=key, help=f"launch.{key}")
    la.add_argument("--dry-run", action="store_true", help="print what would be run or submitted, start nothing")
    la.add_argument("--wait", action="store_true", help="follow a submitted job to its end and return its exit code")

    val = sub.add_parser("validate", help="check a recipe and print it resolved, without running")
    val.add_argument("recipe", type=Path)
    val.add_argument("overrides", nargs="*")

    ev = sub.add_parser("eval", help="per-user held-out loss/accuracy of a run's latest checkpoint")
    ev.add_argument("run_dir", type=Path)
    ev.add_argument("--checkpoint", type=Path, default=None)
    ev.add_argument("--data", type=Path, default=None, help="score another evaluation file (same columns as training)")

    ex = sub.add_parser("export", help="write per-user adapters of a run")
    ex.add_argument("run_dir", type=Path)
    from flora_train.export import EXPORT_FORMATS

    ex.add_argument("--format", choices=list(EXPORT_FORMATS), required=True,
                    help="; ".join(f"{name}: {kind.summary}" for name, kind in EXPORT_FORMATS.items()))
    ex.add_argument("--users", type=user_list, default=None, help="comma-separated user ids, or @FILE with one id per line (default: all)")
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--checkpoint", type=Path, default=None, help="this checkpoint folder (default: the run's newest intact one)")
    ex.add_argument("--pack-size", type=int, default=4096, help="packed: users per pack file")
    ex.add_argument("--base-model-id", default=None,
                    help="peft: base_model_name_or_path to write (the model id your server loads; default: the run's base)")

    from flora_train.bench.suites import SUITES, add_arguments

    be = sub.add_parser("bench", help=f"side-by-side benchmarks: {', '.join(SUITES)} or all")

    add_arguments(be)

    gen = sub.add_parser("generate", help="mixed-user batched generation: every prompt with its own user's adapter")
    gen.add_argument("source", type=Path, help="a run directory, a checkpoint or a --format flora export folder")
    gen.add_argument("--prompts", type=Path, required=True, help="JSONL: user_id + prompt (or messages) per line")
    gen.add_argument("--out", type=Path, required=True, help="JSONL: user_id, prompt, completion per line")
    gen.add_argument("--users", type=user_list, default=None, help="only these users' prompts (comma-separated or @FILE)")
    gen.add_argument("--checkpoint", type=Path, default=None)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--num-beams", type=int, default=1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    gen.add_argument("--batch-size", type=at_least_one, default=16)
    gen.add_argument("--device", type=device_arg, default="auto")

    us = sub.add_parser("users", help="who is in a run: steps, tokens, last held-out loss, export folders")
    us.add_argument("run_dir", type=Path)
    us.add_argument("--json", action="store_true", help="one JSON object per user instead of a table")

    fg = sub.add_parser("forget", help="remove users from a run: checkpoints, exports, per-user files")
    fg.add_argument("run_dir", type=Path)
    fg.add_argument("--users", type=user_list, required=True, help="comma-separated user ids, or @FILE with one id per line")
    fg.add_argument("--retrain-shared", action="store_true",
                    help="train the shared adapter again without the forgotten users' data (it is removed otherwise)")

    srv = sub.add_parser("serve", help="OpenAI-compatible server; concurrent users batched into one forward")
    srv.add_argument("source", type=Path, help="a run directory, a checkpoint or a --format flora export folder")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=port_number, default=8000, help="0: a free port (the first line says which)")
    srv.add_argument("--checkpoint", type=Path, default=None)
    srv.add_argument("--model-name", default="flora", help="the model id clients name (optionally '<name>:<user_id>')")
    srv.add_argument("--strict-users", action="store_true", help="404 for users never trained (default: the base model)")
    srv.add_argument("--max-batch", type=at_least_one, default=32, help="sequences generating at once at most")
    srv.add_argument("--prefill-tokens", type=at_least_one, default=512,
                     help="prompt tokens prefilled per step at most: longer prompts are prefilled in chunks")
    srv.add_argument("--max-prompt-tokens", type=at_least_one, default=None,
                     help="prompt + max_tokens limit (default: the recipe's data.max_length, else the model's context)")
    srv.add_argument("--max-queue", type=at_least_one, default=256, help="requests waiting at most; more get 429 with Retry-After")
    srv.add_argument("--cache-users", type=at_least_one, default=None,
                     help="adapters held on the device at most (LRU, filled on demand; default: every user)")
    srv.add_argument("--follow", type=positive_seconds, nargs="?", const=5.0, default=None, metavar="SECONDS",
                     help="serve each new intact checkpoint of the run as it appears (looks every SECONDS, default 5)")
    srv.add_argument("--dtype", default=None, help="the base's dtype (default: the recipe's base.dtype)")
    srv.add_argument("--device", type=device_arg, default="auto")

    doc = sub.add_parser("doctor", help="self-check of the accelerator path: every method, bf16, ZeRO-3 offload, benches")
    doc.add_argument("--device", type=device_arg, default="auto", help="auto (cuda when present), cuda or cpu")
    doc.add_argument("--out", type=Path, default=Path("runs/doctor"))
    doc.add_argument("--small", action="store_true", help="small models and benches (how the test suite runs it)")
    doc.add_argument("--no-bench", action="store_true", help="skip the benchmark tables")
    doc.add_argument("--jobs", type=at_least_one, default=1,
                     help="checks run at once (default 1: each check's seconds are its own; the suite runs 2 on CPU)")

    ba = sub.add_parser("base", help="base-model utilities")
    ba_sub = ba.add_subparsers(dest="base_command", required=True)
    conv = ba_sub.add_parser("convert", help="convert a GGUF base once into a safetensors folder (for ZeRO-3, fast loads)")
    conv.add_argument("folder", help="the folder holding the GGUF file (base.name_or_path)")
    conv.add_argument("--gguf-file", required=True, help="the GGUF file's name in that folder (base.gguf_file)")
    conv.add_argument("--out", type=Path, required=True, help="a new folder for the converted model and tokenizer")
    conv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")

    da = sub.add_parser("data", help="data utilities")
    da_sub = da.add_subparsers(dest="data_command", required=True)
    syn = da_sub.add_parser("synth", help="write a synthetic personalisation task as JSONL")
    syn.add_argument("--task", choices=["rules", "persona_chat"], default="rules",
                     help="rules: prompt/completion key->value rules (the quickstart); persona_chat: chat rows, each "
                     "user's greeting and sign-off, plus retain.jsonl and general_eval.jsonl")
    syn.add_argument("--users", type=at_least_one, default=1000)
    syn.add_argument("--train-examples", type=at_least_one, default=16)
    syn.add_argument("--eval-examples", type=whole_number, default=4, help="per user; 0 writes no eval.jsonl rows")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--out", type=Path, required=True)
    return p


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

    users, prompts = read_prompts(args.prompts)
    if args.users is not None:
        keep = [i for i, u in enumerate(users) if u in set(args.users)]
        if not keep:
            print(f"flora-train: error: --users: no prompt in {args.prompts} is of these users", file=sys.stderr)
            return 2
        users, prompts = [users[i] for i in keep], [prompts[i] for i in keep]
    try:
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                      num_beams=args.num_beams, seed=args.seed, stop=tuple(args.stop), chat=args.chat)
    except ValueError as exc:
        print(f"flora-train: error: {exc}", file=sys.stderr)
        return 2
    if args.out.is_dir():  # found before generating, not when writing what took minutes
        print(f"flora-train: error: {args.out}: is a directory, name a file in it (e.g. preds.jsonl)", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    trained = load_trained(args.source, args.checkpoint, args.device)
    results, stats = generate(trained, prompts, users, settings, args.batch_size, progress=True)
    with args.out.open("w", encoding="utf-8") as f:
        for user, prompt, r in zip(users, prompts, results):
            f.write(json.dumps({"user_id": user, "prompt": prompt, "completion": r.text, "tokens": r.tokens,
                                "adapter": "user" if r.user_known else "base"}, ensure_ascii=False) + "\n")
    print(f"generated {stats.new_tokens} tokens for {stats.prompts} prompts in {stats.seconds:.1f}s "
          f"({stats.tokens_per_s:.0f} tokens/s); {args.out}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as `flora-train` reads it: recipe overrides (``key.sub=value``) may come
    anywhere, before or after options (plain argparse takes positionals only before them)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command == "bench":
        from flora_train.bench.suites import unread_flags

        if problem := unread_flags(args):
            parser.error(problem)
    if args.command == "export":
        from flora_train.export import EXPORT_FORMATS

        for flag, dest, default in (("--pack-size", "pack_size", 4096), ("--base-model-id", "base_model_id", None)):
            if getattr(args, dest) != default and dest not in EXPORT_FORMATS[args.format].reads:
                readers = " or ".join(f"--format {n}" for n, e in EXPORT_FORMATS.items() if dest in e.reads)
                parser.error(f"{flag} is read only by {readers}, not --format {args.format}")
    if args.command == "generate" and not args.sample:  # greedy decoding would ignore them without a word
        given = [flag for flag, value, default in (("--temperature", args.temperature, 1.0), ("--top-p", args.top_p, 1.0),
                                                   ("--top-k", args.top_k, 0), ("--seed", args.seed, None))
                 if value != default]
        if given:
            parser.error(f"{', '.join(given)}: sampling settings, used only with --sample (without it decoding is greedy)")
    return args


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
    finally:
        fdist.shutdown(clean)


def _dispatch(args: argparse.Namespace) -> int:
    from flora_train.config import load_recipe, recipe_to_yaml
    from flora_train.dist import LOST_PEERS_EXIT_CODE, LostPeers
    from flora_train.errors import UserError
    from flora_train.train.preemption import REQUEUE_EXIT_CODE, Preempted
    from flora_train.train.trainer import NonFiniteError

    try:
        if args.command == "validate":
            cfg = load_recipe(args.recipe, args.overrides)
            print(recipe_to_yaml(cfg), end="")
            _print_footprint(cfg)
            from flora_train.train.data_setup import length_report

            line, warning = length_report(cfg)
            print(line)
            if warning is not None:
                print(f"flora-train: warning: {warning}", file=sys.stderr)
        elif args.command == "run":
            from flora_train.train.run import run_training

            run_training(load_recipe(args.recipe, args.overrides), resume=args.resume)
        elif args.command == "launch":
            from flora_train.launch import launch

            flags = {k: getattr(args, k) for k in ("scheduler", "nodes", "procs_per_node", "gpus_per_node",
                                                   "partition", "time_limit", "image", "job_name")}
            overrides = [*args.overrides, *(f"launch.{k}={v}" for k, v in flags.items() if v is not None)]
            return launch(load_recipe(args.recipe, overrides), dry_run=args.dry_run, wait=args.wait)
        elif args.command == "eval":
            from flora_train.train.scoring import run_eval

            run_eval(args.run_dir, args.checkpoint, args.data)
        elif args.command == "users":
            from flora_train.lifecycle import list_users, users_table

            rows = list_users(args.run_dir)
            for line in [json.dumps(r, ensure_ascii=False) for r in rows] if args.json else users_table(rows):
                print(line)
        elif args.command == "forget":
            from flora_train.lifecycle import forget_users

            out = forget_users(args.run_dir, args.users)
            print(f"forgot {len(out['users'])} user(s): {out['checkpoint_rows']} saved rows in {out['checkpoints']} "
                  f"checkpoint(s), {out['export_folders']} export folder(s), {out['jsonl_lines']} JSONL line(s); "
                  f"removed {', '.join(out['removed_derived']) or 'nothing derived'} (rebuilt by the next run)")
            for line in out["recovered"]:
                print(f"completed an interrupted forget: {line}")
            if out["removed_shared_adapter"] and args.retrain_shared:
                from flora_train.train.scoring import retrain_shared_baseline

                n = retrain_shared_baseline(args.run_dir, set(out["users"]), out["shared_adapter_steps"])
                print(f"retrained the shared adapter for {out['shared_adapter_steps']} steps on {n} examples of the "
                      "remaining users")
            elif out["removed_shared_adapter"]:
                print("removed shared_adapter.safetensors: it was trained on the forgotten users' data too; retrain it "
                      "with `flora-train forget --retrain-shared` (or a run with train.compare_shared_baseline=true)")
            elif args.retrain_shared:
                print("no shared adapter to retrain: this run has none (train it with train.compare_shared_baseline=true)")
        elif args.command == "export":
            from flora_train.export import export_adapters

            m = export_adapters(args.run_dir, args.format, args.users, args.out, checkpoint=args.checkpoint,
                                base_model_id=args.base_model_id, pack_size=args.pack_size)
            n = m["num_users"]
            print(f"exported {n} user{'' if n == 1 else 's'} ({m['format']}) to {args.out}")
        elif args.command == "bench":
            from flora_train.bench.suites import run_bench

            run_bench(args)
        elif args.command == "generate":
            return _generate(args)
        elif args.command == "serve":
            from flora_train.inference import load_trained
            from flora_train.inference.listen import listen_socket, run_app
            from flora_train.inference.server import check_cache_users, create_app

            check_cache_users(args.cache_users, args.max_batch)  # the flags alone: before anything loads
            sock = listen_socket(args.host, args.port)
            trained = load_trained(args.source, args.checkpoint, args.device, args.dtype)
            app = create_app(trained, model_name=args.model_name, strict_users=args.strict_users,
                             max_batch=args.max_batch, prefill_tokens=args.prefill_tokens,
                             max_prompt_tokens=args.max_prompt_tokens, max_queue=args.max_queue,
                             cache_users=args.cache_users, follow_s=args.follow)
            # Only once the app stands: a limit the model refuses must not follow a line saying it serves.
            print(f"serving {len(trained.users)} users' {trained.layout.spec.method} adapters on "
                  f"http://{args.host}:{sock.getsockname()[1]} (model {args.model_name!r})", flush=True)
            run_app(app, sock)
        elif args.command == "doctor":
            from flora_train.doctor import doctor

            return doctor(args.device, args.out, small=args.small, bench=not args.no_bench, jobs=args.jobs)
        elif args.command == "base":
            from flora_train.base.convert import convert_gguf

            out = convert_gguf(args.folder, args.gguf_file, args.out, args.dtype)
            print(f"converted {args.folder}/{args.gguf_file} to {out} (checked: the folder gives the GGUF model's logits, "
                  f"bit for bit): use base.name_or_path={out} (no base.gguf_file)")
        elif args.command == "data":
            from flora_train.data import SyntheticTask
            from flora_train.data.persona_chat import PersonaChatTask

            if args.task == "persona_chat":
                chat = PersonaChatTask(args.users, args.train_examples, args.eval_examples, seed=args.seed)
                paths = list(chat.write(args.out).values())
            else:
                paths = list(SyntheticTask(args.users, args.train_examples, args.eval_examples, seed=args.seed).write(args.out))
            for path in paths:
                print(path)
    except (UserError, FileNotFoundError) as exc:  # bad input: one line, never a traceback
        print(f"flora-train: error: {exc}", file=sys.stderr)
        return 2
    except (IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError) as exc:  # an --out or path that
        # cannot be written there: one line naming it (a file where a folder is to be made is mkdir's FileExistsError)
        file_in_the_way = isinstance(exc, FileExistsError) and Path(str(exc.filename)).is_file()
        why = "a file is there where a folder is needed" if file_in_the_way else exc.strerror
        print(f"flora-train: error: {exc.filename}: {why}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"flora-train: training stopped: {exc}", file=sys.stderr)
        return 3
    except Preempted as exc:
        print(f"flora-train: preempted: {exc}", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    except LostPeers as exc:
        print(f"flora-train: error: {exc}", file=sys.stderr)
        return LOST_PEERS_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The command line's parser: every command and flag, and the checks of flags against each other
that a usage line reports (made before anything heavy is imported: ``--help`` takes no torch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flora_train.arg_types import (
    api_key,
    at_least_one,
    model_name,
    port_number,
    positive_seconds,
    user_list,
    whole_number,
)
from flora_train.devices import BASE_DTYPES, device_arg

BASE_HELP = ("the base model's folder where it is now, if it moved after training (default: where the run "
             "trained on it); it must be that base: its config and weights are checked")


# launch's flags, each the launch.<key> it sets (an error names the flag as typed, not the override it made)
LAUNCH_FLAGS = {"scheduler": "--scheduler", "nodes": "--nodes", "procs_per_node": "--procs-per-node",
                "gpus_per_node": "--gpus-per-node", "partition": "--partition", "time_limit": "--time",
                "image": "--image", "job_name": "--job-name"}
LAUNCH_COUNTS = ("nodes", "procs_per_node", "gpus_per_node")


def _version() -> str:
    from flora_train import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flora-train", description="Jointly fine-tune thousands of per-user adapters.")
    # The deepspeed launcher passes --local_rank=N to every process; LOCAL_RANK carries the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--version", action="version", version=f"flora-train {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train from a recipe")
    run.add_argument("recipe", type=Path, help="a recipe YAML (recipes/*.yaml)")
    run.add_argument("overrides", nargs="*", default=[], help="key.sub=value overrides")
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run_dir")

    la = sub.add_parser("launch", help="submit a recipe as a job (local torchrun, Slurm, Kubernetes)")
    la.add_argument("recipe", type=Path, help="a recipe YAML (recipes/*.yaml)")
    la.add_argument("overrides", nargs="*", default=[], help="key.sub=value overrides (launch.* included)")
    from flora_train.launch import SCHEDULERS

    la.add_argument("--scheduler", choices=list(SCHEDULERS), help="launch.scheduler")
    for key, flag in LAUNCH_FLAGS.items():
        if key != "scheduler":
            la.add_argument(flag, type=int if key in LAUNCH_COUNTS else None, dest=key, help=f"launch.{key}")
    la.add_argument("--dry-run", action="store_true", help="print what would be run or submitted, start nothing")
    la.add_argument("--wait", action="store_true", help="follow a submitted job to its end and return its exit code")

    val = sub.add_parser("validate", help="check a recipe and print it resolved, without running")
    val.add_argument("recipe", type=Path, help="a recipe YAML (recipes/*.yaml)")
    val.add_argument("overrides", nargs="*", default=[], help="key.sub=value overrides")

    ev = sub.add_parser("eval", help="per-user held-out loss/accuracy of a run's latest checkpoint")
    ev.add_argument("run_dir", type=Path, help="a run directory (the recipe's run_dir)")
    ev.add_argument("--checkpoint", type=Path, default=None, help="this checkpoint folder (default: the run's newest intact one)")
    ev.add_argument("--data", type=Path, default=None, help="score another evaluation file (same columns as training)")
    ev.add_argument("--base", type=Path, default=None, help=BASE_HELP)

    ex = sub.add_parser("export", help="write per-user adapters of a run")
    ex.add_argument("run_dir", type=Path, help="a run directory (the recipe's run_dir)")
    from flora_train.export import EXPORT_FORMATS

    ex.add_argument("--format", choices=list(EXPORT_FORMATS), required=True,
                    help="; ".join(f"{name}: {kind.summary}" for name, kind in EXPORT_FORMATS.items()))
    ex.add_argument("--users", type=user_list, default=None, help="comma-separated user ids, or @FILE with one id per line (default: all)")
    ex.add_argument("--out", type=Path, required=True, help="the export folder (made if missing)")
    ex.add_argument("--checkpoint", type=Path, default=None, help="this checkpoint folder (default: the run's newest intact one)")
    ex.add_argument("--pack-size", type=int, default=4096, help="packed: users per pack file")
    ex.add_argument("--base", type=Path, default=None, help=f"merged: {BASE_HELP}")
    ex.add_argument("--base-model-id", default=None,
                    help="peft: base_model_name_or_path to write (the model id your server loads; default: the run's base)")

    from flora_train.bench.suites import SUITES, add_arguments

    be = sub.add_parser("bench", help=f"side-by-side benchmarks: {', '.join(SUITES)} or all")

    add_arguments(be)

    gen = sub.add_parser("generate", help="mixed-user batched generation: every prompt with its own user's adapter")
    gen.add_argument("source", type=Path,
                     help="a run directory, a checkpoint, or a --format flora, packed or peft export folder")
    gen.add_argument("--prompts", type=Path, required=True,
                     help="rows of user_id + prompt (or messages): JSONL, a JSON array, CSV or TSV")
    gen.add_argument("--out", type=Path, required=True, help="JSONL: user_id, prompt, completion per line")
    gen.add_argument("--users", type=user_list, default=None, help="only these users' prompts (comma-separated or @FILE)")
    gen.add_argument("--checkpoint", type=Path, default=None, help="this checkpoint folder (default: the run's newest intact one)")
    gen.add_argument("--base", type=Path, default=None, help=BASE_HELP)
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt at most (default 64)")
    gen.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    gen.add_argument("--temperature", type=float, default=1.0, help="--sample: softmax temperature (default 1.0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="--sample: nucleus mass kept (default 1.0: all)")
    gen.add_argument("--top-k", type=int, default=0, help="--sample: most likely tokens kept (default 0: all)")
    gen.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default 1: none)")
    gen.add_argument("--seed", type=int, default=None, help="--sample: seed of the draws, for repeatable samples")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    gen.add_argument("--batch-size", type=at_least_one, default=16, help="prompts (of mixed users) generated together (default 16)")
    gen.add_argument("--device", type=device_arg, default="auto", help="auto (cuda when present), cuda, cuda:N or cpu")

    us = sub.add_parser("users", help="who is in a run: steps, tokens, last held-out loss, export folders")
    us.add_argument("run_dir", type=Path, help="a run directory (the recipe's run_dir)")
    us.add_argument("--json", action="store_true", help="one JSON object per user instead of a table")
    us.add_argument("--users", type=user_list, default=None,
                    help="only these: comma-separated user ids, or @FILE with one id per line (default: all)")

    fg = sub.add_parser("forget", help="remove users from a run: checkpoints, exports, per-user files")
    fg.add_argument("run_dir", type=Path, help="a run directory (the recipe's run_dir)")
    fg.add_argument("--users", type=user_list, default=None, help="comma-separated user ids, or @FILE with one id per line")
    fg.add_argument("--retrain-shared", action="store_true",
                    help="train the shared adapter again without the forgotten users' data (it is removed otherwise); "
                         "alone (no --users): the one an earlier forget removed")
    fg.add_argument("--base", type=Path, default=None, help=f"--retrain-shared: {BASE_HELP}")

    srv = sub.add_parser("serve", help="OpenAI-compatible server; concurrent users batched into one forward")
    srv.add_argument("source", type=Path,
                     help="a run directory, a checkpoint, or a --format flora, packed or peft export folder")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=port_number, default=8000, help="0: a free port (the first line says which)")
    srv.add_argument("--checkpoint", type=Path, default=None, help="this checkpoint folder (default: the run's newest intact one)")
    srv.add_argument("--base", type=Path, default=None, help=BASE_HELP)
    srv.add_argument("--model-name", type=model_name, default="flora", help="the model id clients name (optionally '<name>:<user_id>')")
    srv.add_argument("--strict-users", action="store_true", help="404 for users never trained (default: the base model)")
    srv.add_argument("--api-key", type=api_key, default=None,
                     help="clients send 'Authorization: Bearer KEY' on /v1/ (default: $FLORA_TRAIN_API_KEY, which "
                          "keeps the key out of the process list; neither: no key asked)")
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
    srv.add_argument("--dtype", choices=BASE_DTYPES, default=None, help="the base's dtype (default: the recipe's base.dtype)")
    srv.add_argument("--device", type=device_arg, default="auto", help="auto (cuda when present), cuda, cuda:N or cpu")

    doc = sub.add_parser("doctor", help="self-check of the accelerator path: every method, bf16, ZeRO-3 offload, benches")
    doc.add_argument("--device", type=device_arg, default="auto", help="auto (cuda when present), cuda or cpu")
    doc.add_argument("--out", type=Path, default=Path("runs/doctor"), help="folder for the checks' runs and doctor.json (default runs/doctor)")
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
    conv.add_argument("--dtype", choices=BASE_DTYPES, default="float32",
                      help="the weights' dtype in the folder (default float32)")

    da = sub.add_parser("data", help="data utilities")
    da_sub = da.add_subparsers(dest="data_command", required=True)
    syn = da_sub.add_parser("synth", help="write a synthetic personalisation task as JSONL")
    syn.add_argument("--task", choices=["rules", "persona_chat"], default="rules",
                     help="rules: prompt/completion key->value rules (the quickstart); persona_chat: chat rows, each "
                     "user's greeting and sign-off, plus retain.jsonl and general_eval.jsonl")
    syn.add_argument("--users", type=at_least_one, default=1000, help="users in the task (default 1000)")
    syn.add_argument("--train-examples", type=at_least_one, default=16, help="per user (default 16)")
    syn.add_argument("--eval-examples", type=whole_number, default=4, help="per user; 0 writes no eval.jsonl rows")
    syn.add_argument("--seed", type=int, default=0, help="the same seed writes the same task (default 0)")
    syn.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and eval.jsonl (made if missing)")
    syn.add_argument("--overwrite", action="store_true", help="replace the task's files where --out already has them")
    return p


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

        for flag, dest, default in (("--pack-size", "pack_size", 4096), ("--base-model-id", "base_model_id", None),
                                    ("--base", "base", None)):
            if getattr(args, dest) != default and dest not in EXPORT_FORMATS[args.format].reads:
                readers = " or ".join(f"--format {n}" for n, e in EXPORT_FORMATS.items() if dest in e.reads)
                parser.error(f"{flag} is read only by {readers}, not --format {args.format}")
    if args.command == "forget" and args.users is None and not args.retrain_shared:
        parser.error("forget needs --users (or --retrain-shared alone: train again the shared adapter that an earlier "
                     "forget removed)")
    if args.command == "forget" and args.base is not None and not args.retrain_shared:
        parser.error("--base is read only with --retrain-shared (forgetting loads no base)")
    if args.command == "serve" and args.checkpoint is not None and args.follow is not None:
        parser.error("--checkpoint serves that checkpoint, --follow the newest one and each after it: choose one")
    if args.command == "generate" and not args.sample:  # greedy decoding would ignore them without a word
        given = [flag for flag, value, default in (("--temperature", args.temperature, 1.0), ("--top-p", args.top_p, 1.0),
                                                   ("--top-k", args.top_k, 0), ("--seed", args.seed, None))
                 if value != default]
        if given:
            parser.error(f"{', '.join(given)}: sampling settings, used only with --sample (without it decoding is greedy)")
    return args

"""`flora-train bench SUITE`: the command-line flags of every suite and the dispatch to them.

Flags left unset take each suite's own default (a 64-user training step and a 1024-wide ZeRO base
are different experiments), so `bench all` runs every suite as it runs alone.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flora_train.arg_types import at_least_one, positive_number, whole_number
from flora_train.devices import device_arg


def _numbers(text: str, least: int) -> list[int]:
    values = [v for v in text.split(",") if v]
    if not values or not all(v.isdigit() and int(v) >= least for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= {least}, got {text!r}")
    return [int(v) for v in values]


def _counts(text: str) -> list[int]:
    return _numbers(text, 1)


def _seeds(text: str) -> list[int]:
    return _numbers(text, 0)


def add_arguments(be: argparse.ArgumentParser) -> None:
    be.add_argument("suite", choices=[*SUITES, "all"], help="one suite (docs/benchmarks.md says what each measures), or all")
    be.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for the JSON results and plots")
    be.add_argument("--device", type=device_arg, default="auto", help="auto (cuda when present), cpu or cuda")
    be.add_argument("--repeats", type=at_least_one, default=None, help="layer: timed repeats per kernel (3); store: (50)")
    be.add_argument("--tokens", type=at_least_one, default=None, help="layer: tokens per example (8 on CPU, 256 on GPU); "
                    "train: (64)")
    be.add_argument("--hidden-size", type=at_least_one, default=None, help="train (512) / e2e (256) / zero (1024): width of the generated Llama")
    be.add_argument("--layers", type=at_least_one, default=None, help="train (4) / e2e (4) / zero (8): layers of the generated Llama")
    be.add_argument("--steps", type=at_least_one, default=None, help="train (5) / zero (6) / scale (16): timed steps")
    be.add_argument("--users-per-step", type=at_least_one, default=None, help="train (64, one example each) / zero (8) / scale (64)")
    be.add_argument("--widths", type=_counts, default=[1024, 4096], help="layer: comma-separated layer widths")
    be.add_argument("--ranks", type=_counts, default=[1, 2, 4, 8, 16], help="layer: comma-separated ranks")
    be.add_argument("--user-mix", type=_user_mix, default="1,8,64,all",
                    help="layer: distinct users per batch (all = one per example)")
    be.add_argument("--batch", type=at_least_one, default=None, help="layer: examples per micro-batch (64 on CPU, 128 on GPU)")
    be.add_argument("--no-peft", action="store_true", help="layer: skip PEFT's mixed-batch forward")
    be.add_argument("--users", type=at_least_one, default=1000, help="e2e: users to train")
    be.add_argument("--examples", type=at_least_one, default=8, help="e2e: training examples per user")
    be.add_argument("--sample", type=at_least_one, default=20, help="e2e: users trained by one PEFT job each (quality, warm timing)")
    be.add_argument("--process-sample", type=whole_number, default=5, help="e2e: of those, users whose job runs as its own process")
    be.add_argument("--rank", type=at_least_one, default=8, help="e2e: LoRA rank of both sides")
    be.add_argument("--small", type=at_least_one, default=1_000, help="store: users in the small table")
    be.add_argument("--large", type=at_least_one, default=1_000_000, help="store: users in the large table")
    be.add_argument("--row-size", type=at_least_one, default=256, help="store: floats per row")
    be.add_argument("--step-users", type=at_least_one, default=64, help="store: users per step")
    be.add_argument("--world", type=at_least_one, default=2, help="zero: processes per run")
    be.add_argument("--serve-users", type=at_least_one, default=64, help="serve: users (each request is one user's)")
    be.add_argument("--serve-requests", type=at_least_one, default=64, help="serve: requests in the workload")
    be.add_argument("--rate", type=positive_number, default=32.0, help="serve: mean arrivals a second (Poisson)")
    be.add_argument("--max-tokens", type=at_least_one, default=128, help="serve: max_tokens is drawn from 8 to this")
    be.add_argument("--serve-population", type=whole_number, default=100_000,
                    help="serve: users of the run served with a 256-user adapter cache (0: skip)")
    be.add_argument("--data-examples", type=at_least_one, default=1_000_000, help="data: examples in the generated dataset")
    be.add_argument("--populations", type=_counts, default=[1_000, 100_000, 1_000_000],
                    help="scale: comma-separated population sizes, one training run each")
    be.add_argument("--population", default="speeches,persona", help="personal: comma-separated speeches, persona")
    be.add_argument("--seeds", type=_seeds, default=[0, 1], help="personal: comma-separated seeds (two show the noise)")
    be.add_argument("--tiny", action="store_true", help="personal: a small base built from the data instead of SmolLM2; "
                    "lengths: a 32-wide base (how the tests run it)")
    be.add_argument("--budget", type=at_least_one, default=4096, help="lengths: train.micro_batch_tokens of the grouped and packed settings")
    be.add_argument("--length-users", type=at_least_one, default=32, help="lengths: users (16 examples each)")
    be.add_argument("--length-repeats", type=at_least_one, default=2,
                    help="lengths: runs of each setting, round-robin; each keeps its best")
    be.add_argument("--small-population", action="store_true", help="personal: 6 users a population (how the tests run it)")
    be.add_argument("--settings", default=None, help="personal: only these settings (comma-separated names; default all)")
    be.add_argument("--reuse", action="store_true", help="personal: read settings that finished with the same command")
    be.add_argument("overrides", nargs="*", help="train / zero: recipe overrides for every run (e.g. base.deepspeed...)")


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def _user_mix(text: str) -> list[int]:
    """``--user-mix``: counts of distinct users a batch, or ``all``; parsed when the flags are (a 0
    ended the suite in an index_select RuntimeError, a word in int()'s ValueError)."""
    values = [v for v in text.split(",") if v]
    if not values or not all(v == "all" or (v.isdigit() and int(v) >= 1) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 1 or 'all', got {text!r}")
    return [1 << 30 if v == "all" else int(v) for v in values]  # all: capped at the batch size by the suite


def _layer(args: argparse.Namespace) -> dict[str, Any]:
    from flora_train.bench.layer import bench_layer

    return bench_layer(args.widths, args.ranks, args.user_mix, args.batch, args.tokens,
                       _given(args.repeats, 3), args.device, args.out, peft=not args.no_peft)


def _generated_llama(args: argparse.Namespace, default: dict[str, Any]) -> dict[str, Any]:
    h = _given(args.hidden_size, default["hidden_size"])
    return dict(default, hidden_size=h, intermediate_size=h * 11 // 4, num_layers=_given(args.layers, default["num_layers"]))


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from flora_train.bench.train import DEFAULT_BASE, bench_train

    return bench_train(_given(args.users_per_step, 64), _given(args.tokens, 64), _given(args.steps, 5),
                       base=_generated_llama(args, DEFAULT_BASE), device=args.device, out=args.out, overrides=args.overrides)


def _e2e(args: argparse.Namespace) -> dict[str, Any]:
    from flora_train.bench.e2e import DEFAULT_BASE, bench_e2e

    return bench_e2e(args.users, args.examples, args.sample, args.process_sample, args.rank,
                     base=_generated_llama(args, DEFAULT_BASE), device=args.device, out=args.out)


def _store(args: argparse.Namespace) -> dict[str, Any]:
    from flora_train.bench.store import bench_store

    return bench_store(args.small, args.large, args.row_size, args.step_users, _given(args.repeats, 50), args.out)


def _zero(args: argparse.Namespace) -> dict[str, Any]:
    from flora_train.bench.zero import DEFAULT_BASE, bench_zero

    return bench_zero(args.world, _given(args.steps, 6), users_per_step=_given(args.users_per_step, 8), out=args.out,
                      base=_generated_llama(args, DEFAULT_BASE), device=args.device, overrides=args.overrides)


def _serve(args: argparse.Namespace) -> dict[str, Any]:
    from flora_train.bench.serve import bench_serve

    return bench_serve(args.serve_users, args.serve_requests, args.rate, args.max_tokens, args.device, args.out,
                       args.serve_population)


def _loss(args: argparse.Namespace) -> dict[str, Any]:
    from flora_train.bench.loss import bench_loss

    return bench_loss(args.device, args.out)


def _data(args: argparse.Namespace) -> dict[str, Any]:
    from flora_train.bench.data import bench_data

    return bench_data(args.data_examples, args.out)


def _scale(args: argparse.Namespace) -> dict[str, Any]:
    from flora_train.bench.scale import bench_scale

    return bench_scale(args.populations, _given(args.users_per_step, 64), _given(args.steps, 16), out=args.out)


def _personal(args: argparse.Namespace) -> dict[str, Any]:
    from flora_train.bench.personal import bench_personal

    return bench_personal([p for p in args.population.split(",") if p], args.seeds, args.out, tiny=args.tiny,
                          small=args.small_population, settings=args.settings.split(",") if args.settings else None,
                          reuse=args.reuse)


def _lengths(args: argparse.Namespace) -> dict[str, Any]:
    from flora_train.bench.lengths import bench_lengths

    return bench_lengths(args.out, users=args.length_users, budget=args.budget, tiny=args.tiny,
                         repeats=args.length_repeats, device=args.device)


@dataclass(frozen=True)
class Suite:
    run: Callable[[argparse.Namespace], dict[str, Any]]
    reads: tuple[str, ...]  # the flags (argparse dests) it reads besides --out


_LLAMA = ("hidden_size", "layers")
SUITES: dict[str, Suite] = {  # in the order `bench all` runs them
    "layer": Suite(_layer, ("widths", "ranks", "user_mix", "batch", "tokens", "repeats", "no_peft", "device")),
    "train": Suite(_train, (*_LLAMA, "users_per_step", "tokens", "steps", "device", "overrides")),
    "e2e": Suite(_e2e, (*_LLAMA, "users", "examples", "sample", "process_sample", "rank", "device")),
    "store": Suite(_store, ("small", "large", "row_size", "step_users", "repeats")),
    "zero": Suite(_zero, (*_LLAMA, "world", "steps", "users_per_step", "device", "overrides")),
    "loss": Suite(_loss, ("device",)),
    "serve": Suite(_serve, ("serve_users", "serve_requests", "rate", "max_tokens", "serve_population", "device")),
    "data": Suite(_data, ("data_examples",)),
    "scale": Suite(_scale, ("populations", "users_per_step", "steps")),
    "personal": Suite(_personal, ("population", "seeds", "tiny", "small_population", "settings", "reuse")),
    "lengths": Suite(_lengths, ("length_users", "budget", "tiny", "length_repeats", "device")),
}


def unread_flags(args: argparse.Namespace) -> str | None:
    """A usage error for flags given on the command line that the chosen suite (any, for ``all``)
    does not read: ``bench lengths --settings packed`` would otherwise run every setting."""
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    read = {"suite", "out"} | {flag for s in suites for flag in SUITES[s].reads}
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for dest, default in vars(parser.parse_args([args.suite])).items():
        if dest not in read and getattr(args, dest) != default:
            flag = "recipe overrides" if dest == "overrides" else "--" + dest.replace("_", "-")
            readers = [name for name, suite in SUITES.items() if dest in suite.reads]
            return f"bench {args.suite} does not read {flag} (read by bench {', '.join(readers)})"
    return None


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    suites = SUITES if args.suite == "all" else (args.suite,)
    results = {}
    for suite in suites:
        if len(suites) > 1:
            print(f"\n=== bench {suite} ===", flush=True)
        results[suite] = SUITES[suite].run(args)
    return results

"""The sharded adapter store under real torchrun jobs (gloo on CPU).

Placement-invariance: world 1, 2 and 4, owner and fetch placement, host and disk tiers (with and
without the hot-row cache) train the same adapters as one process. Communication: fetch moves
exactly the unique remote rows (each way), owner moves none. Restore: a store saved by 2 ranks
resumes on 3 ranks and on 1 to the same result.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flora_train.config import load_recipe
from flora_train.export.flora import load_flora_adapter
from flora_train.export.packed import read_packed
from flora_train.store.placement import partition_step
from flora_train.store.sharding import ShardPlan
from flora_train.run_dir.checkpoints import latest_checkpoint, read_shared_adapter
from flora_train.train.run import run_training
from flora_train.train.session import prepare_session

from tests.distributed.helpers import small_recipe, assert_same_adapters, run_many, saved_state, torchrun

pytestmark = pytest.mark.slow


def expected_fetch_bytes(base: list[str], tmp: Path, world: int) -> tuple[int, bool]:
    """Unique rows each rank needs from another rank, summed over the run, times row bytes; and
    whether some user's examples were split over ranks."""
    s = prepare_session(load_recipe(None, [*base, f"run_dir={tmp / 'plan'}"]))
    s.close()  # only its plan and planner are needed (and its run_dir's lock is released)
    plan = ShardPlan.balanced(s.user_tokens, world)
    remote, split = 0, False
    for step in s.planner.steps(2):
        work = partition_step(((u, i) for u, ex in step.groups for i in ex), world, "fetch", plan.owners, 4)
        ranks_of: dict[str, set[int]] = {}
        for r, w in enumerate(work):
            for u in w.user_ids:
                ranks_of.setdefault(u, set()).add(r)
                remote += plan.owners[u] != r
        split |= any(len(rs) > 1 for rs in ranks_of.values())
    return remote * s.layout.row_size * 4, split


def test_placements_and_tiers_match_one_process(tmp_path, tiny_llama_dir):
    base = small_recipe(tmp_path, tiny_llama_dir)
    run_training(load_recipe(None, [*base, f"run_dir={tmp_path / 'ref'}"]))
    ref = saved_state(tmp_path / "ref")
    configs = {
        2: [("owner", "host", 0), ("owner", "disk", 5), ("fetch", "host", 0), ("fetch", "disk", 7)],
        4: [("owner", "disk", 0), ("fetch", "host", 5)],
    }
    # Two of the runs export at the end, every rank writing the users its shard holds.
    exports = {(2, "owner", "host", 0): ["export.format=flora"], (4, "fetch", "host", 5): ["export.format=packed", "export.pack_size=2"]}
    for world, cases in configs.items():
        runs = [[*base, f"run_dir={tmp_path / f'w{world}-{p}-{t}-{c}'}", f"store.placement={p}", f"store.tier={t}",
                 f"store.cache_rows={c}", *exports.get((world, p, t, c), [])] for p, t, c in cases]
        run_many(world, runs, tmp_path)
        fetch_bytes, split = expected_fetch_bytes(base, tmp_path, world)
        assert split, "the test plan must split some user's examples over ranks"
        for p, t, c in cases:
            run_dir = tmp_path / f"w{world}-{p}-{t}-{c}"
            assert_same_adapters(saved_state(run_dir), ref, run_dir.name)
            counters = json.loads((run_dir / "result.json").read_text())["store"]
            if p == "owner":
                assert counters["store/bytes_sent"] == counters["store/bytes_received"] == 0
                assert counters["store/rows_remote"] == 0
            else:
                # rows out to the ranks that need them, gradients back: each way once per unique remote row
                assert counters["store/bytes_received"] == counters["store/bytes_sent"] == 2 * fetch_bytes
            if c:
                assert counters["store/cache_hits"] + counters["store/cache_misses"] > 0
            if (world, p, t, c) in exports:
                _check_export_over_ranks(run_dir, world)


def _check_export_over_ranks(run_dir: Path, world: int) -> None:
    """Each rank wrote a part, and together they are every user's saved row."""
    fmt = "packed" if (run_dir / "export" / "packed").is_dir() else "flora"
    out = run_dir / "export" / fmt
    manifest = json.loads((out / "manifest.json").read_text())
    saved = saved_state(run_dir)
    assert len(manifest["users_per_part"]) == world and all(manifest["users_per_part"]), manifest
    assert sum(manifest["users_per_part"]) == manifest["num_users"] == len(saved)
    users = sorted(saved)
    if fmt == "packed":
        packs = {name for name, _ in json.loads((out / "index.json").read_text()).values()}
        assert {n.split("-")[1] for n in packs} == {f"{r:05d}" for r in range(world)}, packs
        rows = read_packed(out, users)[1]
    else:
        index = json.loads((out / "index.json").read_text())
        rows = torch.stack([load_flora_adapter(out / index[u])[1] for u in users])
    assert torch.equal(rows, torch.stack([saved[u]["rows"] for u in users]))


def test_restore_onto_another_world_size(tmp_path, tiny_llama_dir):
    # With a shared adapter (replicated: its gradient all-reduced) and per-user selection (kept rows are
    # store columns, resharded with the rows), validated at every epoch's end.
    base = [*small_recipe(tmp_path, tiny_llama_dir), "adapter.shared.method=lora", "adapter.shared.rank=2",
            "adapter.shared.target_modules=[q_proj,o_proj]", "adapter.shared.lr=0.01", "data.validation_fraction=0.34",
            "train.select=best"]
    run_training(load_recipe(None, [*base, f"run_dir={tmp_path / 'ref'}"]))
    ref = saved_state(tmp_path / "ref")
    ref_shared = read_shared_adapter(latest_checkpoint(tmp_path / "ref"))[0]["row"]
    assert any(not torch.equal(v["select.kept"], v["rows"]) for v in ref.values()), "some user keeps an earlier row"
    first = tmp_path / "saved-at-2"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("tracking:\n  enabled: false\n")
    # Through the real CLI: torchrun -m flora_train.cli run ...
    # The shared phase's checkpoint (step 0, full), then every 2 steps deltas at 2, 4, 6 and 7 (incremental).
    torchrun(2, ["-m", "flora_train.cli", "run", str(recipe), *base, f"run_dir={first}", "train.max_steps=7",
                 "store.placement=fetch", "train.checkpoint_every_steps=2"], tmp_path)
    ckpt = latest_checkpoint(first)
    assert ckpt.name == "step-00000007" and len(list(ckpt.glob("store-*-of-00002.safetensors"))) == 2
    chain = json.loads((ckpt / "manifest.json").read_text())["chain"]
    assert chain == ["step-00000000", "step-00000002", "step-00000004", "step-00000006", "step-00000007"], chain
    at3, at1 = tmp_path / "resumed-at-3", tmp_path / "resumed-at-1"
    shutil.copytree(first, at3)
    shutil.copytree(first, at1)
    torchrun(3, ["-m", "flora_train.cli", "run", str(recipe), *base, f"run_dir={at3}", "--resume"], tmp_path)
    run_training(load_recipe(None, [*base, f"run_dir={at1}"]), resume=True)
    assert len(list(latest_checkpoint(at3).glob("store-*-of-00003.safetensors"))) == 3
    assert_same_adapters(saved_state(at3), ref, "2 -> 3 ranks, from a delta chain")
    assert_same_adapters(saved_state(at1), ref, "2 -> 1 rank, from a delta chain")
    for run in (first, at3, at1):  # one shared adapter, whatever the world size that trained it
        torch.testing.assert_close(read_shared_adapter(latest_checkpoint(run))[0]["row"], ref_shared, rtol=1e-5, atol=1e-6)


def test_ranks_that_read_other_data_or_recipe_fail_naming_the_rank(tmp_path, tiny_llama_dir):
    """Every rank checks at start that it runs rank 0's recipe and maps rank 0's data (one all-gather
    of hashes): rank 1 pointed at a copy of the data that lags by one example fails the job before
    training. Only rank 0 reads data files (the others map its cache), so the difference found is
    the recipe."""
    base = small_recipe(tmp_path, tiny_llama_dir)
    train_path = Path(next(a.split("=", 1)[1] for a in base if a.startswith("data.train_path=")))
    stale = tmp_path / "stale.jsonl"
    stale.write_text("\n".join(train_path.read_text().splitlines()[:-1]) + "\n")
    proc = run_many(2, [[*base, f"run_dir={tmp_path / 'run'}"]], tmp_path,
                    rank_overrides={1: [f"data.train_path={stale}"]}, check=False)
    assert proc.returncode != 0
    assert "rank 1 read another recipe than rank 0" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists(), "nothing was trained"


def test_a_data_error_on_rank_0_stops_every_rank_with_its_message(tmp_path, tiny_llama_dir):
    """Only rank 0 reads the data files; a bad row there must reach rank 1 (which would otherwise
    wait for the data cache forever) as the same one-line error."""
    base = small_recipe(tmp_path, tiny_llama_dir)
    train_path = Path(next(a.split("=", 1)[1] for a in base if a.startswith("data.train_path=")))
    with train_path.open("a") as f:
        f.write('{"user_id": 7, "prompt": "p", "completion": " c"}\n')
    lines = len(train_path.read_text().splitlines())
    proc = run_many(2, [[*base, f"run_dir={tmp_path / 'run'}"]], tmp_path, check=False)
    assert proc.returncode != 0
    message = f"{train_path}:{lines}: user id column 'user_id' must be a string"
    assert proc.stderr.count(message) >= 2, proc.stderr[-3000:]  # rank 0's error, and rank 1's copy of it

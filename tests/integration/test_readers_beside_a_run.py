"""A reader beside a training run (`serve` without --follow, `generate`, `export`) keeps the
checkpoint it started on: the run's pruning passes over it until the reader lets go."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from flora_train.config import load_recipe
from flora_train.inference import load_trained
from flora_train.run_dir.checkpoints import list_checkpoints, prune_checkpoints, read_manifest
from flora_train.train.run import run_training
from tests.distributed.helpers import REPO, row_windows, saved_state, small_recipe


def test_a_served_checkpoint_outlives_the_runs_pruning_until_its_reader_lets_go(tmp_path, tiny_llama_dir, capsys,
                                                                                caplog):
    """Rows are read from the checkpoint when a user is first asked for. A run that went on beside
    the reader (keep_checkpoints=1) deleted that checkpoint, and the next user not yet read was
    'No such file or directory: .../store-00000-of-00001.safetensors' (generate's and serve's)."""
    recipe = [*small_recipe(tmp_path, tiny_llama_dir), f"run_dir={tmp_path / 'run'}", "eval.at_end=false",
              "train.checkpoint_every_steps=1", "train.full_checkpoint_every=1", "train.keep_checkpoints=1"]
    result = run_training(load_recipe(None, [*recipe, "train.max_steps=1"]))
    # One step of 5 users of 12: the run said "trained 12 users for 1 steps", naming none of the 7.
    out, err = capsys.readouterr()
    assert "\ntrained 5 of 12 users for 1 step in " in out and result["users_without_steps"] == 7
    assert "flora-train: warning: 7 users took no step (train.max_steps=1 ended the run before their data came " \
           "round), so their adapters are as initialised: 'user-" in err and "and 2 more" in err, err
    reader = load_trained(tmp_path / "run", device="cpu")
    first = reader.source.checkpoint
    seen = reader.row(reader.users[0])  # one user read; the others are read when asked for
    run_training(load_recipe(None, recipe), resume=True)  # more steps, a checkpoint each, one kept
    steps = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert steps[0] == first.name and len(steps) == 2, steps  # the newest, and the one being read
    rows, _, unknown = reader.batch_rows(reader.users)
    assert rows.shape[0] == len(reader.users) and not unknown and rows[0].equal(seen)
    reader.rows.lease.close()  # the reader lets go: the next save (here, pruning by hand) deletes it
    prune_checkpoints(first.parent, keep=1, run_id=read_manifest(first)["run_id"])
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == steps[1:]

    # The run trained again from scratch (train.overwrite moves it aside), at another rate, to
    # checkpoints of the same names: a reader of the old run reads the old run's rows where it went.
    # Before, it read the new run's rows from the same paths, onto the base of the old one.
    old, old_run = saved_state(tmp_path / "run"), read_manifest(list_checkpoints(tmp_path / "run")[-1])["run_id"]
    reader = load_trained(tmp_path / "run", device="cpu")
    first_user = reader.users[0]
    assert reader.row(first_user).equal(old[first_user]["rows"])
    run_training(load_recipe(None, [*recipe, "train.overwrite=true", "store.optimizer.lr=0.5"]))
    new = saved_state(tmp_path / "run")
    assert sorted(new) == sorted(old) and not new[reader.users[1]]["rows"].equal(old[reader.users[1]]["rows"])
    with caplog.at_level("WARNING", logger="flora_train"):
        rows, _, unknown = reader.batch_rows(reader.users)
    assert not unknown
    assert all(rows[i].equal(old[u]["rows"]) for i, u in enumerate(reader.users))
    assert f"holds another run now (train.overwrite moved run {old_run} to " in caplog.text
    moved = reader.rows.label  # what serve's /health names: where the rows are read now (it named the old path)
    assert moved.startswith(str(tmp_path / "run" / "replaced")) and read_manifest(Path(moved))["run_id"] == old_run


def test_an_overwrite_during_an_export_waits_for_it(tmp_path, tiny_llama_dir, monkeypatch):
    """`train.overwrite` moved the run aside while `export` was copying its rows: the export's next
    shard was gone, or (a new run quick to write checkpoints of the same names) another run's. It
    now waits for the export, which copies the run it started on."""
    import flora_train.export.rows as export_rows
    from flora_train.export import export_adapters

    run, out = tmp_path / "run", tmp_path / "out"
    recipe = [*small_recipe(tmp_path, tiny_llama_dir), f"run_dir={run}", "eval.at_end=false"]
    run_training(load_recipe(None, recipe))
    old = saved_state(run)
    seen: dict[str, object] = {}
    real = export_rows.iter_saved_rows
    (tmp_path / "r.yaml").write_text("tracking:\n  enabled: false\n")

    def rows_then_overwrite(*args, **kwargs):
        chunks = real(*args, **kwargs)
        first = next(chunks)  # the export is copying rows when the overwrite starts
        proc = subprocess.Popen([sys.executable, "-m", "flora_train.cli", "run", str(tmp_path / "r.yaml"), *recipe,
                                 "train.overwrite=true", "store.optimizer.lr=0.5"], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        seen.update(proc=proc, said=proc.stderr.readline())
        seen["not moved"] = not (run / "replaced").exists()
        yield first
        yield from chunks

    monkeypatch.setattr(export_rows, "iter_saved_rows", rows_then_overwrite)
    try:
        export_adapters(run, "flora", None, out)
        stdout, stderr = seen["proc"].communicate(timeout=300)
    finally:
        if "proc" in seen and seen["proc"].poll() is None:
            seen["proc"].kill()
            seen["proc"].wait()
    assert seen["proc"].returncode == 0, stderr
    assert "waiting for the export(s)" in seen["said"] and "before train.overwrite moves the run aside" in seen["said"]
    assert seen["not moved"] and "train.overwrite=true: moved the previous run" in stdout
    from flora_train.export.flora import load_flora_adapter

    index = json.loads((out / "index.json").read_text())
    assert sorted(index) == sorted(old)
    for user, folder in index.items():  # the run the export started on, whole
        assert load_flora_adapter(out / folder)[1].equal(old[user]["rows"]), user

    # `forget` reaches the run moved aside too: its checkpoints, phase files and export (recorded in
    # the moved run). Before, it rewrote the new run only, and replaced/ kept the user's rows.
    from flora_train.lifecycle import forget_users

    gone = "user-000003"
    (aside,) = (run / "replaced").iterdir()
    others = [v.numpy().tobytes() for u in old if u != gone for v in old[u].values()]
    windows = row_windows(old, gone, others)
    assert len(windows) > 10 and any(w in (p.read_bytes()) for p in aside.rglob("*.safetensors") for w in windows)
    from safetensors.torch import save_file

    # The moved run's shared adapter (trained on everyone's data): removed, and said (it was removed unsaid).
    save_file({"row": torch.ones(4)}, str(aside / "shared_adapter.safetensors"), metadata={"steps": "3"})
    done = forget_users(run, [gone])
    assert done["checkpoints"] == 2 and done["moved_aside_runs"] == 1 and str(out) in done["exports_elsewhere"]
    assert done["removed_moved_aside_shared"] == [str((aside / "shared_adapter.safetensors").relative_to(run))]
    assert not (aside / "shared_adapter.safetensors").exists() and not done["removed_shared_adapter"]
    for path in [*run.rglob("*"), *out.rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            assert not any(w in data for w in windows), f"{path} still holds bytes of {gone}'s rows"
            assert path.suffix not in (".json", ".jsonl") or gone.encode() not in data, path
    moved = saved_state(aside)
    assert sorted(moved) == sorted(u for u in old if u != gone)
    assert all(moved[u][k].equal(v) for u in moved for k, v in old[u].items())
    assert sorted(json.loads((out / "index.json").read_text())) == sorted(moved)
    phases = sorted((aside / "phases").glob("phase-*.parquet"))
    assert phases and all(gone not in pq.read_table(p).column("user_id").to_pylist() for p in phases)


def test_a_forget_during_an_export_waits_for_it_and_then_reaches_its_copy(tmp_path, tiny_llama_dir, monkeypatch,
                                                                          capsys):
    """`forget` started while `export --out` was copying rows finished first and reported success;
    the export then wrote the forgotten user's folder and index entry, and recorded its folder only
    after `forget` had looked (with more users, the export ended on a KeyError instead)."""
    import flora_train.export.rows as export_rows
    from flora_train.export import export_adapters, safe_folder_name
    from flora_train.export.folders import FolderExport
    from flora_train.export.packed import PackedExport
    from flora_train.lifecycle import forget_users

    run, out = tmp_path / "run", tmp_path / "served" / "flora"
    run_training(load_recipe(None, [*small_recipe(tmp_path, tiny_llama_dir), f"run_dir={run}", "eval.at_end=false"]))
    gone = "user-000011"
    manifest = (list_checkpoints(run)[-1] / "manifest.json").read_bytes()
    seen: dict[str, object] = {}
    real = export_rows.iter_saved_rows

    def rows_then_forget(*args, **kwargs):
        chunks = real(*args, **kwargs)
        first = next(chunks)  # the export is copying rows when the forget starts
        proc = subprocess.Popen([sys.executable, "-m", "flora_train.cli", "forget", str(run), "--users", gone],
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        seen.update(proc=proc, said=proc.stderr.readline())  # its first line, or its end
        seen["untouched"] = (list_checkpoints(run)[-1] / "manifest.json").read_bytes() == manifest
        yield first
        yield from chunks

    monkeypatch.setattr(export_rows, "iter_saved_rows", rows_then_forget)
    try:
        export_adapters(run, "flora", None, out)
        proc = seen["proc"]
        stdout, stderr = proc.communicate(timeout=120)
    finally:  # the forget must not outlive a failed test
        if "proc" in seen and seen["proc"].poll() is None:
            seen["proc"].kill()
            seen["proc"].wait()
    assert proc.returncode == 0, stderr
    index = json.loads((out / "index.json").read_text())
    assert gone not in index and len(index) == 11 and all((out / folder).is_dir() for folder in index.values())
    assert not [p for p in out.iterdir() if p.name.startswith(gone)]
    assert f"also removed from the exports outside the run: {out}" in stdout, stdout
    assert "waiting for the export(s)" in seen["said"] and seen["untouched"], seen["said"] + stderr

    # Copies no index names are forgotten from too, found by name (folders) or metadata (packs):
    # - two exports into one folder at once, the second (of two users) finishing last: its index
    #   names two users and the first one's folders of the others stay beside it;
    # - an export killed halfway (no index.json yet): it is recorded before its first row is written.
    # (Before, `forget` read exports through their index alone, and recorded an export at its end.)
    both, killed, two = tmp_path / "both", tmp_path / "killed", ["user-000000", "user-000001"]
    nested = []

    def rows_beside_another_export(*args, **kwargs):
        chunks = real(*args, **kwargs)
        first = next(chunks)
        if not nested:
            nested.append(both)
            export_adapters(run, "flora", None, both)  # every user, finished meanwhile
        yield first
        yield from chunks

    monkeypatch.setattr(export_rows, "iter_saved_rows", rows_beside_another_export)
    export_adapters(run, "flora", two, both)
    monkeypatch.setattr(export_rows, "iter_saved_rows", real)
    assert sorted(json.loads((both / "index.json").read_text())) == two
    assert len([p for p in both.iterdir() if p.is_dir()]) == 11
    for cls, fmt, after in ((FolderExport, "flora", 4), (PackedExport, "packed", 5)):
        monkeypatch.setattr(cls, "place", _killed_after(cls.place, after))
        with pytest.raises(KeyboardInterrupt):
            export_adapters(run, fmt, None, killed / fmt, pack_size=2)
    monkeypatch.undo()
    folders = sorted(p.name for p in (killed / "flora").iterdir())
    packs = sorted((killed / "packed").glob("pack-*.safetensors"))
    assert len(folders) == 4 and len(packs) == 2 and not list(killed.glob("*/index.json"))
    with safe_open(str(packs[1]), framework="pt") as f:
        victim = next(u for u in json.loads(f.metadata()["users"]) if safe_folder_name(u) in folders)
    assert victim not in two
    report = forget_users(run, [victim])
    assert sorted(report["exports_elsewhere"]) == sorted(map(str, [both, killed / "flora", killed / "packed", out])), report
    assert sorted(p.name for p in (killed / "flora").iterdir()) == [f for f in folders if f != safe_folder_name(victim)]
    assert sorted((killed / "packed").glob("pack-*.safetensors")) == packs[:1]
    assert not (both / safe_folder_name(victim)).exists() and len([p for p in both.iterdir() if p.is_dir()]) == 10

    # A read-only mount of the run (a serving host's) exports all the same, and says forget will not
    # reach the copy. (Recording it failed with EROFS: at the export's end before, at its start after.)
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(run), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        capsys.readouterr()
        assert export_adapters(ro, "flora", two, tmp_path / "from-ro")["num_users"] == 2
        assert f"cannot record this export in {ro} (Read-only file system)" in capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def _killed_after(place, n: int):
    """``place`` that is interrupted (Ctrl-C) when it is called the ``n+1``-th time."""
    calls = [0]

    def placed(self, *args, **kwargs):
        if calls[0] == n:
            raise KeyboardInterrupt
        calls[0] += 1
        return place(self, *args, **kwargs)

    return placed


def test_a_follower_does_not_serve_a_run_trained_again_under_another_lora_alpha(tmp_path, tiny_llama_dir, caplog):
    """`serve --follow` beside a LoRA run trained again (train.overwrite) on the same base and layout
    but another `adapter.alpha`: the new rows mean something else under the served scaling
    (``alpha / r``). Before, the follower swapped them in and served them under the old alpha."""
    from flora_train.inference.adapter_cache import AdapterCache
    from flora_train.inference.engine import Engine
    from flora_train.inference.follow import Follower

    recipe = [*small_recipe(tmp_path, tiny_llama_dir), f"run_dir={tmp_path / 'run'}", "eval.at_end=false",
              "adapter.method=lora", "adapter.rank=2", "train.max_steps=1", "export.format=none"]
    run_training(load_recipe(None, recipe))
    trained = load_trained(tmp_path / "run", device="cpu")
    engine = Engine(trained.model, trained.slot, trained.tokenizer,
                    AdapterCache(trained.rows, trained.layout, trained.source.init_seed, 4, trained.device))
    follower = Follower(trained, engine, interval_s=3600)  # looked at by hand below, not by its thread
    try:
        run_training(load_recipe(None, [*recipe, "train.overwrite=true", "adapter.alpha=4"]))
        with caplog.at_level("WARNING", logger="flora_train"):
            assert not follower.check()
        assert "alpha: 4.0 != 16.0" in caplog.text and engine.adapters.version == 0, caplog.text
        run_training(load_recipe(None, [*recipe, "train.overwrite=true", "store.optimizer.lr=0.5"]))
        assert follower.check() and follower.served == str(list_checkpoints(tmp_path / "run")[-1])
    finally:
        follower.close()
        engine.close()


def test_torn_export_records_are_named_and_forget_reaches_what_it_can_tell(tmp_path, tiny_llama_dir, capsys):
    """What a disk fault or a hand tore beside a run's exports: a cut line of exports-elsewhere.jsonl
    (an append killed), an export's manifest.json, another's index.json, per-user scores. `users`
    and `forget` name each and go on (a cut line naming a forgotten user goes too): forget removes
    the user from every export it can tell is this run's (where the index is torn, by folder name
    and from every pack that holds it) and leaves the one whose owner cannot be told. Before,
    json's traceback, and forget stopped halfway."""
    from flora_train.export import export_adapters, safe_folder_name
    from flora_train.lifecycle import forget_users, list_users

    run = tmp_path / "run"
    run_training(load_recipe(None, [*small_recipe(tmp_path, tiny_llama_dir), f"run_dir={run}", "eval.at_end=false",
                                    "train.max_steps=1"]))
    cut, whose, packed, gone = tmp_path / "cut", tmp_path / "whose", run / "export" / "packed", "user-000003"
    export_adapters(run, "flora", None, cut)
    log = run / "exports-elsewhere.jsonl"
    log.write_text(log.read_text().rstrip("\n")[:-5])  # the append cut short: no line end
    export_adapters(run, "flora", None, whose)  # recorded on a line of its own
    export_adapters(run, "packed", None, packed, pack_size=5)
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1]) == {"out": str(whose)}, lines
    (whose / "manifest.json").write_text("{")
    (packed / "index.json").write_text("{")
    # Per-user scores whose last line was cut short: it names the user all the same.
    scores = run / "eval" / "per_user-step1.jsonl"
    scores.parent.mkdir()
    scores.write_text(json.dumps({"user_id": "user-000001", "loss": 1.5}) + '\n{"user_id": "user-000003", "loss": 1.')
    capsys.readouterr()
    listed = list_users(run)
    assert all(r["export"] == [] for r in listed) and [r["eval_loss"] for r in listed][1:4] == [1.5, None, None]
    err = capsys.readouterr().err
    assert f"{scores}: 1 line(s) cannot be read" in err
    assert f"{log}:1: not a record of an export" in err and f"{log}:2" not in err
    assert f"{whose / 'manifest.json'}: cannot be read, so whose export {whose} is cannot be told" in err
    assert f"{packed / 'index.json'}: cannot be read; the export's users are not listed" in err
    done = forget_users(run, [gone])
    assert done["export_folders"] == 1 and f"{packed / 'index.json'}: cannot be read" in capsys.readouterr().err
    held = [json.loads(safe_open(str(p), "pt").metadata()["users"]) for p in sorted(packed.glob("pack-*"))]
    assert len(held) == 2 and all(gone not in users for users in held), held
    assert (whose / safe_folder_name(gone)).is_dir() and (cut / safe_folder_name(gone)).is_dir()
    assert done["jsonl_lines"] == 1 and gone not in scores.read_text()  # (before: a cut line naming it stayed)

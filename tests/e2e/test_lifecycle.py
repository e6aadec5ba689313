"""User lifecycle through the CLI: `flora-train users` lists who is in a run; `flora-train forget`
removes users so that no file of the run holds their rows' bytes, while every other user's
checkpointed state and export stay bit-identical."""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from flora_train.export.packed import read_packed
from flora_train.export import ExportError
from flora_train.lifecycle import forget_users, list_users
from flora_train.run_dir.checkpoints import latest_checkpoint, list_checkpoints

from tests.distributed.helpers import row_windows, saved_state
from tests.e2e.helpers import REPO, SMALL, flora_train


def _all_bytes(run_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_users_lists_and_forget_removes_every_copy_and_nothing_else(tmp_path, capsys):
    run_dir = tmp_path / "run"
    flora_train("run", "recipes/quickstart.yaml", *SMALL, f"run_dir={run_dir}", "train.checkpoint_every_steps=3",
                "train.keep_checkpoints=3", "train.full_checkpoint_every=2", "export.format=flora")
    listed = flora_train("users", str(run_dir), "--json")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(rows) == 24 and all(r["steps"] > 0 and r["tokens"] > 0 and r["export"] for r in rows)
    assert all(r["eval_loss"] is not None for r in rows)
    table = flora_train("users", str(run_dir), "--users", "user-000017,user-000003").stdout.splitlines()
    assert [line.split()[0] for line in table] == ["user", "user-000017", "user-000003", "2"] and table[-1] == "2 users"
    unknown = r"unknown user\(s\) not in this run: 'usr-000003' \(did you mean 'user-000003'"
    with pytest.raises(ExportError, match=unknown):
        list_users(run_dir, ["user-000001", "usr-000003"])

    packed = tmp_path / "served" / "packed"  # an export outside the run directory: forget reaches it too
    flora_train("export", str(run_dir), "--format", "packed", "--pack-size", "5", "--out", str(packed))
    assert len(list(packed.glob("pack-*.safetensors"))) == 5  # 24 users, 5 a file
    listed = [json.loads(line) for line in flora_train("users", str(run_dir), "--json").stdout.splitlines()]
    assert all(any(place.startswith(f"{packed}/pack-") for place in r["export"]) for r in listed)
    gone, kept = ["user-000003", "user-000017"], [f"user-{i:06d}" for i in range(24) if i not in (3, 17)]
    packed_before = read_packed(packed, kept)[1]
    ckpts = list_checkpoints(run_dir)
    assert len(ckpts) >= 2 and any("chain" in json.loads((c / "manifest.json").read_text()) for c in ckpts)
    before = {c.name: saved_state(run_dir, c) for c in ckpts}
    latest = before[latest_checkpoint(run_dir).name]
    other_bytes = [latest[u][k].numpy().tobytes() for u in kept for k in latest[u]]
    windows = [w for state in before.values() for u in gone if u in state for w in row_windows(state, u, other_bytes)]
    assert len(windows) > 10
    everything = _all_bytes(run_dir)
    assert any(w in b for w in windows for b in everything.values()), "the search finds the rows before forgetting"
    export = run_dir / "export" / "flora"
    index = json.loads((export / "index.json").read_text())
    kept_exports = {u: _hashes(export / index[u]) for u in kept}

    template = tmp_path / "template"
    shutil.copytree(run_dir, template)
    done = flora_train("forget", str(run_dir), "--users", ",".join(gone))
    assert "forgot 2 user(s)" in done.stdout and f"also removed from the exports outside the run: {packed}" in done.stdout
    for path, data in _all_bytes(packed).items():
        assert not any(w in data for w in windows), f"{path} still holds bytes of a forgotten user's rows"
    assert "removed shared_adapter.safetensors" in done.stdout and not (run_dir / "shared_adapter.safetensors").exists()
    assert f"retrain it with `flora-train forget {run_dir} --retrain-shared`" in done.stdout

    for path, data in _all_bytes(run_dir).items():
        for w in windows:
            assert w not in data, f"{path} still holds bytes of a forgotten user's rows"
        if path.suffix in (".json", ".jsonl"):
            assert not any(u in data.decode("utf-8", "replace") for u in gone), path
    assert [c.name for c in list_checkpoints(run_dir)] == [c.name for c in ckpts]
    for c in list_checkpoints(run_dir):
        after = saved_state(run_dir, c)
        assert not set(gone) & set(after)
        for u in set(before[c.name]) - set(gone):
            for k, v in before[c.name][u].items():
                assert torch.equal(after[u][k], v), (c.name, u, k)
    index_after = json.loads((export / "index.json").read_text())
    assert sorted(index_after) == sorted(kept)
    assert {u: _hashes(export / index_after[u]) for u in kept} == kept_exports
    assert len(list_users(run_dir)) == 22
    phases = sorted((run_dir / "phases").glob("phase-*.parquet"))
    assert phases and all(not set(gone) & set(pq.read_table(p).column("user_id").to_pylist()) for p in phases)
    assert all(len(pq.read_table(p)) == 22 for p in phases), "the other users' data hashes stay"
    assert torch.equal(read_packed(packed, kept)[1], packed_before) and sorted(json.loads((packed / "index.json").read_text())) == sorted(kept)
    bad = flora_train("forget", str(run_dir), "--users", "nobody", check=False)
    assert bad.returncode == 2 and "no such user(s) in any checkpoint: 'nobody'" in bad.stderr
    _forget_killed_at_every_step(template, tmp_path / "killed", gone, _hashes(run_dir))
    _forget_with_a_torn_journal(template, tmp_path / "torn", gone, _hashes(run_dir), capsys)
    _forget_refuses_damaged_checkpoints(template, tmp_path / "damaged", gone)
    # The template still holds the shared adapter that the forgotten users' data trained.
    old_shared = (template / "shared_adapter.safetensors").read_bytes()
    shared = flora_train("forget", str(template), "--users", ",".join(gone), "--retrain-shared")
    assert "retrained the shared adapter for" in shared.stdout and "on 176 examples of the remaining users" in shared.stdout
    assert (template / "shared_adapter.safetensors").read_bytes() != old_shared
    # The copy's recipe names the original run_dir: nothing may be written there (it was, before).
    assert not (run_dir / "shared_adapter.safetensors").exists()
    evaluated = flora_train("eval", str(template))
    assert "one shared adapter" in evaluated.stdout  # and eval compares against it again
    # The data still holds the forgotten users (the synthetic files are written again), but no adapter
    # of theirs is left: eval scored them with the identity row, as 'per-user adapters' of 24 users.
    assert re.search(r"per-user adapters +22 ", evaluated.stdout), evaluated.stdout
    assert ("2 user(s) in the evaluation data have no adapter in the checkpoint (forgotten) and are not scored: "
            "'user-000003', 'user-000017'") in evaluated.stderr, evaluated.stderr[-2000:]
    assert not [p for p in (template / "eval").rglob("*.jsonl") for u in gone if u in p.read_text()]
    theirs = tmp_path / "theirs.jsonl"  # a file of the forgotten users' rows alone: nobody to score
    theirs.write_text("".join(line + "\n" for line in (template / "data" / "eval.jsonl").read_text().splitlines()
                              if json.loads(line)["user_id"] in gone))
    refused = flora_train("eval", str(template), "--data", str(theirs), check=False)
    assert refused.returncode == 2 and f"--data {theirs}: none of its 2 user(s) trained in this run" in refused.stderr, refused.stderr[-2000:]
    # A second forget retrains without every user forgotten so far: the data still holds the first ones'
    # rows, and it trained on them again (184 examples: all but user-000005's 8; 192 in all).
    later = flora_train("forget", str(template), "--users", "user-000005", "--retrain-shared")
    assert "on 168 examples of the remaining users" in later.stdout, later.stdout
    # The shared adapter the first forget removed is trained again by --retrain-shared alone, on the 22
    # users left. (Before, --users was required, and with it the command the hint named said "no shared
    # adapter to retrain: this run has none".)
    alone = flora_train("forget", str(run_dir), "--retrain-shared")
    assert "on 176 examples of the remaining users" in alone.stdout, alone.stdout
    assert (run_dir / "shared_adapter.safetensors").is_file() and not (run_dir / "shared_adapter.removed.json").exists()
    again = flora_train("forget", str(run_dir), "--retrain-shared")
    assert "the shared adapter holds no forgotten user's data: nothing to retrain" in again.stdout


class Killed(BaseException):
    """The process dies here: nothing after it runs (not even an except clause of the code under test)."""


# Every call by which forget changes the run directory.
MUTATIONS = [(os, "replace"), (shutil, "rmtree"), (shutil, "copytree"), (Path, "unlink"), (Path, "write_text")]


def _refused_until_completed(work: Path, gone: list[str]) -> None:
    from flora_train.inference.trained import resolve_source
    from flora_train.run_dir import RunDir
    from flora_train.run_dir.identity import RunDirInUse, claim
    from flora_train.run_dir.layout import InterruptedForget

    said = (f"{work}: a `flora-train forget` of {len(gone)} user(s) was interrupted (forget-pending.json); its users "
            f"may still be in the run's files")
    for read in (lambda: RunDir(work).require("export"), lambda: resolve_source(work)):
        with pytest.raises(InterruptedForget, match=re.escape(said)):
            read()
    with pytest.raises(RunDirInUse, match=re.escape(said)):  # training, fresh or resumed
        claim(work, fresh=False)


def _forget_with_a_torn_journal(template: Path, work: Path, gone: list[str], clean: dict[str, str], capsys) -> None:
    """A journal cut by a disk fault (past its first user) ended every command with a JSONDecodeError
    traceback, `forget` too, and the run could never be read again. Now the names still whole in it
    are completed with those given, and a server takes no user from the run meanwhile."""
    from flora_train.run_dir import RunDir
    from flora_train.run_dir.layout import InterruptedForget

    shutil.copytree(template, work)
    journal = json.dumps({"users": gone}, indent=2)
    (work / "forget-pending.json").write_text(journal[:journal.index(gone[1]) + 4])
    said = (f"{work}: a `flora-train forget` was interrupted and its journal (forget-pending.json) cannot be read "
            f"whole (torn); its users may still be in the run's files, so nothing reads or trains the run until it is "
            f"completed: `flora-train forget {work} --users ...` naming every user that forget was given (still "
            f"legible in it, and forgotten with them: {gone[0]!r})")
    with pytest.raises(InterruptedForget, match=re.escape(said)):
        RunDir(work).require("export")
    capsys.readouterr()
    manifest = work / "export" / "flora" / "manifest.json"  # and the export's manifest torn: its index says whom
    manifest.write_text(manifest.read_text()[:30])
    forget_users(work, gone[1:])
    said = capsys.readouterr().err
    assert "an interrupted forget's users are not all known; forgetting those given" in said
    assert f"{manifest}: cannot be read (the export cannot be served: export it again)" in said
    torn_manifest = "export/flora/manifest.json"  # left as it was; everything else as a clean forget leaves it
    assert {k: v for k, v in _hashes(work).items() if k != torn_manifest} == {
        k: v for k, v in clean.items() if k != torn_manifest}


def _forget_refuses_damaged_checkpoints(template: Path, work: Path, gone: list[str]) -> None:
    """A damaged checkpoint ended forget with a traceback half-way (a torn user list, state or shard),
    and one without its manifest (a prune killed mid-delete) was passed over with the users' rows left
    in it. Now forget refuses first, naming each, and changes nothing."""
    shutil.copytree(template, work)
    first, second = list_checkpoints(work)[:2]
    shard = next(first.glob("store-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    (second / "manifest.json").unlink()
    before = _hashes(work)
    with pytest.raises(ExportError) as refused:
        forget_users(work, gone)
    said = str(refused.value)
    assert said.startswith(f"{work}: 2 checkpoint(s) are damaged, and forget cannot take users out of what it cannot "
                           f"read ({shard}: does not match the manifest (corrupt or partial); {second}: incomplete "
                           f"checkpoint (no manifest.json)")
    assert said.endswith(f"delete {first}, {second} and run forget again") and _hashes(work) == before


def _forget_killed_at_every_step(template: Path, work: Path, gone: list[str], clean: dict[str, str]) -> None:
    """`forget` killed before its n-th change of the run directory, for every n, then run again,
    leaves the run directory byte for byte as one uninterrupted `forget` does. (Before the journal
    and the swap protocol a kill between the two renames of a checkpoint rewrite followed by a
    second `forget` deleted both copies of that checkpoint.)"""
    kills = journaled = 0
    while True:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(template, work)
        count = [0]
        patches = []
        for owner, name in MUTATIONS:
            real = getattr(owner, name)

            def wrapped(*args, _real=real, **kwargs):
                count[0] += 1
                if count[0] == kills + 1:
                    raise Killed()
                return _real(*args, **kwargs)

            patches.append((owner, name, real))
            setattr(owner, name, wrapped)
        try:
            forget_users(work, gone)
            finished = True
        except Killed:
            finished = False
        finally:
            for owner, name, real in patches:
                setattr(owner, name, real)
        if finished:
            break
        kills += 1
        journal = (work / "forget-pending.json").is_file()
        journaled += journal
        if journal:  # until it is completed nothing reads or trains the run (it served and exported them)
            _refused_until_completed(work, gone)
        forget_users(work, gone[:1] if journal else gone)  # the journal names the rest
        assert _hashes(work) == clean, f"killed before change {kills}, then run again: the run differs"
    assert kills > 20 and journaled >= kills - 2, f"{kills} places to kill, {journaled} after the journal"


def test_forget_retrain_shared_finds_the_base_before_it_forgets(tmp_path, tiny_llama_dir):
    """The base a run trained on moved: `forget --retrain-shared` forgot the users, removed the shared
    adapter and only then failed on `base.name_or_path=...: no such folder`; a second forget found no
    shared adapter to retrain, so nothing could. Now it is refused first, naming --base, and --base
    must be that base."""
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    run_dir = tmp_path / "run"
    flora_train("run", "recipes/quickstart.yaml", "base.tiny=null", f"base.name_or_path={base}", f"run_dir={run_dir}",
                "data.synthetic.num_users=6", "data.synthetic.train_examples_per_user=4", "train.epochs=1",
                "train.users_per_step=6", "train.micro_batch_size=12", "train.progress=false",
                "train.compare_shared_baseline=true", "tracking.enabled=false", "export.format=none")
    moved = base.rename(tmp_path / "moved")
    refused = flora_train("forget", str(run_dir), "--users", "user-000001", "--retrain-shared", check=False)
    assert refused.returncode == 2 and f"its base {base} is not there" in refused.stderr, refused.stderr[-2000:]
    assert "name where it is now with --base PATH" in refused.stderr
    assert len(list_users(run_dir)) == 6 and (run_dir / "shared_adapter.safetensors").is_file()
    other = flora_train("forget", str(run_dir), "--users", "user-000001", "--retrain-shared", "--base",
                        str(REPO / "recipes"), check=False)
    assert other.returncode == 2 and "not the base" in other.stderr, other.stderr[-2000:]
    done = flora_train("forget", str(run_dir), "--users", "user-000001", "--retrain-shared", "--base", str(moved))
    assert "retrained the shared adapter" in done.stdout and "on 20 examples" in done.stdout, done.stdout
    assert len(list_users(run_dir)) == 5

"""Export streams rows from the checkpoint's shards a chunk at a time (never the whole table), the
packed format holds the same rows as a folder per user, and `export --checkpoint` exports the one named."""

import json
import re
import shutil

import pytest
import torch

from flora_train.cli import main
from flora_train.config import RecipeError, load_recipe
from flora_train.data import SyntheticTask
from flora_train.export import export_adapters, forget_in_export, forget_unindexed, safe_folder_name
from flora_train.export.flora import load_flora_adapter
from flora_train.export.packed import read_packed
from flora_train.files import UnreadableTensors
from flora_train.inference import load_trained
from flora_train.inference.trained import InferenceError
from flora_train.store.saved import iter_saved_rows, read_saved_rows
from flora_train.run_dir.checkpoints import (
    CheckpointError,
    checkpoint_chain,
    latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from flora_train.train.run import run_training
from flora_train.train.scoring import run_eval


def test_rows_stream_in_chunks_and_packs_hold_the_folders_rows(tmp_path, tiny_llama_dir, capsys):
    train, evalp = SyntheticTask(num_users=11, train_examples_per_user=4, eval_examples_per_user=1).write(tmp_path / "data")
    run = tmp_path / "run"
    recipe = [f"base.name_or_path={tiny_llama_dir}", f"data.train_path={train}", f"data.eval_path={evalp}",
              "adapter.target_modules=[q_proj,v_proj]", "train.users_per_step=4", "train.epochs=2",
              "train.checkpoint_every_steps=2", "store.optimizer.lr=0.05", "tracking.enabled=false", "train.progress=false"]
    # A recipe's export.users naming nobody of the run fails before the first step, not after the last.
    with pytest.raises(RecipeError, match=r"export.users.*'user-00002' \(did you mean 'user-000002'\?\)"):
        run_training(load_recipe(None, [*recipe, f"run_dir={tmp_path / 'typo'}", "export.format=flora",
                                        "export.users=[user-000001,user-00002]"]))
    assert not (tmp_path / "typo" / "checkpoints").exists()
    # So does an export.out among the run's own files (the export ran after training, into them).
    with pytest.raises(RecipeError, match=r"key 'export.out': \S+/typo/data: among this run's own files"):
        run_training(load_recipe(None, [*recipe, f"run_dir={tmp_path / 'typo'}", "export.format=flora",
                                        f"export.out={tmp_path / 'typo' / 'data'}"]))
    assert not (tmp_path / "typo" / "checkpoints").exists()
    run_training(load_recipe(None, [*recipe, f"run_dir={run}"]))
    ckpt = latest_checkpoint(run)
    ids, rows = read_saved_rows(checkpoint_chain(ckpt))
    want = dict(zip(ids, rows))
    chunks = list(iter_saved_rows(checkpoint_chain(ckpt), chunk=3))
    assert max(len(u) for u, _ in chunks) <= 3 and sum(len(u) for u, _ in chunks) == 11
    for users, part in chunks:
        for u, r in zip(users, part):
            assert torch.equal(r, want[u])
    some = {"user-000002", "user-000007"}
    assert sorted(u for users, _ in iter_saved_rows(checkpoint_chain(ckpt), some, chunk=1) for u in users) == sorted(some)

    folders = export_adapters(run, "flora", None, tmp_path / "flora")
    packed = export_adapters(run, "packed", None, tmp_path / "packed", pack_size=4)
    assert folders["num_users"] == packed["num_users"] == 11
    assert len(list((tmp_path / "packed").glob("pack-*.safetensors"))) == 3
    users = sorted(want)
    layout, rows_packed = read_packed(tmp_path / "packed", users)
    index = json.loads((tmp_path / "flora" / "index.json").read_text())
    for u, r in zip(users, rows_packed):
        _, row = load_flora_adapter(tmp_path / "flora" / index[u])
        assert torch.equal(r, want[u]) and torch.equal(row, want[u])
    assert layout.row_size == rows_packed.shape[1]
    # Packs fill across the chain's shards and chunks whatever their sizes: every user, once.
    chain_packs = [len(users) for users, _ in iter_saved_rows(checkpoint_chain(ckpt))]
    assert len(chain_packs) > 1, "the test needs rows from more than one shard of a chain"
    for size in (2, 3, 5, 7):
        out = tmp_path / f"packed-{size}"
        assert export_adapters(run, "packed", None, out, pack_size=size)["num_users"] == 11
        assert torch.equal(read_packed(out, users)[1], rows_packed), size
    # A pack cut short is named when read (safetensors' traceback before), and forgetting a user it
    # held removes it, and the other user in it with a warning: no byte of the forgotten user stays.
    cut = tmp_path / "packed-2"
    where = json.loads((cut / "index.json").read_text())
    victim, pack = users[4], where[users[4]][0]
    other = next(u for u in users if where[u][0] == pack and u != victim)
    (cut / pack).write_bytes((cut / pack).read_bytes()[:100])
    with pytest.raises(UnreadableTensors, match=rf"{re.escape(str(cut / pack))}: not a readable safetensors file"):
        read_packed(cut, [victim])
    assert forget_in_export(cut, "packed", {victim}) == 1
    assert f"{other!r}): export them again from the run" in capsys.readouterr().err and not (cut / pack).exists()
    rest = [u for u in users if u not in (victim, other)]
    assert sorted(json.loads((cut / "index.json").read_text())) == rest
    assert torch.equal(read_packed(cut, rest)[1], torch.stack([want[u] for u in rest]))
    # Exporting again into the same folder replaces that export: the users it leaves out lose their
    # folders and packs (no index named them any more: `users` did not list them, `forget` left them).
    two = ["user-000002", "user-000007"]
    export_adapters(run, "flora", two, tmp_path / "flora")
    export_adapters(run, "packed", two, tmp_path / "packed", pack_size=4)
    assert sorted(p.name for p in (tmp_path / "flora").iterdir()) == sorted(
        ["index.json", "manifest.json", *map(safe_folder_name, two)])
    # (its pack takes a new name: a server reading the old index never finds another user's rows where
    # that index put its user; the same name was written over in place)
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == ["index.json", "manifest.json",
                                                                       "pack-00000.1.safetensors"]
    assert torch.equal(read_packed(tmp_path / "packed", two)[1], torch.stack([want[u] for u in two]))
    # A pack the index uses is never deleted for a user it holds that the index does not name (two
    # exports into one folder at once can leave that): the index's other users keep their rows.
    index = json.loads((tmp_path / "packed" / "index.json").read_text())
    (tmp_path / "packed" / "index.json").write_text(json.dumps({two[0]: index[two[0]]}))
    assert forget_unindexed(tmp_path / "packed", {two[1]}) == 0
    assert torch.equal(read_packed(tmp_path / "packed", two[:1])[1][0], want[two[0]])


    # `export --checkpoint` an older checkpoint: its rows, not the newest; every byte hashed first.
    older = next(p for p in list_checkpoints(run) if p != ckpt)
    old_ids, old_rows = read_saved_rows(checkpoint_chain(older))
    assert main(["export", str(run), "--format", "packed", "--checkpoint", str(older), "--out", str(tmp_path / "old")]) == 0
    assert torch.equal(read_packed(tmp_path / "old", old_ids)[1], old_rows)
    assert not torch.equal(old_rows, torch.stack([want[u] for u in old_ids])), "the older checkpoint must differ"
    shard = next(f for f in older.iterdir() if f.suffix == ".safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # the same size: only a hash finds it
    shard.write_bytes(bytes(data))
    assert main(["export", str(run), "--format", "flora", "--checkpoint", str(older), "--out", str(tmp_path / "bad")]) == 2
    assert f"{shard}: does not match the manifest" in capsys.readouterr().err



def test_an_export_never_lands_among_a_runs_files_or_in_another_export_nor_reads_another_runs(tmp_path, tiny_llama_dir,
                                                                                               capsys):
    """`export --out` into a checkpoint folder replaced the checkpoint's manifest.json with the
    export's (its hashes gone: the checkpoint no longer verifiable); into the run directory it
    scattered a folder per user among the run's files; into another run's export, or this run's
    export of another format, the two mixed under one index. Each is refused and nothing is written."""
    train, _ = SyntheticTask(num_users=4, train_examples_per_user=2, eval_examples_per_user=0).write(tmp_path / "data")
    run = tmp_path / "run"
    run_training(load_recipe(None, [f"base.name_or_path={tiny_llama_dir}", f"data.train_path={train}", f"run_dir={run}",
                                    "adapter.target_modules=[q_proj]", "train.users_per_step=4", "train.max_steps=1",
                                    "tracking.enabled=false", "train.progress=false", "eval.at_end=false"]))
    ckpt = latest_checkpoint(run)
    assert main(["export", str(run), "--format", "packed", "--out", str(tmp_path / "packed")]) == 0
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "manifest.json").write_text(json.dumps({"format": "flora", "checkpoint": "/runs/b/checkpoints/step-00000009"}))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    for out, words in [(run, "among this run's own files (checkpoints, data, exports); export into"),
                       (ckpt, "among this run's own files"), (run / "export", "among this run's own files"),
                       (tmp_path / "packed", "holds this run's --format packed export; export --format flora into another"),
                       (theirs, "holds an export of another run (/runs/b); its users and this run's would mix")]:
        assert main(["export", str(run), "--format", "flora", "--out", str(out)]) == 2, out
        assert f"flora-train: error: {out}: {words}" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    verify_checkpoint(ckpt)
    # Another run's checkpoint named with --checkpoint: exported as this run's (recorded with it, so
    # its own run's forget never reached the copy), served and scored with this run's recipe.
    other = tmp_path / "other"
    shutil.copytree(ckpt, other / "checkpoints" / ckpt.name)
    (other / "recipe.yaml").write_text((run / "recipe.yaml").read_text())
    theirs_ckpt = other / "checkpoints" / ckpt.name
    words = f"--checkpoint {theirs_ckpt}: a checkpoint of another run, {other}; name that run"
    assert main(["export", str(run), "--format", "flora", "--checkpoint", str(theirs_ckpt), "--out", str(tmp_path / "x")]) == 2
    assert f"flora-train: error: {words}" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(InferenceError, match=re.escape(words)):
        load_trained(run, theirs_ckpt, device="cpu")
    with pytest.raises(CheckpointError, match=re.escape(words)):
        run_eval(run, theirs_ckpt)

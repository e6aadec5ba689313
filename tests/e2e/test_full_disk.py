"""A full disk, a real one: a 4 MiB tmpfs mounted for the test (root, as CI runs) holds a run and
is then filled to its last byte. Every command says one line naming the file it could not write,
nothing already written is lost or cut short, and once space is freed the run goes on."""

import errno
import subprocess

import pytest

from flora_train.cli.commands import main
from flora_train.run_dir.checkpoints import latest_checkpoint
from tests.e2e.helpers import SMALL

pytestmark = pytest.mark.slow
NO_SPACE = "No space left on device"


@pytest.fixture
def disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(mount):
    """Writes until the disk refuses a byte; returns the file to delete to free the space again."""
    filler = mount / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1 << 8, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err), err
    return err[-1]


def test_a_full_disk_is_one_line_and_loses_nothing(disk, tmp_path, capsys):
    run = disk / "run"
    recipe = ["recipes/quickstart.yaml", f"run_dir={run}", *SMALL, "base.tiny.pretrain_steps=0", "tracking.enabled=false",
              "data.synthetic.num_users=8", "train.users_per_step=4"]
    assert main(["run", *recipe, "train.max_steps=2"]) == 0
    kept = latest_checkpoint(run)
    written = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and ".lock" not in p.name}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"user_id": "user-000001", "prompt": "hello"}\n')
    filler = _fill(disk)

    # Each failed on the full disk with a traceback (OSError, or SafetensorError for safetensors files).
    assert main(["data", "synth", "--users", "50", "--out", str(disk / "synth")]) == 2
    assert _error(capsys) == f"flora-train: error: {disk / 'synth' / 'train.jsonl'}: {NO_SPACE}"
    assert list((disk / "synth").iterdir()) == []  # no temporary file left behind
    assert main(["generate", str(run), "--prompts", str(prompts), "--out", str(disk / "preds.jsonl")]) == 2
    assert _error(capsys) == f"flora-train: error: {disk / 'preds.jsonl'}: {NO_SPACE}"
    assert main(["export", str(run), "--format", "packed", "--out", str(disk / "packed")]) == 2
    assert _error(capsys).startswith(f"flora-train: error: rank 0: writing the export to {disk / 'packed'} failed: "
                                     f"[Errno 28] {NO_SPACE}")
    assert main(["export", str(run), "--format", "merged", "--users", "user-000001", "--out", str(disk / "merged")]) == 2
    assert _error(capsys).startswith(f"flora-train: error: writing the export to {disk / 'merged'} failed: "
                                     f"[Errno 28] {NO_SPACE}")
    assert list((disk / "merged").iterdir()) == []  # no model folder cut short
    assert main(["forget", str(run), "--users", "user-000001"]) == 2  # failed taking the run's lock
    assert _error(capsys) == f"flora-train: error: {run / 'forget-pending.json'}: {NO_SPACE}"
    # (eval wrote its per-user files in place, opened "w": a write that failed would have left them cut)
    assert main(["eval", str(run)]) == 2
    assert _error(capsys).endswith(f": {NO_SPACE}")
    # A resume wrote the synthetic data again (refused here before anything else); its recipe, changed
    # (no train.max_steps), is refused now, and recipe.yaml, which eval and serve read, stays whole.
    assert main(["run", *recipe, "--resume"]) == 2
    assert _error(capsys) == f"flora-train: error: {run / 'recipe.yaml'}: {NO_SPACE}"
    # A new run building its tiny base there: with no room, at its config; with room for the config
    # files (tmpfs pages of 4 KiB), at its weights, which safetensors reports in its own error type
    # (a SafetensorError traceback before).
    fresh = [*recipe, f"run_dir={disk / 'fresh'}", "data.synthetic=null", f"data.train_path={run / 'data' / 'train.jsonl'}"]
    assert main(["run", *fresh]) == 2
    assert _error(capsys) == f"flora-train: error: {disk / 'fresh' / 'base_model'}: {NO_SPACE}"
    # on a base it need not build, at the tokenised data's cache (no half of it left behind)
    assert main(["run", *fresh, "base.tiny=null", f"base.name_or_path={run / 'base_model'}"]) == 2
    assert _error(capsys).startswith(f"flora-train: error: {disk / 'fresh' / 'data_cache'}/")
    assert list((disk / "fresh" / "data_cache").iterdir()) == []
    with filler.open("r+b") as f:
        f.truncate(filler.stat().st_size - 3 * 4096)
    assert main(["run", *fresh]) == 2
    assert _error(capsys) == f"flora-train: error: {disk / 'fresh' / 'base_model'}: {NO_SPACE}"
    assert sorted(p.name for p in (disk / "fresh").iterdir()) == [".lock", "data_cache"]  # no half-built base
    for path, data in written.items():
        assert path.read_bytes() == data, f"{path} changed"
    assert latest_checkpoint(run) == kept
    assert not [p for p in run.rglob(".*.tmp-*")]

    filler.unlink()  # space again: the same commands go on from where the run was
    assert main(["run", *recipe, "--resume"]) == 0
    assert main(["forget", str(run), "--users", "user-000001"]) == 0
    assert main(["users", str(run)]) == 0
    listed = capsys.readouterr().out
    assert "user-000000" in listed and "user-000001" not in listed

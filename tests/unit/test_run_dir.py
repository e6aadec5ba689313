"""The run directory's writer lock, run identity and readers' checkpoint leases, on real files and
real processes."""

import hashlib
import json
import signal
import subprocess
import sys

import pytest

from flora_train.run_dir import RunLock, RunLocked
from flora_train.run_dir.checkpoints import (
    CheckpointError,
    latest_checkpoint,
    lease_checkpoint,
    leased_latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    verify_checkpoint,
)
from flora_train.run_dir.identity import RunDirInUse, claim

HOLD = "import sys, time; from flora_train.run_dir import RunLock; RunLock(sys.argv[1], 'flora-train run x.yaml').acquire(); print('held', flush=True); time.sleep(600)"


def _holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_never_blocks(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunLocked, match=rf"in use by `flora-train run x.yaml` \(pid {proc.pid} on host .+, since 20"):
            RunLock(tmp_path).acquire()
        with pytest.raises(RunDirInUse, match="in use by"):  # how training claims it
            claim(tmp_path, fresh=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with RunLock(tmp_path, "second") as lock:  # the kernel dropped the dead process's lock
        assert lock.held and json.loads((tmp_path / ".lock").read_text())["command"] == "second"
    assert (tmp_path / ".lock").read_text() == ""  # released: it names no holder


def _fake_checkpoint(root, step, run_id, chain=None, broken=False):
    path = root / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / "data.bin").write_bytes(b"x" * 8)
    files = {"data.bin": {"bytes": 8, "sha256": hashlib.sha256(b"x" * 8 if not broken else b"y").hexdigest()}}
    manifest = {"step": step, "files": files, "run_id": run_id}
    if chain:
        manifest.update(kind="delta", parent=chain[-2], chain=chain)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_a_chain_never_crosses_runs_and_pruning_keeps_other_runs(tmp_path, capfd):
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 1, "old")
    mixed = _fake_checkpoint(root, 2, "new", chain=["step-00000001", "step-00000002"])
    with pytest.raises(CheckpointError, match="builds on step-00000001, which another run wrote"):
        verify_checkpoint(mixed, contents=False)
    for step in (3, 4, 5):
        _fake_checkpoint(root, step, "new")
    prune_checkpoints(root, keep=1, run_id="new")
    assert [p.name for p in list_checkpoints(root)] == ["step-00000001", "step-00000002", "step-00000005"]
    _fake_checkpoint(root, 6, "new", broken=True)
    assert latest_checkpoint(tmp_path) == root / "step-00000005"
    err = capfd.readouterr().err
    assert f"skipping a broken checkpoint: {root / 'step-00000006' / 'data.bin'}: does not match the manifest" in err
    assert f"using {root / 'step-00000005'}, the newest intact checkpoint" in err


def test_a_checkpoint_path_that_is_no_checkpoint_says_what_it_is(tmp_path):
    """`--checkpoint` of eval, generate and serve given a path that does not exist, or the run
    directory itself, said "incomplete checkpoint (no manifest.json)": as if a checkpoint were broken."""
    root = tmp_path / "checkpoints"
    newest = _fake_checkpoint(root, 3, "r")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'nope'}: no such checkpoint folder$"):
        verify_checkpoint(tmp_path / "nope")
    for folder in (tmp_path, root):
        with pytest.raises(CheckpointError, match=rf"^{folder}: a folder of checkpoints, not one; name one of them, e.g. {newest}$"):
            verify_checkpoint(folder)
    (root / "step-00000004").mkdir()  # a checkpoint cut before its manifest
    with pytest.raises(CheckpointError, match=r"step-00000004: incomplete checkpoint \(no manifest.json\)$"):
        verify_checkpoint(root / "step-00000004")


def test_a_fresh_run_into_a_used_run_dir_is_refused_unless_it_overwrites(tmp_path, capsys):
    _fake_checkpoint(tmp_path / "checkpoints", 1, "old")
    (tmp_path / "phases").mkdir()
    (tmp_path / "data").mkdir()
    with pytest.raises(RunDirInUse, match="already holds a run's checkpoints.*--resume.*train.overwrite=true"):
        claim(tmp_path, fresh=True)
    claim(tmp_path, fresh=False).release()  # a resume takes it
    lock = claim(tmp_path, fresh=True, overwrite=True)
    lock.release()
    (moved,) = (tmp_path / "replaced").iterdir()
    assert moved.name.startswith("old-") and (moved / "checkpoints" / "step-00000001").is_dir()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "phases").exists()
    assert (tmp_path / "data").is_dir(), "the data belongs to the user, not to the run"
    assert f"moved the previous run in {tmp_path} to {moved}" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["users"], ["eval"], ["forget", "--users", "u"], ["export", "--format", "flora", "--out", "o"]])
def test_commands_given_another_folder_than_a_run_say_what_it_is_and_write_nothing(tmp_path, capsys, command):
    """`users`, `eval`, `forget` and `export` on an export folder, a checkpoint or a typo each said
    something else ('no intact checkpoint (is it a run directory?)', 'no checkpoints', ...), and
    forget left a .lock in the export folder it was pointed at."""
    from flora_train.cli import main

    run = tmp_path / "run"
    export = tmp_path / "adapters"
    export.mkdir()
    (export / "index.json").write_text("{}")
    (export / "manifest.json").write_text(json.dumps({"format": "flora", "checkpoint": str(run / "checkpoints" / "step-00000008")}))
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000008"
    ckpt.mkdir(parents=True)
    (ckpt / "layout.json").write_text("{}")
    # An export of a run since moved names the path it was at, and says nobody is there now; an export in
    # a moved run's own export/ names that run (both named the stale path alone before).
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "index.json").write_text("{}")
    gone = tmp_path / "gone" / "checkpoints" / "step-00000008"
    (stale / "manifest.json").write_text(json.dumps({"format": "flora", "checkpoint": str(gone)}))
    inside = run / "export" / "flora"
    inside.mkdir(parents=True)
    for name in ("index.json", "manifest.json"):
        (inside / name).write_text((stale / name).read_text())
    name = command[0]
    cases = {export: f"{export}: a --format flora export, not a run directory; {name} reads the run it was exported from, {run}",
             stale: f"exported from, {tmp_path / 'gone'} (no run is there now: name the run directory where it is)",
             inside: f"{inside}: a --format flora export, not a run directory; {name} reads the run it was exported "
                     f"from, {run}",
             ckpt: f"{ckpt}: a checkpoint, not a run directory; name its run, {run}",
             tmp_path / "typo": f"{tmp_path / 'typo'}: no such folder; {name} reads a run directory",
             tmp_path: f"{tmp_path}: not a run directory (no recipe.yaml, no checkpoints/)"}
    for path, message in cases.items():
        before = sorted(tmp_path.rglob("*"))
        assert main([name, str(path), *command[1:]]) == 2
        assert message in capsys.readouterr().err
        assert sorted(tmp_path.rglob("*")) == before, "nothing is written into a folder that is not a run"


LEASE = ("import sys; from pathlib import Path; from flora_train.run_dir.checkpoints import lease_checkpoint; "
         "held = lease_checkpoint(Path(sys.argv[1])); print('leased', flush=True); sys.stdin.read()")


def test_pruning_passes_over_what_readers_lease_until_they_let_go_or_die(tmp_path):
    """`serve`, `export` and `generate` beside a training run lost their checkpoint to its pruning
    halfway (export: 'no intact checkpoint'; generate: a missing shard). A reader's lease (a shared
    flock) keeps a checkpoint and what it builds on; a reader that ends, however, keeps nothing."""
    root = tmp_path / "checkpoints"
    (tmp_path / "recipe.yaml").write_text("run_dir: x\n")
    _fake_checkpoint(root, 1, "r")
    _fake_checkpoint(root, 2, "r", chain=["step-00000001", "step-00000002"])
    _fake_checkpoint(root, 3, "r")
    found = leased_latest_checkpoint(tmp_path)  # step 3, as a reader beside the run finds it
    assert found is not None and found[0] == root / "step-00000003"
    delta = lease_checkpoint(root / "step-00000002")  # a delta, and the full checkpoint it builds on
    _fake_checkpoint(root, 4, "r")
    other = subprocess.Popen([sys.executable, "-c", LEASE, str(root / "step-00000004")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "leased"  # another process (a server) holds step 4
        for step in (5, 6):
            _fake_checkpoint(root, step, "r")
        names = lambda: [int(p.name.split("-")[1]) for p in list_checkpoints(root)]  # noqa: E731
        prune_checkpoints(root, keep=1, run_id="r")
        assert names() == [1, 2, 3, 4, 6]  # only 5 was nobody's
        delta.close()
        found[1].close()
        prune_checkpoints(root, keep=1, run_id="r")
        assert names() == [4, 6]
    finally:
        other.kill()  # SIGKILL: the kernel drops its lock (and a failed test leaves no process)
        other.wait()
    prune_checkpoints(root, keep=1, run_id="r")
    assert names() == [6] and not (root / ".readers" / "step-00000004").exists()
    with pytest.raises(CheckpointError, match=r"step-00000005: not there \(pruned by its run since"):
        lease_checkpoint(root / "step-00000005")


def test_a_reader_on_a_read_only_mount_reads_without_a_lease_and_says_so(tmp_path):
    """A server on a read-only mount of the run directory (another host's NFS export, another
    account's run) could not create its lease file and would not have started at all. It now reads
    without a lease where none can be made and says so; where a lease file is already there, it
    takes the shared lock read-only, and pruning through the writable path passes over it."""
    root = tmp_path / "run" / "checkpoints"
    for step in (1, 2):
        _fake_checkpoint(root, step, "r")
    lease_checkpoint(root / "step-00000001").close()  # leaves step 1's lease file (no lock held)
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(tmp_path / "run"), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        newest = lease_checkpoint(ro / "checkpoints" / "step-00000002")
        assert newest.unleased == ["step-00000002"] and "cannot lease step-00000002 (the run directory is not " \
            "writable here): a run training beside this reader may prune it" in newest.warning()
        held = lease_checkpoint(ro / "checkpoints" / "step-00000001")
        assert held.unleased == [] and held.warning() is None
        _fake_checkpoint(root, 3, "r")
        prune_checkpoints(root, keep=1, run_id="r")
        assert [p.name for p in list_checkpoints(root)] == ["step-00000001", "step-00000003"]
        held.close()
        newest.close()
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_exports_run_side_by_side_and_forget_waits_for_them_and_they_for_it(tmp_path):
    """The lock `export` (shared) and `forget` (exclusive) take on a run's exports."""
    import threading

    from flora_train.run_dir.readers import hold_for_export, hold_for_forget

    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    said: list[str] = []
    exports = [hold_for_export(root, said.append) for _ in range(2)]  # neither waits for the other
    assert all(e.held for e in exports) and said == []

    def take(hold, name: str, order: list[str]) -> threading.Thread:
        def run():
            with hold(root, said.append):
                order.append(name)
        thread = threading.Thread(target=run, daemon=True)  # a failed assertion leaves none waiting on a lock
        thread.start()
        return thread

    order: list[str] = []
    forget = take(hold_for_forget, "forget", order)
    forget.join(0.5)
    assert forget.is_alive() and order == [] and said == [f"waiting for the export(s) of {root.parent} under way to "
                                                          "finish: nothing is changed until then"]
    exports[0].close()
    forget.join(0.3)
    assert forget.is_alive()  # one export is still under way
    exports[1].close()
    forget.join(5)
    assert order == ["forget"]

    said.clear()
    with hold_for_forget(root, said.append):
        export = take(hold_for_export, "export", order)
        export.join(0.5)
        assert export.is_alive() and said == [f"waiting for `flora-train forget` on {root.parent} to finish"]
    export.join(5)
    assert order == ["forget", "export"]

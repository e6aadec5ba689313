"""A reader beside a training run (`serve` without --follow, `generate`, `export`) keeps the
checkpoint it started on: the run's pruning passes over it until the reader lets go."""

from flora_train.config import load_recipe
from flora_train.inference import load_trained
from flora_train.run_dir.checkpoints import list_checkpoints, prune_checkpoints, read_manifest
from flora_train.train.run import run_training
from tests.distributed.helpers import small_recipe


def test_a_served_checkpoint_outlives_the_runs_pruning_until_its_reader_lets_go(tmp_path, tiny_llama_dir):
    """Rows are read from the checkpoint when a user is first asked for. A run that went on beside
    the reader (keep_checkpoints=1) deleted that checkpoint, and the next user not yet read was
    'No such file or directory: .../store-00000-of-00001.safetensors' (generate's and serve's)."""
    recipe = [*small_recipe(tmp_path, tiny_llama_dir), f"run_dir={tmp_path / 'run'}", "eval.at_end=false",
              "train.checkpoint_every_steps=1", "train.full_checkpoint_every=1", "train.keep_checkpoints=1"]
    run_training(load_recipe(None, [*recipe, "train.max_steps=1"]))
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

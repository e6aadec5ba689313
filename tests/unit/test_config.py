"""Recipes: schema errors name file, line and key; every shipped recipe validates."""

import os
from pathlib import Path

import pytest

from flora_train.config import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[2]
MINIMAL = "run_dir: /tmp/r\nbase:\n  tiny: {}\ndata:\n  synthetic: {}\n"


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe):
    cfg = load_recipe(recipe)
    assert cfg.run_dir and cfg.adapter.rank >= 1


def test_ia3_may_export_to_peft():
    """PEFT has IA3 (export writes it); validate used to refuse every method but LoRA."""
    cfg = load_recipe("recipes/smollm2-135m-ia3.yaml", ["export.format=peft"])
    assert cfg.export.format.value == "peft"


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, overrides, pattern",
    [
        (MINIMAL + "train:\n  epoch: 3\n", [], r"r\.yaml:7: unknown key 'train.epoch' \(did you mean 'train.epochs'\?\)"),
        (MINIMAL + "trian:\n  epochs: 3\n", [], r"r\.yaml:6: unknown key 'trian' \(did you mean 'train'\?\)"),
        (MINIMAL + "train:\n  epochs: many\n", [], r"r\.yaml:7: invalid value for key 'train.epochs'"),
        (MINIMAL + "adapter:\n  method: dora\n", [], r"r\.yaml:7: invalid value for key 'adapter.method'.*flora, lora, ia3"),
        (MINIMAL, ["store.optimizer.lrr=1"], r"override 'store.optimizer.lrr=1': unknown key 'store.optimizer.lrr' \(did you mean 'store.optimizer.lr'\?\)"),
        (MINIMAL, ["train.users_per_step=0"], r"key 'train.users_per_step': must be > 0"),
        (MINIMAL, ["export.format=peft"], r"key 'export.format': PEFT has no flora adapter"),
        (MINIMAL, ["base.name_or_path=x"], r"key 'base.name_or_path': set exactly one"),
        (MINIMAL, ["nonsense"], r"override 'nonsense' must look like key.sub=value"),
        ("base:\n  tiny: {}\ndata:\n  synthetic: {}\n", [], r"missing required value for key 'run_dir'"),
        ("run_dir: x\nmodel:\n  tiny: {}\n", [], r"r\.yaml:2: unknown key 'model' \(the frozen model's section is called 'base'\)"),
        (MINIMAL, ["base.zero_stage=2"], r"key 'base.zero_stage': must be 0 or 3, got 2"),
        (MINIMAL, ["store.optimizer.name=rowwise_adagrad", "store.optimizer.state_dtype=bfloat16"],
         r"key 'store.optimizer.state_dtype': rowwise_adagrad keeps its state in float32, not 'bfloat16' "
         r"\(bfloat16 state is for adamw\)"),
        # GPUs asked for without the processes to drive them: `--gpus-per-node 8` alone trained on one GPU.
        (MINIMAL, ["launch.gpus_per_node=8"], r"key 'launch.procs_per_node': 1 process per node would leave 7 of "
         r"launch.gpus_per_node=8 GPUs idle \(each training process drives one GPU\): set launch.procs_per_node=8"),
        (MINIMAL, ["launch.gpus_per_node=2", "launch.procs_per_node=4"], r"key 'launch.procs_per_node': 4 processes "
         r"cannot each have a GPU of launch.gpus_per_node=2"),
        (MINIMAL, ["base.offload_params=cpu"], r"key 'base.offload_params': parameter offload needs base.zero_stage=3"),
        (MINIMAL, ["base.offload_params=nvme"], r"invalid value for key 'base.offload_params'.*none, cpu"),
        (MINIMAL, ["base.zero_stage=3", "base.deepspeed.zero_optimization.stage=2"],
         r"key 'base.deepspeed.zero_optimization.stage': is 2 but base.zero_stage is 3"),
        ("run_dir: x\n  bad: [indent\n", [], r"r\.yaml:2: not valid YAML"),
        # A key written twice: PyYAML kept the second silently (a second train: section dropped the first's keys).
        (MINIMAL + "train:\n  epochs: 3\neval:\n  at_end: false\ntrain:\n  seed: 1\n", [],
         r"r\.yaml:10: not valid YAML: key 'train' is written twice \(lines 6 and 10\)"),
        # A section given a value: OmegaConf's merge named key ''.
        (MINIMAL + "train:\n  sweep: [1, 2]\n", [], r"r\.yaml:7: key 'train.sweep' is a section: its keys go under it "
         r"\(key.sub: value\), got list \[1, 2\]"),
        (MINIMAL, ["train=3"], r"override 'train=3': key 'train' is a section: .*got int 3"),
        (MINIMAL, ["adapter.kernel=bmm"], r"key 'adapter.kernel': bmm does not compute flora; use auto or one of stacked, rankwise"),
        (MINIMAL, ["data.synthetic.task=persona_chat"], r"key 'data.messages_column': data.synthetic.task=persona_chat "
         "writes chat rows: set it to messages"),
        (MINIMAL, ["data.synthetic.task=poems"], r"invalid value for key 'data.synthetic.task'.*rules, persona_chat"),
        (MINIMAL, ["train.retain.path=r.jsonl", "train.retain.examples_per_user_step=0"],
         r"key 'train.retain.examples_per_user_step': must be >= 1, got 0"),
        (MINIMAL, ["train.retain.targets=teacher"], r"invalid value for key 'train.retain.targets'.*base, data"),
        (MINIMAL, ["base.tiny=null", "base.name_or_path=${package_dir:no_such_pkg_x}"],
         r"package_dir:no_such_pkg_x.*the package 'no_such_pkg_x' is not installed"),
        (MINIMAL, ["base.dtype=float16"], r"key 'base.dtype': float16 trains without loss scaling .*use bfloat16"),
        (MINIMAL, ["train.select=best"], r"key 'train.select': needs a validation split: set data.validation_fraction"),
        (MINIMAL, ["train.patience=2"], r"key 'train.patience': needs a validation split"),
        (MINIMAL, ["train.micro_batch_size=null"], r"key 'train.micro_batch_size': null needs train.micro_batch_tokens"),
        (MINIMAL, ["train.packing=true"], r"key 'train.packing': packs examples into rows of train.micro_batch_tokens"),
        (MINIMAL, ["train.micro_batch_tokens=100"], r"key 'train.micro_batch_tokens': 100 tokens cannot hold an example of "
                                                    r"data.max_length=256 tokens"),
        (MINIMAL, ["train.micro_batch_tokens=0"], r"key 'train.micro_batch_tokens': must be > 0"),
        (MINIMAL, ["train.device=gpu"], r"key 'train.device': must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        (MINIMAL, ["data.validation_fraction=1.5"], r"key 'data.validation_fraction': must be in \[0, 1\)"),
        (MINIMAL, ["data.validation_fraction=0.2", "train.sweep.lr=[0.1]"], r"key 'train.select': must be best with train.sweep.lr"),
        (MINIMAL, ["data.validation_fraction=0.2", "train.select=best", "train.sweep.lr=[0.1,0.1]"],
         r"key 'train.sweep.lr': must be distinct learning rates > 0"),
        (MINIMAL, ["adapter.shared.target_modules=[]"], r"key 'adapter.shared.target_modules': must be a non-empty list"),
        # A number or a bool where module names go: a TypeError's traceback ('int' object is not iterable).
        (MINIMAL, ["adapter.target_modules=5"], r"key 'adapter.target_modules': must be a non-empty list of module "
                                                r"names, a regex or 'all-linear', got 5"),
        (MINIMAL + "adapter:\n  target_modules: true\n", [],
         r"r\.yaml:7: key 'adapter.target_modules': must be .* got True"),
        # A scalar or a mapping where a list goes: OmegaConf's "AnyNode is not a ListConfig, list or tuple", and
        # "error for key '': Cannot merge DictConfig with ListConfig".
        (MINIMAL, ["train.sweep.lr=0.1"], r"^override 'train.sweep.lr=0.1': invalid value for key 'train.sweep.lr': "
                                          r"a list is needed here \(\[a, b\]\), got 0.1$"),
        (MINIMAL, ["export.users=alice"], r"invalid value for key 'export.users': a list is needed here \(\[a, b\]\), "
                                          r"got alice$"),
        (MINIMAL, ["data.validation_fraction=0", "data.validation_path=3"], r"key 'data.validation_path': must be a "
                                                                            r"path, a folder, a glob pattern"),
        (MINIMAL, ["train.sweep.lr={a: 1}"], r"^override 'train.sweep.lr={a: 1}': key 'train.sweep.lr' is a list, got "
                                             r"dict \{'a': 1\}$"),
        (MINIMAL, ["adapter.shared.rank=0"], r"key 'adapter.shared.rank': must be > 0"),
        (MINIMAL, ["adapter.shared.method=dora"], r"invalid value for key 'adapter.shared.method'.*flora, lora, ia3"),
        # An unknown key's hint looks in other sections when no sibling is close (it said nothing for these).
        (MINIMAL, ["store.lr=0.1"], r"unknown key 'store.lr' \(did you mean 'store.optimizer.lr' or "),
        (MINIMAL, ["train.rank=2"], r"unknown key 'train.rank' \(did you mean 'adapter.rank' or "),
        (MINIMAL, ["tier=disk"], r"unknown key 'tier' \(did you mean 'store.tier'\?\)"),
        # A blank string is refused: run_dir='' validated, and the run would have written into the current folder.
        (MINIMAL, ["run_dir=''"], r"^override 'run_dir=\'\'': key 'run_dir': is empty: give it a value"),
        (MINIMAL, ["export.out=' '"], r"key 'export.out': is empty"),
        (MINIMAL, ["data.train_path=['']", "data.synthetic=null"], r"key 'data.train_path': is empty"),
        (MINIMAL, ["launch.env={A: ''}", "data.user_column=''"], r"key 'data.user_column': is empty"),
        (MINIMAL, ["train.device="], r"override 'train.device=': invalid value for key 'train.device': null \(or nothing\) where"),
        # nan and inf pass every `<= 0` check: store.optimizer.lr=nan validated, trained nothing and said it trained.
        (MINIMAL, ["store.optimizer.lr=nan"],
         r"^override 'store.optimizer.lr=nan': key 'store.optimizer.lr': must be a finite number, got nan$"),
        (MINIMAL + "store:\n  optimizer:\n    lr: .inf\n", [],
         r"^\S*r\.yaml:8: key 'store.optimizer.lr': must be a finite"),
        (MINIMAL, ["adapter.shared.rank=2", "adapter.shared.lr=nan"],
         r"key 'adapter.shared.lr': must be a finite number"),
        (MINIMAL, ["train.sweep.lr=[0.1,nan]"], r"key 'train.sweep.lr': must be a finite number, got nan"),
        (MINIMAL, ["train.checkpoint_every_minutes=-1"],
         r"key 'train.checkpoint_every_minutes': must be >= 0, got -1.0"),
        # A cross-field error names where the value came from: the override that set it, or its line.
        (MINIMAL + "train:\n  epochs: 2\n", ["train.epochs=0"], r"^override 'train.epochs=0': key 'train.epochs': must be > 0"),
        (MINIMAL + "train:\n  epochs: 0\n", [], r"^\S*r\.yaml:7: key 'train.epochs': must be > 0, got 0"),
        (MINIMAL, ["base={name_or_path: x}"], r"^override 'base=\{name_or_path: x\}': key 'base.name_or_path': set exactly one"),
        (MINIMAL, ["adapter.shared.rank=2", "train.shared_phase=joint", "train.shared_steps=5"],
         r"key 'train.shared_steps': is the length of shared_phase=first's own phase"),
    ],
)
def test_recipe_errors_name_the_key(tmp_path, text, overrides, pattern):
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(_write(tmp_path, text), overrides)


def test_yaml_merge_keys_merge_and_the_keys_written_beside_them_win(tmp_path):
    """`<<: *defaults` failed with 'could not determine a constructor for the tag ...merge': the
    written-twice check constructed the merge key itself."""
    text = (MINIMAL.replace("tiny: {}", "tiny: &tiny {hidden_size: 48}")
            + "train: &train\n  epochs: 5\n  users_per_step: 3\neval:\n  <<: {batch_size: 7, every_steps: 2}\n"
            + "  every_steps: 4\n")
    cfg = load_recipe(_write(tmp_path, text), [])
    assert (cfg.base.tiny.hidden_size, cfg.train.epochs, cfg.eval.batch_size, cfg.eval.every_steps) == (48, 5, 7, 4)
    with pytest.raises(RecipeError, match=r"key 'every_steps' is written twice"):
        load_recipe(_write(tmp_path, text + "  every_steps: 6\n"), [])


def test_a_binary_file_or_a_folder_named_as_the_recipe_is_one_line(tmp_path):
    """A NUL byte (a binary file named by mistake) gave PyYAML's two-line message naming
    '<unicode string>' and no line; a folder was 'recipe file not found'."""
    with pytest.raises(RecipeError) as refused:
        load_recipe(_write(tmp_path, MINIMAL + "  x: \"\x00\"\n"), [])
    assert str(refused.value) == (f"{tmp_path / 'r.yaml'}:6: not valid YAML: the character '\\x00' is not allowed "
                                  "(is this a binary file?)")
    with pytest.raises(RecipeError, match=r"^\S+: a folder, not a recipe file \(name its \.yaml file\)$"):
        load_recipe(tmp_path, [])


def test_a_recipe_saved_as_utf16_is_one_error_and_one_with_a_bom_loads(tmp_path):
    """A recipe saved as UTF-16 (Notepad's "Unicode") ended in UnicodeDecodeError's traceback."""
    path = tmp_path / "r.yaml"
    path.write_bytes(MINIMAL.encode("utf-16"))
    with pytest.raises(RecipeError, match=r"r\.yaml: not UTF-8 text \(byte 0xff at offset 0\): save the recipe as UTF-8"):
        load_recipe(path)
    path.write_bytes(MINIMAL.encode("utf-8-sig"))
    assert load_recipe(path).run_dir == "/tmp/r"  # with the mark read as a character the key was "\ufeffrun_dir"


def test_overrides_apply_with_types(tmp_path):
    cfg = load_recipe(_write(tmp_path, MINIMAL), ["train.epochs=5", "adapter.method=lora", "adapter.target_modules=[q_proj]"])
    assert cfg.train.epochs == 5 and cfg.adapter.method.value == "lora" and list(cfg.adapter.target_modules) == ["q_proj"]
    assert cfg.base.tiny.hidden_size == 64  # nested defaults are filled from the schema


def test_loading_a_recipe_warns_nothing_on_the_pinned_and_the_newest_omegaconf(tmp_path):
    """`pip install -e .` resolves omegaconf 2.4, whose register_new_resolver warns on every run (2.3's
    register_resolver is the deprecated one): a recipe loads with warnings as errors on both. So
    does the recipe `eval` and `forget --retrain-shared` adjust for a finished run (2.4 deprecates
    assigning a string to an enum key: `flora-train eval` warned on it). A scalar where a list goes
    is named the same way on both (2.4 words its error otherwise)."""
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check", "-d",
                    str(tmp_path), "omegaconf==2.4.0"], check=True, capture_output=True)
    [wheel] = tmp_path.glob("omegaconf-2.4.0-*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "newest")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text((REPO / "recipes/smollm2-135m-flora-r1.yaml").read_text())
    code = ("import omegaconf, sys; from flora_train.config import load_recipe; "
            "load_recipe('recipes/smollm2-135m-flora-r1.yaml', ['adapter.shared.rank=4']); "
            "from flora_train.train.session import recipe_beside_the_run; "
            f"assert recipe_beside_the_run({str(run_dir)!r}, 'evaluating', 'eval').store.tier.value == 'host'; "
            "from flora_train.config import RecipeError\n"
            "try: load_recipe('recipes/quickstart.yaml', ['export.users=alice'])\n"
            "except RecipeError as e: assert str(e).endswith('a list is needed here ([a, b]), got alice'), e\n"
            "print(omegaconf.__version__)")
    for path, version in ((None, "2.3.0"), (tmp_path / "newest", "2.4.0")):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if path is not None:
            env["PYTHONPATH"] = str(path)
        proc = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.strip() == version, proc.stderr[-2000:]


def test_validate_fails_a_recipe_whose_targets_fit_no_layer_and_reads_only_local_files(tmp_path, capsys):
    """`validate` printed "per-user bytes: not computed" and exited 0 for adapter.target_modules that
    match no layer of the base (the run then failed on them); a hub id that is not on this machine
    ended it with exit 2 after a minute of hub retries. Now: the first is the run's one error line;
    the second is no error, the size and padding lines say what was missing, and nothing is fetched."""
    from flora_train.cli import main
    from flora_train.data import SyntheticTask

    code = main(["validate", str(REPO / "recipes/quickstart.yaml"), f"run_dir={tmp_path / 'r'}", "adapter.target_modules=[nope]"])
    err = capsys.readouterr().err
    assert code == 2 and "flora-train: error: adapter.target_modules=['nope'] matched no linear layer" in err, err
    train, _ = SyntheticTask(num_users=3, train_examples_per_user=2, eval_examples_per_user=0).write(tmp_path / "data")
    hub_id = "flora-train-tests/no-such-model"
    code = main(["validate", str(REPO / "recipes/llama-3.2-1b-flora-r1.yaml"), f"run_dir={tmp_path / 'h'}",
                 f"base.name_or_path={hub_id}", f"data.train_path={train}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    nothing_fetched = f"'{hub_id}' (not a local folder nor in the Hugging Face cache, and nothing is downloaded here)"
    assert f"# per-user bytes: not computed (cannot load the config of model {nothing_fetched}" in out, out[-1000:]
    assert f"# padding: not estimated (cannot load the tokenizer of model {nothing_fetched}" in out, out[-1000:]
    missing = main(["validate", str(REPO / "recipes/llama-3.2-1b-flora-r1.yaml"), f"base.name_or_path={hub_id}",
                    f"data.train_path={tmp_path / 'none.jsonl'}"])  # the data is checked without the tokenizer
    assert missing == 2 and "data.train_path: data file not found" in capsys.readouterr().err

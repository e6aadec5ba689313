"""The CLI's flags: a value out of range, or a --users that names nobody, is one line naming it, never a traceback
(generate --batch-size 0 was 'ValueError: range() arg 3 must not be zero', --top-k -3 transformers'
ValueError, both as tracebacks after the base had loaded; bench took any integer)."""

import json
from pathlib import Path

import pytest

from flora_train.cli import main, parse_args
from flora_train.inference import GenerationSettings


def test_batch_size_below_one_is_a_usage_line(capsys):
    with pytest.raises(SystemExit):
        parse_args(["generate", "runs/x", "--prompts", "p.jsonl", "--out", "o.jsonl", "--batch-size", "0"])
    assert "argument --batch-size: must be a whole number >= 1, got '0'" in capsys.readouterr().err


def test_version_and_a_missing_recipe(capsys):
    """No --version at all; and `flora-train run` alone said "required: recipe, overrides", though
    overrides are optional."""
    from flora_train import __version__

    with pytest.raises(SystemExit):
        parse_args(["--version"])
    assert capsys.readouterr().out.strip() == f"flora-train {__version__}"
    for command in ("run", "launch", "validate"):
        with pytest.raises(SystemExit):
            parse_args([command])
        assert capsys.readouterr().err.strip().endswith("error: the following arguments are required: recipe")
    with pytest.raises(SystemExit):  # (--retrain-shared alone trains again a shared adapter a forget removed)
        parse_args(["forget", "runs/x"])
    assert "forget needs --users (or --retrain-shared alone" in capsys.readouterr().err
    assert parse_args(["forget", "runs/x", "--retrain-shared"]).users is None


@pytest.mark.parametrize("flags,message", [
    (["--sample", "--top-k", "-3"], "top_k must be >= 0 (0: off), got -3"),
    (["--num-beams", "0"], "num_beams must be >= 1, got 0"),
    (["--sample", "--temperature", "0"], "temperature must be a finite number > 0 when sampling, got 0.0"),
    # nan passed `<= 0` and ended in transformers' traceback; inf sampled every token alike
    (["--sample", "--temperature", "nan"], "temperature must be a finite number > 0 when sampling, got nan"),
    (["--sample", "--temperature", "inf"], "temperature must be a finite number > 0 when sampling, got inf"),
    (["--max-new-tokens", "-2"], "max_new_tokens must be >= 0, got -2"),
])
def test_bad_settings_are_one_line_before_the_base_loads(tmp_path, capsys, flags, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"user_id": "u", "prompt": "hi"}) + "\n")
    # The run directory does not exist: the settings are checked before anything is loaded.
    code = main(["generate", str(tmp_path / "no-run"), "--prompts", str(prompts), "--out", str(tmp_path / "o"), *flags])
    assert code == 2 and capsys.readouterr().err.strip() == f"flora-train: error: {message}"


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "0.7"], "--temperature: sampling settings, used only with --sample"),
    (["--top-p", "0.9", "--seed", "3"], "--top-p, --seed: sampling settings, used only with --sample"),
])
def test_sampling_settings_without_sample_are_a_usage_line(capsys, flags, message):
    """`generate --temperature 0.7` decoded greedily without a word: the setting needs --sample."""
    command = ["generate", "runs/x", "--prompts", "p.jsonl", "--out", "o.jsonl"]
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*command, *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert parse_args([*command, "--sample", *flags]).sample


@pytest.mark.parametrize("fmt,flags,message", [
    ("flora", ["--pack-size", "100"], "--pack-size is read only by --format packed, not --format flora"),
    ("merged", ["--base-model-id", "org/m"], "--base-model-id is read only by --format peft or --format flora or "
                                             "--format packed, not --format merged"),
])
def test_export_options_of_another_format_are_a_usage_line(capsys, fmt, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["export", "runs/x", "--format", fmt, "--out", "o", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert parse_args(["export", "runs/x", "--format", "packed", "--out", "o", *flags]).format == "packed"


def test_base_is_taken_where_the_base_is_loaded(capsys):
    """--base (where a moved base is now) is for the commands that load the base; an export of rows
    names it with --base-model-id instead."""
    for command in (["generate", "runs/x", "--prompts", "p.jsonl", "--out", "o.jsonl"], ["serve", "runs/x"],
                    ["eval", "runs/x"], ["export", "runs/x", "--format", "merged", "--out", "o"]):
        assert str(parse_args([*command, "--base", "/models/llama"]).base) == "/models/llama"
    with pytest.raises(SystemExit):
        parse_args(["export", "runs/x", "--format", "flora", "--out", "o", "--base", "/models/llama"])
    assert "--base is read only by --format merged, not --format flora" in capsys.readouterr().err


def test_serve_follow_with_a_pinned_checkpoint_is_a_usage_line(capsys):
    """--follow swapped the newest checkpoint in at its first look, so --checkpoint was ignored after 5 s."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["serve", "runs/x", "--checkpoint", "runs/x/checkpoints/step-00000008", "--follow"])
    assert exit_info.value.code == 2 and "--checkpoint serves that checkpoint, --follow the newest" in capsys.readouterr().err
    assert parse_args(["serve", "runs/x", "--follow", "2"]).follow == 2.0


def test_settings_take_names_only():
    """A field added in the middle moved --chat into presence_penalty when the CLI passed them by position."""
    with pytest.raises(TypeError):
        GenerationSettings(8)  # type: ignore[misc]


@pytest.mark.parametrize("flags,message", [
    (["--repeats", "0"], "argument --repeats: must be a whole number >= 1, got '0'"),
    (["--steps", "-1"], "argument --steps: must be a whole number >= 1, got '-1'"),
    (["--serve-population", "-5"], "argument --serve-population: must be a whole number >= 0, got '-5'"),
    (["--rate", "0"], "argument --rate: must be a number > 0, got '0'"),
    (["--rate", "inf"], "argument --rate: must be a number > 0, got 'inf'"),
    (["--widths", "1024,0"], "argument --widths: expected comma-separated whole numbers >= 1, got '1024,0'"),
    (["--ranks", ","], "argument --ranks: expected comma-separated whole numbers >= 1, got ','"),
    (["--seeds", "0,-1"], "argument --seeds: expected comma-separated whole numbers >= 0, got '0,-1'"),
    # (an index_select RuntimeError traceback after the suite began, and int()'s ValueError)
    (["--user-mix", "8,0"], "argument --user-mix: expected comma-separated whole numbers >= 1 or 'all', got '8,0'"),
    (["--user-mix", "some"], "argument --user-mix: expected comma-separated whole numbers >= 1 or 'all', got 'some'"),
])
def test_bench_counts_out_of_range_are_a_usage_line(capsys, flags, message):
    with pytest.raises(SystemExit):
        parse_args(["bench", "layer", *flags])
    assert message in capsys.readouterr().err


def test_bench_counts_in_range_pass():
    args = parse_args(["bench", "all", "--repeats", "1", "--serve-population", "0", "--rate", "0.5", "--widths", "64,128",
                       "--seeds", "0,3"])
    assert (args.repeats, args.serve_population, args.rate, args.widths, args.seeds) == (1, 0, 0.5, [64, 128], [0, 3])
    assert args.user_mix == [1, 8, 64, 1 << 30]  # the default, parsed as given ones are: all is every example
    with pytest.raises(SystemExit, match=r"bench lengths: --budget 700 is under the longest example's 768 tokens"):
        from flora_train.bench.lengths import bench_lengths

        bench_lengths(budget=700)  # refused before the data and the base are made (a minute, then a failed run)


@pytest.mark.parametrize("argv,message", [
    (["lengths", "--settings", "packed"], "bench lengths does not read --settings (read by bench personal)"),
    (["store", "--device", "cpu"], "bench store does not read --device (read by bench layer, train, e2e, zero, loss, serve, lengths)"),
    (["loss", "--layers", "2"], "bench loss does not read --layers (read by bench train, e2e, zero)"),
    (["data", "base.dtype=bfloat16"], "bench data does not read recipe overrides (read by bench train, zero)"),
])
def test_bench_flags_the_suite_does_not_read_are_a_usage_line(capsys, argv, message):
    """`bench lengths --settings packed` ran all five settings for 20 minutes: the flag is personal's."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["bench", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    # the same flags on suites that read them, or on `all`, pass
    parse_args(["bench", "all", *argv[1:]])


@pytest.mark.parametrize("command", [["export", "runs/x", "--format", "flora", "--out", "o"], ["forget", "runs/x"],
                                     ["generate", "runs/x", "--prompts", "p.jsonl", "--out", "o.jsonl"]])
def test_users_that_name_nobody_are_a_usage_line(tmp_path, capsys, command):
    """`--users @empty-file` or `--users ,` exported every user of the run (an empty list read as "all")
    and made `forget` rewrite the run for nobody; `@missing` was an errno line naming no flag."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    for value, message in ((f"@{empty}", f"{empty} names no user (one id per line)"),
                           (",", "names no user, got ','"),
                           (f"@{tmp_path / 'missing'}", f"cannot read {tmp_path / 'missing'}: No such file or directory")):
        with pytest.raises(SystemExit):
            parse_args([*command, "--users", value])
        assert f"argument --users: {message}" in capsys.readouterr().err
    ids = tmp_path / "ids.txt"
    ids.write_text("b\n\n ü ñ \na\nb\n")
    assert parse_args([*command, "--users", f"@{ids}"]).users == ["b", " ü ñ ", "a"]  # as written, once each, in order
    assert parse_args([*command, "--users", "a,,b,a"]).users == ["a", "b"]
    # A list saved by Windows tools (Notepad, Excel's "CSV UTF-8"): a byte-order mark and CRLF line ends.
    # The mark stayed on the first id, which then named nobody.
    ids.write_bytes("\ufeffb\r\na\r\n".encode())
    assert parse_args([*command, "--users", f"@{ids}"]).users == ["b", "a"]
    ids.write_bytes("b\na\n".encode("utf-16"))  # Notepad's "Unicode": said only what the codec said
    with pytest.raises(SystemExit):
        parse_args([*command, "--users", f"@{ids}"])
    assert f"cannot read {ids}: not UTF-8 text (byte 0xff at offset 0)" in capsys.readouterr().err


def test_generate_users_with_no_prompt_is_an_error(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"user_id": "u", "prompt": "hi"}) + "\n")
    code = main(["generate", str(tmp_path / "no-run"), "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--users", "v"])
    assert code == 2 and capsys.readouterr().err.strip() == f"flora-train: error: --users: no prompt in {prompts} is of these users"
    assert not (tmp_path / "o").exists()


def test_a_prompts_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    """A prompts file saved as UTF-16 ended generate in UnicodeDecodeError's traceback."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes((json.dumps({"user_id": "u", "prompt": "hi"}) + "\n").encode("utf-16"))
    code = main(["generate", str(tmp_path / "no-run"), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")])
    assert code == 2 and capsys.readouterr().err.strip() == f"flora-train: error: {prompts}: not UTF-8 text (byte 0xff at offset 0)"


def test_a_messages_row_without_chat_names_its_line(tmp_path, capsys):
    """A row of chat messages under a generate without --chat failed after the model loaded, with 'a
    prompt must be a string (or messages, with chat)': no file, line or user. Now the line, before
    anything loads (the run named here does not exist)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"user_id": "u", "prompt": "hi"}) + "\n"
                       + json.dumps({"user_id": "v", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    code = main(["generate", str(tmp_path / "no-run"), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")])
    assert code == 2 and capsys.readouterr().err.strip() == (
        f"flora-train: error: {prompts}:2: user 'v': a 'messages' row is a conversation: pass --chat to render it "
        "through the model's chat template")


def test_prompt_turns_of_content_parts_read_as_serve_reads_them(tmp_path):
    """OpenAI's content parts in a prompts row reached the chat template as a list (which a template
    that prints the content renders as its Python repr); text parts are now joined as `serve` joins
    them, and another kind names its line."""
    from flora_train.inference.prompts import read_prompts
    from flora_train.inference.trained import InferenceError

    prompts = tmp_path / "p.jsonl"
    turn = {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}
    prompts.write_text(json.dumps({"user_id": "u", "messages": [turn]}) + "\n")
    assert read_prompts(prompts, chat=True) == (["u"], [[{"role": "user", "content": "hi\nthere"}]])
    turn["content"].append({"type": "input_audio"})
    prompts.write_text(json.dumps({"user_id": "u", "prompt": "hi"}) + "\n" + json.dumps({"user_id": "u", "messages": [turn]}))
    with pytest.raises(InferenceError, match=f"^{prompts}:2: user 'u': turn 0: content\\[2\\] is of type 'input_audio': "
                                             "this model reads text only"):
        read_prompts(prompts, chat=True)
    # Half a UTF-16 pair, as JSON escapes it: the tokenizer's TypeError traceback after the model loaded.
    turn["content"] = [{"type": "text", "text": "hi\ud800"}]
    for line, said in ((json.dumps({"user_id": "u", "messages": [turn]}), "user 'u': the prompt holds a lone UTF-16 "
                        "surrogate '\\\\ud800' at character 2"),
                       (json.dumps({"user_id": "u\udc00", "prompt": "hi"}), "'user_id' holds a lone UTF-16 surrogate")):
        prompts.write_text(line + "\n")
        with pytest.raises(InferenceError, match=f"^{prompts}:1: {said}"):
            read_prompts(prompts, chat=True)


def test_prompts_are_read_in_the_row_formats_training_data_takes(tmp_path):
    """`generate --prompts` read JSONL only (its own reader); a JSON array, CSV, TSV or a gzipped file,
    which training data takes, was 'not valid JSON' at line 1. A bad row still names its line, with
    no data.* key to set (none applies to generate)."""
    import gzip

    from flora_train.inference.prompts import read_prompts
    from flora_train.inference.trained import InferenceError

    want = (["u", "v"], ["hi, there", "bye"])
    (tmp_path / "p.csv").write_text('user_id,prompt\nu,"hi, there"\nv,bye\n')
    (tmp_path / "p.tsv").write_text("user_id\tprompt\nu\thi, there\nv\tbye\n")
    (tmp_path / "p.json").write_text(json.dumps([{"user_id": u, "prompt": p} for u, p in zip(*want)], indent=1))
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"user_id": u, "prompt": p}) + "\n" for u, p in zip(*want)))
    (tmp_path / "p.txt").write_text("".join(json.dumps({"user_id": u, "prompt": p}) + "\n" for u, p in zip(*want)))
    for name in ("p.csv", "p.tsv", "p.json", "p.jsonl.gz", "p.txt"):
        assert read_prompts(tmp_path / name) == want, name
    (tmp_path / "bad.jsonl").write_text(json.dumps({"user_id": "u", "prompt": "hi"}) + "\n{broken\n")
    with pytest.raises(InferenceError, match=rf"^{tmp_path / 'bad.jsonl'}:2: malformed JSON \(Expecting property name "
                                             r"enclosed in double quotes, column 2\)$"):
        read_prompts(tmp_path / "bad.jsonl")


def test_an_out_path_that_cannot_be_written_is_one_line(tmp_path, capsys):
    """generate --out naming a folder ended with IsADirectoryError's traceback after every prompt was
    generated; an --out under a file (data synth, export, bench) with FileExistsError's. Now one
    line naming the path, and generate's before anything loads (the run named here does not exist)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"user_id": "u", "prompt": "hi"}) + "\n")
    code = main(["generate", str(tmp_path / "no-run"), "--prompts", str(prompts), "--out", str(tmp_path)])
    assert code == 2 and capsys.readouterr().err.strip() == (
        f"flora-train: error: {tmp_path}: is a directory, name a file in it (e.g. preds.jsonl)")
    code = main(["generate", str(tmp_path / "no-run"), "--prompts", str(prompts), "--out", str(prompts / "preds.jsonl")])
    assert code == 2 and capsys.readouterr().err.strip() == f"flora-train: error: {prompts}: a file is there where a folder is needed"
    # (a device was "File exists", and a path under a file "Not a directory": neither named what is in the way)
    for out, in_the_way in ((prompts, prompts), (Path("/dev/null"), "/dev/null"), (prompts / "a" / "b", prompts)):
        code = main(["data", "synth", "--users", "2", "--out", str(out)])
        said = capsys.readouterr().err.strip()
        assert code == 2 and said == f"flora-train: error: {in_the_way}: a file is there where a folder is needed"
    # --out naming the prompts file wrote the completions over it (losing every other field of its rows).
    (tmp_path / "link.jsonl").symlink_to(prompts)
    for out in (prompts, tmp_path / "link.jsonl"):
        code = main(["generate", str(tmp_path / "no-run"), "--prompts", str(prompts), "--out", str(out)])
        assert code == 2 and capsys.readouterr().err.strip() == (
            f"flora-train: error: --out {out} is the --prompts file: name another file")
    # A folder it may not write to was found only when writing, after every prompt was generated.
    code = main(["generate", str(tmp_path / "no-run"), "--prompts", str(prompts), "--out", "/proc/self/preds.jsonl"])
    assert code == 2 and capsys.readouterr().err.strip() == (
        "flora-train: error: --out /proc/self/preds.jsonl: its folder is not writable")


def test_each_bench_suite_declares_exactly_the_flags_its_code_reads():
    """The refusal above trusts ``Suite.reads``: a suite that read a flag it does not declare would
    have the flag refused, one that declared a flag it ignores would take it silently."""
    import ast
    import inspect

    from flora_train.bench import suites

    helpers = {"_generated_llama": {"hidden_size", "layers"}}
    for name, suite in suites.SUITES.items():
        tree = ast.parse(inspect.getsource(suite.run))
        used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                and n.value.id == "args"}
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        used |= {flag for helper, flags in helpers.items() if helper in called for flag in flags}
        assert used - {"out"} == set(suite.reads), name


@pytest.mark.parametrize("flags,message", [
    (["--scheduler", "local", "--partition", "gpu"], "--partition is read by --scheduler slurm, not --scheduler local"),
    (["--scheduler", "slurm", "--image", "me/flora:1"], "--image is read by --scheduler k8s, not --scheduler slurm"),
    (["--scheduler", "k8s", "--wait"], "--wait is read by --scheduler local or --scheduler slurm, not --scheduler k8s"),
    (["launch.scheduler=k8s", "--time", "01:00:00"], "--time is read by --scheduler slurm, not --scheduler k8s"),
])
def test_launch_flags_of_another_scheduler_are_one_line(tmp_path, capsys, flags, message):
    """`launch --scheduler k8s --wait` returned at once, and --partition / --image / --time on a
    scheduler that never reads them were dropped without a word."""
    from pathlib import Path

    recipe = Path(__file__).parents[2] / "recipes" / "quickstart.yaml"
    assert main(["launch", str(recipe), f"run_dir={tmp_path / 'r'}", *flags, "--dry-run"]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_every_command_of_the_parser_runs_something():
    """The dispatch was an if-chain in which a command the parser gained without a branch exited 0
    having done nothing; it is now the COMMANDS registry, which must cover the parser's commands."""
    import argparse

    from flora_train.cli import build_parser
    from flora_train.cli.commands import COMMANDS

    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(COMMANDS) == set(subs.choices)


def test_a_dtype_the_base_cannot_take_is_a_usage_line(capsys):
    """`serve --dtype float8` took any text and ended in a KeyError traceback once the base loaded."""
    from flora_train.base.loading import ModelLoadError, load_frozen_model

    with pytest.raises(SystemExit):
        parse_args(["serve", "runs/x", "--dtype", "float8"])
    err = capsys.readouterr().err  # (Python 3.12 stopped quoting the choices)
    assert "argument --dtype: invalid choice: 'float8' (choose from " in err and "bfloat16" in err
    with pytest.raises(ModelLoadError, match="dtype must be one of float32, bfloat16, float16, got 'float8'"):
        load_frozen_model("unused", dtype="float8")


@pytest.mark.parametrize("name", ["", "a:b"])
def test_a_model_name_clients_could_never_match_is_a_usage_line(capsys, name):
    """`serve --model-name a:b` started, then answered every request 404: a client's 'a:b:<user>' and
    'a:b' both split at the first ':' into the model 'a'."""
    with pytest.raises(SystemExit):
        parse_args(["serve", "runs/x", "--model-name", name])
    assert "argument --model-name: must be a non-empty name without ':'" in capsys.readouterr().err


def test_a_launch_flags_error_names_the_flag_as_typed(capsys):
    """`launch --nodes 0` said "override 'launch.nodes=0': ...", an override the user never wrote."""
    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml")
    for argv, words in [(["--nodes", "0"], "--nodes 0: key 'launch.nodes': must be > 0, got 0"),
                        (["--scheduler", "slurm", "--time", "3h"], "--time 3h: key 'launch.time_limit': must look like"),
                        (["launch.nodes=0"], "override 'launch.nodes=0': key 'launch.nodes': must be > 0")]:
        assert main(["launch", recipe, *argv, "--dry-run"]) == 2
        assert capsys.readouterr().err.strip().startswith(f"flora-train: error: {words}"), argv

"""`flora-train generate`'s flags: a value out of range is one line naming it, never a traceback
(--batch-size 0 was 'ValueError: range() arg 3 must not be zero', --top-k -3 transformers'
ValueError, both as tracebacks after the base had loaded)."""

import json

import pytest

from flora_train.cli import main, parse_args
from flora_train.inference import GenerationSettings


def test_batch_size_below_one_is_a_usage_line(capsys):
    with pytest.raises(SystemExit):
        parse_args(["generate", "runs/x", "--prompts", "p.jsonl", "--out", "o.jsonl", "--batch-size", "0"])
    assert "argument --batch-size: must be a whole number >= 1, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--sample", "--top-k", "-3"], "top_k must be >= 0 (0: off), got -3"),
    (["--num-beams", "0"], "num_beams must be >= 1, got 0"),
    (["--sample", "--temperature", "0"], "temperature must be > 0 when sampling, got 0.0"),
    (["--max-new-tokens", "-2"], "max_new_tokens must be >= 0, got -2"),
])
def test_bad_settings_are_one_line_before_the_base_loads(tmp_path, capsys, flags, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"user_id": "u", "prompt": "hi"}) + "\n")
    # The run directory does not exist: the settings are checked before anything is loaded.
    code = main(["generate", str(tmp_path / "no-run"), "--prompts", str(prompts), "--out", str(tmp_path / "o"), *flags])
    assert code == 2 and capsys.readouterr().err.strip() == f"flora-train: error: {message}"


def test_settings_take_names_only():
    """A field added in the middle moved --chat into presence_penalty when the CLI passed them by position."""
    with pytest.raises(TypeError):
        GenerationSettings(8)  # type: ignore[misc]

"""files.py: a file replaced whole or not at all, and a full disk's error naming the file."""

import errno
import os

import pytest

from flora_train.files import naming, replace_text, replaced, save_model_weights, write_lines


def test_an_error_without_a_file_name_is_given_one(tmp_path):
    """A write on a full disk often fails at ``close``, an OSError naming no file: the CLI's line
    said 'writing: No space left on device'. (safetensors' own error type on a real full disk is
    tests/e2e/test_full_disk.py's: it writes through a temporary file, so /dev/full cannot show it.)"""
    with pytest.raises(OSError) as caught, naming(tmp_path / "named"):
        with open("/dev/full", "w") as f:
            f.write("x")
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(tmp_path / "named"))


def test_a_failed_replace_leaves_the_old_file_and_nothing_beside_it(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    with pytest.raises(OSError) as caught, replaced(path) as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert caught.value.filename == str(path) and path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    with pytest.raises(KeyboardInterrupt), replaced(path) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert path.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_the_same_bytes_are_not_written_again(tmp_path):
    path = tmp_path / "recipe.yaml"
    replace_text(path, "a: 1\n")
    os.utime(path, (0, 0))
    replace_text(path, "a: 1\n")
    assert path.stat().st_mtime == 0
    replace_text(path, "a: 2\n")
    assert path.read_text() == "a: 2\n" and path.stat().st_mtime > 0
    lines = tmp_path / "train.jsonl"
    assert write_lines(lines, lambda: (f"{i}\n" for i in range(3)))
    assert not write_lines(lines, lambda: (f"{i}\n" for i in range(3)))
    assert write_lines(lines, lambda: (f"{i}\n" for i in range(2)))  # a prefix of the file is not the file
    assert lines.read_text() == "0\n1\n"


def test_a_model_with_tied_weights_is_written_as_the_same_bytes_every_time(tmp_path):
    """safetensors' save_model notes each dropped tied name in the header's metadata, a map it writes
    in a random order: a GPT-2 tiny base built again (a run moved aside by train.overwrite, read by
    generate) got another fingerprint half of the time, and was refused as a changed base. Twelve
    saves here gave two different files before."""
    import hashlib

    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    digests = set()
    for i in range(12):
        save_model_weights(model, tmp_path / f"{i}.safetensors", metadata={"format": "pt"})
        digests.add(hashlib.sha256((tmp_path / f"{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    model.config.save_pretrained(tmp_path / "folder")
    (tmp_path / "0.safetensors").rename(tmp_path / "folder" / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "folder")
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # tied again
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

"""files.py: a file replaced whole or not at all, and a full disk's error naming the file."""

import errno
import os

import pytest

from flora_train.files import naming, replace_text, replaced, write_lines


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

"""Base-model sources fail at once with the key named, never after hub retries or as ImportError."""

import importlib.util

import pytest

from flora_train.base.loading import ModelLoadError, check_source, looks_local


def test_missing_gguf_package_is_named(monkeypatch, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"base.gguf_file needs the gguf package: pip install 'flora_train\[gguf\]'"):
        check_source(str(tmp_path), "m.gguf")


def test_paths_and_hub_ids():
    assert looks_local("/models/x") and looks_local("./x") and looks_local("~/x") and looks_local("a/b/c")
    assert not looks_local("HuggingFaceTB/SmolLM2-135M") and not looks_local("gpt2")
    with pytest.raises(ModelLoadError, match="no such folder"):
        check_source("/no/such/folder", None)
    check_source("HuggingFaceTB/SmolLM2-135M", None)  # a hub id is left to from_pretrained

"""Base-model sources fail at once with the key named, never after hub retries or as ImportError."""

import importlib.util

import pytest
import torch

from flora_train.base.loading import ModelLoadError, check_source, looks_local, resolve_device


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


def test_an_explicit_gpu_is_refused_when_the_node_runs_several_processes():
    """``train.device: cuda:0`` under torchrun put every rank on GPU 0 (NCCL then fails on the
    duplicate GPU). It is refused on any machine before CUDA is looked at; a lone process may name one."""
    from flora_train.launch_env import read_launch_env

    env = {"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1",
           "TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2"}
    launch = read_launch_env(env)
    assert launch.local_world_size == 2
    for local_rank, local_world in ((launch.local_rank, launch.local_world_size), (0, 2), (1, 1)):
        with pytest.raises(ModelLoadError, match=r"train.device='cuda:0' would put all 2 processes of this node on GPU 0; "
                                                 r"set train.device=cuda"):
            resolve_device("cuda:0", local_rank, local_world)
    assert read_launch_env({**env, "LOCAL_WORLD_SIZE": "", "SLURM_NTASKS_PER_NODE": "8(x2)"}).local_world_size == 8
    assert resolve_device("cpu", 1, 2) == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="is not a device"):
        resolve_device("gpu0")


def test_a_device_this_machine_lacks_is_refused_before_loading(monkeypatch):
    """``train.device=mps`` or ``--device mps`` without MPS ended in torch's RuntimeError traceback
    from the model's ``.to()``; ``cuda:3`` on a one-GPU machine passed the CUDA check, which asked
    only whether CUDA was there. The machine is pinned (no MPS, one GPU) so the check holds anywhere."""
    import argparse

    from flora_train.devices import device_arg

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name, why in (("mps", "mps: this machine has no MPS device"), ("cuda:3", "cuda:3: this machine has 1 CUDA device$"),
                      ("cuda:1", "cuda:1: this machine has 1 CUDA device$")):
        with pytest.raises(ModelLoadError, match=f"^key 'train.device': {why}"):
            resolve_device(name)
        with pytest.raises(argparse.ArgumentTypeError, match=f"^{why}"):
            device_arg(name)
    assert device_arg("cuda:0") == "cuda:0" and device_arg("cuda") == "cuda" and device_arg("cpu") == "cpu"
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_cut_weights_file_is_one_error_naming_the_model(tmp_path, tiny_llama_dir):
    """A safetensors file cut short (a copy interrupted) ended in SafetensorError's traceback, and a
    GGUF file cut after its magic in struct.error's; both are now the one load error naming the model."""
    import shutil

    from flora_train.base.loading import load_config, load_frozen_model

    folder = shutil.copytree(tiny_llama_dir, tmp_path / "cut")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match=rf"^cannot load model '{folder}': .*header"):
        load_frozen_model(str(folder))
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(ModelLoadError, match=rf"^cannot load the config of model '{tmp_path}': .*buffer"):
        load_config(str(tmp_path), "cut.gguf")


def test_convert_leaves_no_half_written_folder(tmp_path, tiny_llama_dir, monkeypatch):
    """A full disk during `base convert` ended in SafetensorError's traceback and left a folder holding
    config.json alone, which the next try refused as 'exists and is not empty'. The folder is now
    written beside --out and renamed into place once checked. (The source is the tiny model loaded
    as convert loads a GGUF file; the disk fills on the first weights file written.)"""
    import errno

    import transformers

    from flora_train.base import convert
    from flora_train.base.loading import load_frozen_model, load_tokenizer

    monkeypatch.setattr(convert, "load_frozen_model", lambda folder, dtype, gguf=None: load_frozen_model(folder, dtype))
    monkeypatch.setattr(convert, "load_tokenizer", lambda folder, gguf=None: load_tokenizer(folder))
    save = transformers.PreTrainedModel.save_pretrained

    def full_disk(self, directory, **kwargs):
        self.config.save_pretrained(directory)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk)
    out = tmp_path / "converted"
    with pytest.raises(ModelLoadError, match=f"^--out {out}: writing the converted model failed .*No space left on device"
                                             r".*; nothing was left there"):
        convert.convert_gguf(str(tiny_llama_dir), "model.gguf", out)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save)
    assert convert.convert_gguf(str(tiny_llama_dir), "model.gguf", out) == out  # the next try is not refused
    assert (out / "model.safetensors").is_file() and list(tmp_path.iterdir()) == [out]

"""Export folder names: any user id, hostile or not, becomes one safe path component, and an index
naming a folder outside its export is never followed."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flora_train.export import safe_folder_name


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=300), st.text(min_size=1, max_size=300))
def test_any_user_id_is_one_safe_distinct_component(a, b):
    for uid in (a, b, "../../etc/passwd", "nul\x00/../byte", ".", "..", "/"):
        name = safe_folder_name(uid)
        assert name not in (".", "..") and "/" not in name and "\\\\" not in name and "\x00" not in name
        assert 0 < len(name.encode()) <= 255  # one component on any filesystem
    if a != b:
        assert safe_folder_name(a) != safe_folder_name(b)


def test_forgetting_in_an_export_whose_index_names_a_folder_outside_it_removes_nothing_there(tmp_path):
    """forget reads index.json of exports anywhere the run recorded them; one edited to name '../x'
    removed that folder outside the export (rmtree of index.parent / '../x'), and serve read it."""
    from flora_train.export import ExportError, forget_in_export
    from flora_train.inference.rows import FolderRows

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    out = tmp_path / "export"
    out.mkdir()
    (out / "index.json").write_text(json.dumps({"user-1": "../victim"}))
    with pytest.raises(ExportError, match=r"index\.json: user .user-1. leads outside the export: .\.\./victim."):
        forget_in_export(out, "flora", {"user-1"})
    assert (victim / "keep.txt").read_text() == "mine"
    (victim / "adapter_config.json").write_text("{}")  # serving it read the folder outside as an adapter
    with pytest.raises(ExportError, match="leads outside the export"):
        FolderRows(out, {"user-1": "../victim"}, lambda place, user: None)._read(["user-1"], {"user-1": "../victim"})


def test_a_packed_export_whose_index_names_a_pack_outside_it_is_neither_read_nor_rewritten(tmp_path):
    """A packed index edited to map a user to '../other.safetensors' made forget read that file and
    write its rewrite beside it, outside the export, and serve and read_packed read it."""
    import torch
    from safetensors.torch import save_file

    from flora_train.export import ExportError, forget_in_export
    from flora_train.export.packed import read_packed
    from flora_train.inference.rows import PackedRows

    outside = tmp_path / "other.safetensors"
    save_file({"rows": torch.ones(1, 4)}, str(outside), metadata={"users": json.dumps(["user-1"])})
    out = tmp_path / "export"
    out.mkdir()
    (out / "index.json").write_text(json.dumps({"user-1": ["../other.safetensors", 0]}))
    (out / "manifest.json").write_text(json.dumps({"format": "packed", "layout": {}}))
    before = sorted(p.name for p in tmp_path.iterdir())
    for read in (lambda: forget_in_export(out, "packed", {"user-1"}), lambda: read_packed(out, ["user-1"]),
                 lambda: PackedRows(out, {"user-1": ["../other.safetensors", 0]})._read(["user-1"], {"user-1": ["../other.safetensors", 0]})):
        with pytest.raises(ExportError, match=r"index\.json: user 'user-1' leads outside"):
            read()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert outside.exists()

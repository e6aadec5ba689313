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
    removed that folder outside the export (rmtree of index.parent / '../x')."""
    from flora_train.export import ExportError, forget_in_export

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    out = tmp_path / "export"
    out.mkdir()
    (out / "index.json").write_text(json.dumps({"user-1": "../victim"}))
    with pytest.raises(ExportError, match="refusing to write outside"):
        forget_in_export(out, "flora", {"user-1"})
    assert (victim / "keep.txt").read_text() == "mine"

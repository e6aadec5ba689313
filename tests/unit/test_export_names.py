"""Export folder names: any user id, hostile or not, becomes one safe path component."""

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

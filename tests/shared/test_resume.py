"""tyche.resume: the one SettingsMismatch, compare_settings and the checkpoint folder's record."""

from __future__ import annotations

import json

import pytest

from tyche.errors import InputError
from tyche.resume import (
    SETTINGS_FILE,
    SettingsMismatch,
    compare_settings,
    read_settings,
    record_settings,
)


def test_compare_settings_compares_as_json_and_names_both_sides():
    saved = {"cutoffs": [0.01, 0.1], "seed": 0, "gone": "x", "nan": None}
    now = {"cutoffs": (0.01, 0.1), "seed": 1, "new": True, "nan": float("nan")}
    # a tuple equals the list it was saved as; NaN is saved as null; a missing key reads None
    assert compare_settings(saved, now) == {"seed": (0, 1), "new": (None, True),
                                            "gone": ("x", None)}  # fmt: skip
    assert list(compare_settings(saved, now)) == ["seed", "new", "gone"]  # now's order first
    assert compare_settings(saved, now, ignore=("seed", "gone", "new")) == {}
    assert compare_settings({"a": {"b": (1, 2)}}, {"a": {"b": [1, 2]}}) == {}
    assert compare_settings({"a": 1}, {"a": 1.5}) == {"a": (1, 1.5)}


def test_settings_mismatch_is_an_input_error_naming_each_setting(tmp_path):
    err = SettingsMismatch(tmp_path, {"cutoff": (0.05, 0.1), "data": ("a", "b")})
    assert isinstance(err, InputError) and isinstance(err, ValueError)
    assert err.folder == tmp_path and err.differences == {"cutoff": (0.05, 0.1), "data": ("a", "b")}
    text = str(err)
    assert f"cannot resume from {tmp_path}: its run had other settings" in text
    assert "(cutoff: saved 0.05, now 0.1; data: saved 'a', now 'b')" in text
    custom = SettingsMismatch(None, {"k": (1, 2)}, message="k changed")
    assert str(custom) == "k changed" and custom.folder is None


def test_the_old_names_are_the_one_class():
    from tyche.basin.checkpoint import SettingsMismatch as basin
    from tyche.codebook.train import SettingsMismatch as codebook

    assert basin is codebook is SettingsMismatch


def test_record_settings_writes_once_and_refuses_a_changed_resume(tmp_path):
    folder = tmp_path / "ck"
    record_settings(folder, {"k": 3, "sites": ("a", "b")}, resume=False)
    assert json.loads((folder / SETTINGS_FILE).read_text()) == {"k": 3, "sites": ["a", "b"]}
    record_settings(folder, {"k": 3, "sites": ["a", "b"]}, resume=True)  # the same: accepted
    with pytest.raises(SettingsMismatch, match=r"other settings \(k: saved 3, now 4\)") as caught:
        record_settings(folder, {"k": 4, "sites": ["a", "b"]}, resume=True)
    assert caught.value.differences == {"k": (3, 4)} and caught.value.folder == folder
    record_settings(folder, {"k": 4, "sites": ["a", "b"], "batch": 2}, resume=True,
                    ignore=("k", "batch"))  # fmt: skip
    assert read_settings(folder) == {"k": 3, "sites": ["a", "b"]}  # a resume keeps the record
    record_settings(folder, {"k": 5}, resume=False)  # a new run replaces it
    assert read_settings(folder) == {"k": 5}
    # resuming with nothing saved starts afresh; a rank that does not write writes nothing
    record_settings(tmp_path / "other", {"k": 1}, resume=True, write=False)
    assert (tmp_path / "other").is_dir() and read_settings(tmp_path / "other") is None
    record_settings(folder, {"x": 1}, resume=False, file="extra.json")
    assert read_settings(folder, "extra.json") == {"x": 1} and read_settings(folder) == {"k": 5}

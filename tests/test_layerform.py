"""The layer contract on its own (unionfs.layerform): marker names, both whiteout forms, override_stat."""

import os
import stat

import pytest

from unionfs.layerform import (OCI, OVERLAY, Override, is_overlay_opaque, is_overlay_whiteout, make_opaque,
                               make_whiteout, read_override, remove_whiteout, whiteout_target,
                               whiteout_target_bytes)


def test_whiteout_target():
    assert whiteout_target(".wh.foo") == "foo"
    assert whiteout_target(".wh..wh..opq") is None
    assert whiteout_target(".wh..wh.plnk") is None
    assert whiteout_target(".wh..") is None
    assert whiteout_target(".wh...") is None
    assert whiteout_target("foo") is None
    assert whiteout_target_bytes(b".wh.\xff") == b"\xff"


@pytest.mark.parametrize("form", [OCI, OVERLAY])
def test_whiteout_written_is_read_back_and_removed(tmp_path, form):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        make_whiteout(fd, b"gone", form)
        if form == OVERLAY:
            assert is_overlay_whiteout(os.lstat(tmp_path / "gone"))
        else:
            assert (tmp_path / ".wh.gone").is_file() and not (tmp_path / "gone").exists()
        assert remove_whiteout(fd, b"gone", form)
        assert os.listdir(tmp_path) == []
        assert not remove_whiteout(fd, b"gone", form)
    finally:
        os.close(fd)


def test_a_real_file_is_no_overlay_whiteout_and_is_not_removed(tmp_path):
    (tmp_path / "kept").write_text("x")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert not remove_whiteout(fd, b"kept", OVERLAY)
        assert (tmp_path / "kept").exists()
    finally:
        os.close(fd)


@pytest.mark.parametrize("form", [OCI, OVERLAY])
def test_opaque_in_each_form(tmp_path, form):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        make_opaque(fd, form)
        assert is_overlay_opaque(fd) == (form == OVERLAY)
        assert (tmp_path / ".wh..wh..opq").exists() == (form == OCI)
    finally:
        os.close(fd)


def test_override_round_trip_and_garbage(tmp_path):
    value = Override(1000, 5, stat.S_IFCHR | 0o620, (4, 1))
    assert value.encode() == b"1000:5:020620:4:1"
    assert Override.parse(value.encode()) == value
    assert Override.parse(b"0:0:0755") == Override(0, 0, 0o755)
    for garbage in (b"", b"x:y:z", b"1:2", b"\xff:0:0644", b"1:2:999"):
        assert Override.parse(garbage) is None
    path = tmp_path / "f"
    path.write_text("")
    os.setxattr(path, "user.containers.override_stat", b"7:8:0100644")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert read_override(fd, b"f") == Override(7, 8, 0o100644)
        assert read_override(fd, b"missing") is None
    finally:
        os.close(fd)

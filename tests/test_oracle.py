"""The oracle itself: kernel overlayfs on hand-built layers gives the merged tree written out by hand."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from oracle import diff_snapshots, is_mounted, kernel_overlay, mount_points, snapshot, to_overlay_form

T1, T2, T3 = 1_600_000_000_111_111_111, 1_650_000_000_222_222_222, 1_700_000_000_333_333_333


def build_layer(root, spec: dict, mtime_ns: int):
    """spec: path -> bytes (file) | None (dir) | ("link", target) | ("hard", other) | ("fifo",).

    Modes are set explicitly (umask-proof); files and symlinks all get ``mtime_ns``.
    """
    root.mkdir()
    os.chmod(root, 0o755)
    for rel, value in spec.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if value is None:
            path.mkdir(exist_ok=True)
            os.chmod(path, 0o755)
        elif isinstance(value, bytes):
            path.write_bytes(value)
            os.chmod(path, 0o644)
        elif value[0] == "link":
            os.symlink(value[1], path)
        elif value[0] == "hard":
            os.link(root / value[1], path)
        else:
            os.mkfifo(path)
            os.chmod(path, 0o644)
    for directory, dirnames, filenames in os.walk(root):
        os.chmod(directory, 0o755)
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            if not os.path.isdir(path) or os.path.islink(path):
                os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
    return root


@pytest.fixture
def layers(tmp_path):
    """Three layers, top first: whiteouts, an opaque dir, type changes both ways, hardlinks, a symlink."""
    bottom = build_layer(tmp_path / "L1", {
        "etc/passwd": b"root:x:0:0\n", "etc/hosts": b"127.0.0.1 one\n",
        "bin/sh": b"#!sh\n", "bin/bash": ("hard", "bin/sh"), "bin/dash": ("hard", "bin/sh"),
        "lib/sh-link": ("link", "../bin/sh"),
        "opq/a": b"a", "opq/sub/b": b"b",
        "kind/inner": b"inner", "f2d": b"was a file", "gone/x": b"x",
        "fifo": ("fifo",), "suid": b"suid", "owned": b"owned",
    }, T1)
    os.chmod(bottom / "suid", 0o4755)
    os.chown(bottom / "owned", 1000, 2000)
    os.chmod(bottom / "owned", 0o640)
    os.setxattr(bottom / "owned", "user.note", b"kept")
    os.setxattr(bottom / "etc", "user.dir", b"bottom")
    middle = build_layer(tmp_path / "L2", {
        "etc/hosts": b"127.0.0.1 two\n", "etc/.wh.passwd": b"",
        "bin/.wh.dash": b"", ".wh..wh.plnk": None,
        "opq/.wh..wh..opq": b"", "opq/c": b"c",
        ".wh.gone": b"", "newdir/file": b"new",
    }, T2)
    top = build_layer(tmp_path / "L3", {
        "etc/passwd": b"root:x:0:0:again\n",
        "kind": b"now a file", "f2d/now": b"dir",
        "newdir/.wh.file": b"", "gone/y": b"y", "opq/d": b"d",
        "link-to-etc": ("link", "etc"),
    }, T3)
    os.setxattr(top / "etc", "user.dir", b"top")
    return [top, middle, bottom]


@pytest.fixture(autouse=True)
def nothing_left_mounted(tmp_path):
    yield
    left = {point for point in mount_points() if point.startswith(str(tmp_path)) or "/oracle-" in point}
    assert not left, f"left mounted: {sorted(left)}"


def directory(xattrs=()):
    return {"type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "xattrs": list(xattrs)}


def regular(content: bytes, mtime_ns: int, mode=0o644, uid=0, gid=0, xattrs=(), links=None):
    entry = {"type": "file", "mode": mode, "uid": uid, "gid": gid, "xattrs": list(xattrs), "size": len(content),
             "sha256": hashlib.sha256(content).hexdigest(), "mtime_ns": mtime_ns}
    if links:
        entry["links"] = links
    return entry


def symlink(target: str, mtime_ns: int):
    return {"type": "symlink", "mode": 0o777, "uid": 0, "gid": 0, "xattrs": [], "target": target,
            "mtime_ns": mtime_ns}


WHITEOUT_DEVICE = {"type": "chardev", "mode": 0, "uid": 0, "gid": 0, "xattrs": [], "rdev": (0, 0)}

EXPECTED_MERGE = {
    ".": directory(),
    "bin": directory(),
    "bin/bash": regular(b"#!sh\n", T1, links=["bin/bash", "bin/sh"]),
    "bin/sh": regular(b"#!sh\n", T1, links=["bin/bash", "bin/sh"]),
    "etc": directory(xattrs=[("user.dir", b"top")]),
    "etc/hosts": regular(b"127.0.0.1 two\n", T2),
    "etc/passwd": regular(b"root:x:0:0:again\n", T3),
    "f2d": directory(),
    "f2d/now": regular(b"dir", T3),
    "fifo": {"type": "fifo", "mode": 0o644, "uid": 0, "gid": 0, "xattrs": []},
    "gone": directory(),
    "gone/y": regular(b"y", T3),
    "kind": regular(b"now a file", T3),
    "lib": directory(),
    "lib/sh-link": symlink("../bin/sh", T1),
    "link-to-etc": symlink("etc", T3),
    "newdir": directory(),
    "opq": directory(),
    "opq/c": regular(b"c", T2),
    "opq/d": regular(b"d", T3),
    "owned": regular(b"owned", T1, mode=0o640, uid=1000, gid=2000, xattrs=[("user.note", b"kept")]),
    "suid": regular(b"suid", T1, mode=0o4755),
}


def test_kernel_overlay_merges_like_the_hand_written_tree(layers):
    with kernel_overlay(layers) as point:
        assert is_mounted(point)
        merged = snapshot(point)
    assert merged == EXPECTED_MERGE, "\n".join(diff_snapshots(EXPECTED_MERGE, merged, ("expected", "kernel")))
    assert not is_mounted(point) and not point.exists()


def test_overlay_form_keeps_everything_but_the_markers(layers, tmp_path):
    top, middle, bottom = layers
    assert snapshot(to_overlay_form(bottom, tmp_path / "bottom-ovl")) == snapshot(bottom)

    converted = to_overlay_form(middle, tmp_path / "middle-ovl")
    expected = {rel: entry for rel, entry in snapshot(middle).items() if ".wh." not in rel}
    expected.update({"etc/passwd": WHITEOUT_DEVICE, "bin/dash": WHITEOUT_DEVICE, "gone": WHITEOUT_DEVICE})
    got = snapshot(converted)
    assert got == expected, "\n".join(diff_snapshots(expected, got, ("expected", "converted")))
    assert os.getxattr(converted / "opq", "trusted.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(converted / "etc")
    for rel in ("opq", "etc", "."):
        assert os.lstat(converted / rel).st_mtime_ns == os.lstat(middle / rel).st_mtime_ns


def test_single_layer_mounts_read_only_and_shows_the_layer(layers):
    bottom = layers[-1]
    with kernel_overlay([bottom]) as point:
        merged = snapshot(point)
        with pytest.raises(OSError):
            (point / "new").write_bytes(b"x")
    assert merged == snapshot(bottom), "\n".join(diff_snapshots(snapshot(bottom), merged, ("layer", "kernel")))


def test_upper_takes_writes_and_temporary_work_dir_goes(layers, tmp_path):
    upper = tmp_path / "upper"
    upper.mkdir()
    with kernel_overlay(layers, mountpoint=tmp_path / "mnt", upper=upper) as point:
        (point / "etc/new").write_bytes(b"new")
        os.unlink(point / "etc/hosts")
    assert (upper / "etc/new").read_bytes() == b"new"
    hosts = os.lstat(upper / "etc/hosts")
    assert stat.S_ISCHR(hosts.st_mode) and hosts.st_rdev == os.makedev(0, 0)
    assert sorted(os.listdir(tmp_path)) == ["L1", "L2", "L3", "mnt", "upper"]


def test_unmounts_and_cleans_up_when_the_body_raises(layers):
    with pytest.raises(ZeroDivisionError):
        with kernel_overlay(layers) as point:
            assert is_mounted(point)
            1 / 0
    assert not is_mounted(point)
    assert not point.parent.exists()


def test_snapshot_does_not_cross_mounts(layers, tmp_path):
    outer = tmp_path / "outer"
    (outer / "mnt").mkdir(parents=True)
    (outer / "file").write_bytes(b"x")
    with kernel_overlay(layers, mountpoint=outer / "mnt"):
        assert set(snapshot(outer)) == {".", "file"}


def test_diff_snapshots_names_each_difference():
    a = {"x": {"type": "file", "mode": 0o644, "uid": 0}, "gone": {"type": "dir"}}
    b = {"x": {"type": "file", "mode": 0o600, "uid": 0}, "new": {"type": "symlink"}}
    assert diff_snapshots(a, b, ("kernel", "layermount")) == [
        "gone: only in kernel (dir)",
        "new: only in layermount (symlink)",
        "x: mode kernel=0o644 layermount=0o600",
    ]
    assert diff_snapshots(a, a) == []

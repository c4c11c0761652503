"""The mount's life and the read path, through real mounts and ordinary syscalls."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import stat
import time

import pytest

from conftest import alive, run_layermount
from unionfs.mount import daemon_pid, is_mounted


def make_tree(root, spec: dict):
    """spec: path -> bytes (file) | None (dir) | ("link", target) | ("hard", other path)."""
    for rel, value in spec.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if value is None:
            path.mkdir(exist_ok=True)
        elif isinstance(value, tuple) and value[0] == "link":
            os.symlink(value[1], path)
        elif isinstance(value, tuple) and value[0] == "hard":
            os.link(root / value[1], path)
        else:
            path.write_bytes(value)
    return root


@pytest.fixture
def two_layers(tmp_path):
    lower = make_tree(tmp_path / "lower", {
        "etc/os-release": b"base\n", "etc/gone": b"x", "usr/bin/tool": b"tool", "usr/bin/tool2": ("hard", "usr/bin/tool"),
        "opq/old": b"old", "keep/a": b"a",
    })
    upper = make_tree(tmp_path / "upper", {
        "etc/os-release": b"new\n", "etc/.wh.gone": b"", "opq/.wh..wh..opq": b"", "opq/new": b"new",
        "link": ("link", "/etc/passwd"),
    })
    return [upper, lower]


def test_mount_is_ready_when_the_command_returns_and_umount_waits_for_the_daemon(mounts, two_layers):
    point = mounts.mount_lowers(two_layers)
    assert sorted(os.listdir(point)) == ["etc", "keep", "link", "opq", "usr"]
    pid = daemon_pid(str(point))
    assert pid and alive(pid)
    mounts.umount(point)
    assert not is_mounted(str(point))
    assert not alive(pid)
    assert os.listdir(point) == []


def test_merged_view_contents(mounts, two_layers):
    point = mounts.mount_lowers(two_layers)
    assert (point / "etc/os-release").read_bytes() == b"new\n"
    assert not (point / "etc/gone").exists()
    assert sorted(os.listdir(point / "etc")) == ["os-release"]
    assert sorted(os.listdir(point / "opq")) == ["new"]
    assert os.readlink(point / "link") == "/etc/passwd"
    assert os.lstat(point / "link").st_mode & stat.S_IFMT(0o170000) == stat.S_IFLNK


def test_hardlinks_share_inode_and_inodes_are_stable(mounts, two_layers):
    point = mounts.mount_lowers(two_layers)
    first = os.stat(point / "usr/bin/tool")
    second = os.stat(point / "usr/bin/tool2")
    assert first.st_ino == second.st_ino and first.st_nlink == 2
    before = {entry.name: entry.inode() for entry in os.scandir(point / "usr/bin")}
    assert before == {"tool": first.st_ino, "tool2": first.st_ino}
    assert len({os.lstat(point / p).st_dev for p in ("etc", "usr/bin/tool", "link")}) == 1
    etc = os.stat(point / "etc").st_ino
    with open("/proc/sys/vm/drop_caches", "w") as drop:   # makes the kernel forget inodes
        drop.write("2\n")
    assert os.stat(point / "usr/bin/tool").st_ino == first.st_ino
    assert os.stat(point / "etc").st_ino == etc


def test_read_only_mount_refuses_writes(mounts, two_layers):
    point = mounts.mount_lowers(two_layers)
    for attempt in (lambda: open(point / "etc/os-release", "a"), lambda: os.mkdir(point / "new"),
                    lambda: os.unlink(point / "keep/a"), lambda: open(point / "fresh", "w")):
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == errno.EROFS


def test_provenance_xattr_names_the_layer(mounts, two_layers):
    point = mounts.mount_lowers(two_layers)
    upper, lower = two_layers
    assert os.getxattr(point / "etc/os-release", "user.layermount.layer").decode() == str(upper)
    assert os.getxattr(point / "keep/a", "user.layermount.layer").decode() == str(lower)
    assert "user.layermount.layer" not in os.listxattr(point / "keep/a")


def test_which_prints_the_stack(mounts, two_layers):
    point = mounts.mount_lowers(two_layers)
    result = run_layermount("which", point / "etc/os-release")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "wins" in lines[1] and "upper" in lines[1]
    assert "hidden by layer 2" in lines[2]
    gone = run_layermount("which", point / "etc/gone")
    assert gone.returncode == 1
    assert "whiteout etc/.wh.gone" in gone.stdout


@pytest.mark.parametrize("problem", ["missing", "file", "not-empty"])
def test_bad_mountpoint_is_one_line_and_nothing_is_mounted(tmp_path, two_layers, problem):
    point = tmp_path / "mnt"
    if problem == "file":
        point.write_text("x")
    elif problem == "not-empty":
        point.mkdir()
        (point / "x").write_text("x")
    result = run_layermount("-o", "lowerdir=" + ":".join(map(str, two_layers)), point)
    assert result.returncode == 5
    assert len(result.stderr.strip().splitlines()) == 1 and str(point) in result.stderr
    assert not is_mounted(str(point))


def test_missing_lowerdir_is_a_usage_error(mounts, tmp_path):
    result = mounts.mount_lowers([tmp_path / "nope"], expect_ok=False)
    assert result.returncode == 2 and "nope" in result.stderr


def test_umount_recovers_a_mount_whose_daemon_was_killed(mounts, two_layers):
    point = mounts.mount_lowers(two_layers)
    pid = daemon_pid(str(point))
    os.kill(pid, signal.SIGKILL)
    def answer() -> int:
        try:
            os.listdir(point)
        except OSError as exc:
            return exc.errno
        return 0
    # While the kernel tears the connection down a request may get ECONNABORTED; then it is ENOTCONN.
    deadline = time.monotonic() + 10
    while (alive(pid) or answer() != errno.ENOTCONN) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(pid)
    assert answer() == errno.ENOTCONN
    mounts.umount(point)
    assert not is_mounted(str(point))


def test_sigterm_unmounts_cleanly(mounts, two_layers):
    point = mounts.mount_lowers(two_layers)
    pid = daemon_pid(str(point))
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (is_mounted(str(point)) or alive(pid)):
        time.sleep(0.05)
    assert not is_mounted(str(point))
    assert not alive(pid)


def getdents_names(path, buffer_size=512):
    """Read a directory with getdents64 in small chunks, as a careful libc would."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    names = []
    try:
        buffer = ctypes.create_string_buffer(buffer_size)
        while True:
            count = libc.syscall(217, fd, buffer, buffer_size)  # SYS_getdents64 on x86_64
            if count < 0:
                raise OSError(ctypes.get_errno(), "getdents64")
            if count == 0:
                return names
            offset = 0
            raw = buffer.raw[:count]
            while offset < count:
                reclen = int.from_bytes(raw[offset + 16:offset + 18], "little")
                name = raw[offset + 19:offset + reclen].split(b"\0", 1)[0]
                names.append(name.decode())
                offset += reclen
    finally:
        os.close(fd)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="getdents64 syscall number is x86_64's")
def test_huge_directory_lists_completely_in_small_chunks(mounts, tmp_path):
    lower = tmp_path / "lower"
    (lower / "big").mkdir(parents=True)
    for index in range(100_000):
        (lower / "big" / f"f{index:06d}").touch()
    upper = make_tree(tmp_path / "upper", {"big/.wh.f000007": b"", "big/extra": b"x"})
    point = mounts.mount_lowers([upper, lower])
    names = getdents_names(point / "big")
    assert names.count(".") == 1 and names.count("..") == 1
    visible = [name for name in names if name not in (".", "..")]
    assert len(visible) == len(set(visible)) == 100_000
    assert "f000007" not in visible and "extra" in visible


def test_daemon_never_follows_a_layer_symlink(mounts, tmp_path):
    secret = tmp_path / "host-secret"
    secret.mkdir()
    (secret / "passwd").write_text("host data")
    # Lower layer: etc is a symlink to a host dir; upper: etc is a real directory.
    lower = make_tree(tmp_path / "lower", {"etc": ("link", str(secret))})
    upper = make_tree(tmp_path / "upper", {"etc/hostname": b"box"})
    point = mounts.mount_lowers([upper, lower])
    assert sorted(os.listdir(point / "etc")) == ["hostname"]
    assert not (point / "etc/passwd").exists()
    # And the other order: the symlink wins and is served as a symlink, not followed by the daemon.
    point2 = mounts.mount_lowers([lower, upper], mountpoint=mounts.mountpoint("mnt2"))
    assert os.readlink(point2 / "etc") == str(secret)


def test_explain_tells_the_lookup_step_by_step(mounts, two_layers):
    point = mounts.mount_lowers(two_layers)
    gone = run_layermount("explain", point / "etc/gone")
    assert gone.returncode == 0, gone.stderr
    assert "whiteout etc/.wh.gone: the layers below are not looked at" in gone.stdout
    assert "does not exist in the merged view" in gone.stdout
    hidden = run_layermount("explain", point / "opq/old").stdout
    assert "opaque directory /opq" in hidden
    assert "merged with" not in hidden.split("/opq/old:")[0]
    seen = run_layermount("explain", point / "usr/bin/tool").stdout
    assert "the copy in layer 1" in seen

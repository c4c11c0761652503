"""The -o options that change the merged view, through real mounts, beside fuse-overlayfs.

uidmapping=/gidmapping=, squash_to_*, xattr_permissions=, noxattrs and volatile: each case
runs against layermount and, where fuse-overlayfs 1.10 (Debian 12's) does the same thing,
against fuse-overlayfs too with the same expectations. Where they differ on purpose the
test says why in its docstring.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import run_layermount

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("fuse-overlayfs") or not shutil.which("setpriv"),
                                reason="needs root (owners other than our own), fuse-overlayfs and setpriv")
PROGRAMS = ["layermount", "fuse-overlayfs"]
MAP = "uidmapping=0:100000:65536,gidmapping=0:100000:65536"


@pytest.fixture
def dirs(mounts):
    """A lower with files of three owners (70000 lies outside the test mapping), empty upper and work,
    in a directory other users may walk through (pytest's are 0700)."""
    tmp_path = Path(tempfile.mkdtemp(prefix="layermount-viewopts-"))
    os.chmod(tmp_path, 0o755)
    try:
        yield from _filled(tmp_path)
    finally:
        if not os.path.ismount(tmp_path / "mnt"):
            shutil.rmtree(tmp_path)


def _filled(tmp_path: Path):
    lower = tmp_path / "lower"
    (lower / "d").mkdir(parents=True)
    for name, owner in (("a", 0), ("b", 1), ("c", 70000)):
        (lower / name).write_text(name)
        os.chown(lower / name, owner, owner)
    os.chmod(lower / "d", 0o777)
    for name in ("upper", "work", "mnt"):
        (tmp_path / name).mkdir()
    yield tmp_path


@contextlib.contextmanager
def mounted(program: str, base: Path, options: str, mounts):
    spec = f"lowerdir={base / 'lower'},upperdir={base / 'upper'},workdir={base / 'work'},{options}"
    point = base / "mnt"
    if program == "layermount":
        mounts.mount("-o", spec, store=False, mountpoint=point)
        unmount = ["umount", point]
    else:
        subprocess.run(["fuse-overlayfs", "-o", spec, point], check=True, capture_output=True)
        unmount = ["fusermount3", "-u", point]
    try:
        yield point
    finally:
        subprocess.run(unmount, check=True)


def owner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def as_ids(uid: int, gid: int, *command) -> None:
    subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *map(str, command)], check=True)


@pytest.mark.parametrize("program", PROGRAMS)
def test_id_mapping_shifts_owners_both_ways(dirs, mounts, program):
    """Stored ids in the ranges show shifted, others as the overflow id; what a mapped caller creates
    or chowns is stored unshifted; a caller outside the ranges creates files of the overflow id."""
    with mounted(program, dirs, MAP, mounts) as point:
        assert [owner(point / name) for name in "abc"] == [(100000, 100000), (100001, 100001), (65534, 65534)]
        assert owner(point / "d") == (100000, 100000)
        as_ids(100003, 100004, "touch", point / "d" / "mine")
        assert owner(point / "d" / "mine") == (100003, 100004)
        os.chown(point / "a", 100005, 100007)
        assert owner(point / "a") == (100005, 100007)
        (point / "by-root").write_text("root is not mapped\n")
        assert owner(point / "by-root") == (165534, 165534)    # stored 65534, shown shifted
    upper = dirs / "upper"
    assert owner(upper / "d" / "mine") == (3, 4) and owner(upper / "a") == (5, 7)
    assert owner(upper / "by-root") == (65534, 65534)


def test_chown_to_an_unmapped_id_is_refused(dirs, mounts):
    """fuse-overlayfs stores the overflow id instead (so a chown silently gives another owner);
    layermount says EINVAL, as the kernel does for an id a mount cannot represent."""
    with mounted("layermount", dirs, MAP, mounts) as point:
        with pytest.raises(OSError) as refused:
            os.chown(point / "b", 5, -1)
        assert refused.value.errno == errno.EINVAL
        assert owner(point / "b") == (100001, 100001)
        os.chown(point / "b", -1, 100009)          # the other id alone is fine
        assert owner(point / "b") == (100001, 100009)
    assert owner(dirs / "upper" / "b") == (1, 9)


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("options, shown", [
    ("squash_to_root", [(0, 0), (0, 0), (0, 0)]),
    ("squash_to_uid=7", [(7, 0), (7, 1), (7, 70000)]),
    ("squash_to_gid=8", [(0, 8), (1, 8), (70000, 8)]),
    ("squash_to_uid=7,squash_to_root", [(7, 0), (7, 0), (7, 0)]),
    (f"squash_to_uid=7,{MAP}", [(7, 100000), (7, 100001), (7, 65534)]),
])
def test_squash_shows_one_owner_and_stores_the_real_one(dirs, mounts, program, options, shown):
    with mounted(program, dirs, options, mounts) as point:
        assert [owner(point / name) for name in "abc"] == shown
        (point / "d" / "new").write_text("x")
    assert owner(dirs / "upper" / "d" / "new") == ((65534, 65534) if "uidmapping" in options else (0, 0))


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("level, xattr", [(1, "security.fuseoverlayfs.override_stat"),
                                          (2, "user.fuseoverlayfs.override_stat")])
def test_xattr_permissions_keeps_owner_and_mode_in_the_xattr(dirs, mounts, program, level, xattr):
    """New files and directories keep their owner and mode in the xattr; on disk they are the daemon's, 0755.

    fuse-overlayfs 1.10 loses a new directory's mode (it shows and stores 0755) and lists the
    xattr of level 1 through the mount; those two checks are layermount's alone.
    """
    ours = program == "layermount"
    with mounted(program, dirs, f"xattr_permissions={level}", mounts) as point:
        (point / "new").write_text("x")
        os.chmod(point / "new", 0o640)
        (point / "dir").mkdir(mode=0o700)
        assert oct(os.stat(point / "new").st_mode) == oct(0o100640)
        assert oct(os.stat(point / "dir").st_mode) == oct(0o40700 if ours else 0o40755)
        if ours:
            assert os.listxattr(point / "new") == []
    for name, mode in (("new", 0o100640), ("dir", 0o40700)) if ours else (("new", 0o100640),):
        st = os.lstat(dirs / "upper" / name)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o755)
        uid, gid, stored_mode = os.getxattr(dirs / "upper" / name, xattr).decode().split(":")
        assert (int(uid), int(gid), int(stored_mode, 8)) == (0, 0, mode)


def test_xattr_permissions_chown_and_setuid_live_in_the_xattr_only(dirs, mounts):
    """chown and a setuid chmod change the xattr, never the file on disk (fuse-overlayfs 1.10 loses the
    chown there: its chmod writes the old owner back, so this case is layermount's alone)."""
    xattr = "user.fuseoverlayfs.override_stat"
    with mounted("layermount", dirs, "xattr_permissions=2", mounts) as point:
        os.chown(point / "b", 3, 4)
        os.chmod(point / "b", 0o4710)
        st = os.stat(point / "b")
        assert (st.st_uid, st.st_gid, oct(st.st_mode)) == (3, 4, oct(0o104710))
        with pytest.raises(PermissionError):
            os.setxattr(point / "b", xattr, b"0:0:0104755")      # no one forges it through the mount
    upper = dirs / "upper" / "b"
    assert (os.lstat(upper).st_uid, os.lstat(upper).st_mode & 0o7777) == (0, 0o755)
    assert os.getxattr(upper, xattr) == b"3:4:0104710"
    with mounted("layermount", dirs, "xattr_permissions=2", mounts) as point:   # and after a remount
        st = os.stat(point / "b")
        assert (st.st_uid, st.st_gid, oct(st.st_mode)) == (3, 4, oct(0o104710))


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_layer_marked_as_force_mask_unpacks_it_is_read_through_its_xattr(dirs, mounts, program):
    """containers/storage's force_mask marks a layer's root with user.containers.override_stat: every
    entry's owner and mode are then read from that xattr."""
    lower = dirs / "lower"
    os.setxattr(lower, "user.containers.override_stat", b"0:0:0755")
    for name, value in (("a", b"5:6:0700"), ("b", b"1:1:04755"), ("c", b"7:7:0644"), ("d", b"0:0:01777")):
        os.setxattr(lower / name, "user.containers.override_stat", value)
    with mounted(program, dirs, "xattr_permissions=2", mounts) as point:
        st = os.stat(point / "a")
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (5, 6, 0o700)
        assert os.stat(point / "d").st_mode & 0o7777 == 0o1777
        if program == "layermount":     # fuse-overlayfs lists its bookkeeping through the mount
            assert os.listxattr(point / "a") == []


@pytest.mark.parametrize("program", PROGRAMS)
def test_noxattrs_answers_every_xattr_call_not_supported(dirs, mounts, program):
    """fuse-overlayfs 1.10 still lets removexattr through; layermount refuses it too."""
    os.setxattr(dirs / "lower" / "a", "user.kept", b"1")
    calls = [lambda: os.listxattr(point / "a"), lambda: os.getxattr(point / "a", "user.kept"),
             lambda: os.setxattr(point / "a", "user.new", b"2")]
    if program == "layermount":
        calls.append(lambda: os.removexattr(point / "a", "user.kept"))
    with mounted(program, dirs, "noxattrs=1", mounts) as point:
        for call in calls:
            with pytest.raises(OSError) as refused:
                call()
            assert refused.value.errno == errno.ENOTSUP
        assert (point / "a").read_text() == "a"


def fsyncs_of(pid: int, action) -> list[str]:
    """The fsync-family calls a daemon makes while ``action`` runs (strace attached to it)."""
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync,syncfs", "-p", str(pid)],
                              stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)        # strace attached before the calls start
        action()
        time.sleep(0.3)
    finally:
        tracer.terminate()
    return [line for line in tracer.communicate(timeout=30)[1].splitlines() if "sync" in line]


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace (scripts/setup installs it)")
@pytest.mark.parametrize("options, synced", [("", True), ("volatile", False), ("fsync=0", False)])
def test_volatile_skips_every_fsync(dirs, mounts, options, synced):
    """A copy-up and fsync(2)/fsync of a directory reach the disk, unless the mount is volatile."""
    with mounted("layermount", dirs, options, mounts) as point:
        pid = int(os.getxattr(point, "user.layermount.pid"))

        def write_and_sync():
            with open(point / "a", "r+") as copied_up:
                copied_up.write("changed")
                copied_up.flush()              # the write, then its fsync (Python buffers until close)
                os.fsync(copied_up.fileno())
            fd = os.open(point / "d", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        calls = fsyncs_of(pid, write_and_sync)
        assert (point / "a").read_text() == "changed"
    assert bool(calls) == synced, calls
    if synced:
        assert len(calls) >= 3          # the copy-up, the file, the directory


def test_a_layermount_mount_reports_the_options_it_took(dirs, mounts):
    """None of the view options is refused any more: each one mounts and says nothing on stderr."""
    spec = f"lowerdir={dirs / 'lower'},upperdir={dirs / 'upper'},workdir={dirs / 'work'}"
    for options in (MAP, "squash_to_root", "squash_to_uid=1", "squash_to_gid=1", "xattr_permissions=1",
                    "xattr_permissions=2", "noxattrs", "volatile"):
        result = mounts.mount("-o", f"{spec},{options}", store=False, expect_ok=False,
                              mountpoint=dirs / "mnt")
        assert result.returncode == 0 and result.stderr == "", (options, result.stderr)
        assert run_layermount("umount", dirs / "mnt").returncode == 0

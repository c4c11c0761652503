"""Exactness through a real mount: errnos, link counts, directory times and inode numbers as the kernel has them.

Each case here was a difference from kernel overlayfs (``index=on,redirect_dir=on``)
or from a fresh unpack of the merged tree; the mtime cases run the same
operation on both mounts of the same layers and compare.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from oracle import kernel_overlay
from test_mount import make_tree

KERNEL_FEATURES = "index=on,redirect_dir=on"
LONG_NAME = "n" * 256      # one byte over NAME_MAX
OLD_NS = 1_000_000_000 * 1_500_000_000   # 2017: far from "now", so any touch shows


def _old_times(root: Path) -> Path:
    """Every entry of a layer dir gets the same old mtime, so a touch by the mount is visible."""
    for directory, names, files in os.walk(root, topdown=False):
        for name in names + files:
            os.utime(os.path.join(directory, name), ns=(OLD_NS, OLD_NS), follow_symlinks=False)
    os.utime(root, ns=(OLD_NS, OLD_NS))
    return root


@pytest.fixture
def lowers(tmp_path):
    top = make_tree(tmp_path / "top", {"t/keep": b"t", "hl2": ("link", "hl1")})
    bottom = make_tree(tmp_path / "bottom", {
        "dir/file": b"lower file", "dir/sub/inner": b"inner", "dir/other": b"o",
        "hard/a": b"hard", "hard/b": ("hard", "hard/a"), "hard/c": ("hard", "hard/a"),
        "hl1": b"one", "hl2": ("hard", "hl1"),
    })
    os.chmod(bottom / "dir", 0o777)
    return [_old_times(top), _old_times(bottom)]


def mount_writable(mounts, tmp_path: Path, lowers, name: str = "mnt") -> Path:
    for part in ("upper", "work"):
        (tmp_path / part).mkdir(exist_ok=True)
    spec = ("lowerdir=" + ":".join(map(str, lowers))
            + f",upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}")
    return mounts.mount("-o", spec, store=False, mountpoint=mounts.mountpoint(name))


def errno_of(action) -> int | None:
    try:
        action()
    except OSError as exc:
        return exc.errno
    return None


# ---- errnos (pjdfstest */02.t, rename/01.t, truncate/03.t, ftruncate/03.t) -----------------

def test_names_over_name_max_are_enametoolong_in_every_call(mounts, tmp_path, lowers):
    """A name over 255 bytes is ENAMETOOLONG, as on any Linux filesystem, never a mere ENOENT."""
    point = mount_writable(mounts, tmp_path, lowers)
    long = point / "dir" / LONG_NAME
    calls = {
        "stat": lambda: os.lstat(long),
        "chmod": lambda: os.chmod(long, 0o600),
        "chown": lambda: os.chown(long, 1, 1),
        "lchown": lambda: os.lchown(long, 1, 1),
        "truncate": lambda: os.truncate(long, 1),
        "unlink": lambda: os.unlink(long),
        "rmdir": lambda: os.rmdir(long),
        "link from": lambda: os.link(long, point / "dir/x"),
        "link to": lambda: os.link(point / "dir/file", long),
        "rename from": lambda: os.rename(long, point / "dir/x"),
        "rename to": lambda: os.rename(point / "dir/file", long),
        "open": lambda: os.open(long, os.O_RDONLY),
        "create": lambda: os.open(long, os.O_CREAT | os.O_WRONLY, 0o644),
        "mkdir": lambda: os.mkdir(long),
    }
    found = {name: errno.errorcode.get(errno_of(call)) for name, call in calls.items()}
    assert found == {name: "ENAMETOOLONG" for name in calls}
    assert (point / "dir/file").read_bytes() == b"lower file"


def test_a_path_longer_than_path_max_below_the_layer_root_still_works(mounts, tmp_path, lowers):
    """The kernel hands the daemon names, not paths: a file reached from a deep cwd is fine even
    when its path from the mount's root passes PATH_MAX (pjdfstest truncate/03.t `N/../N`)."""
    point = mount_writable(mounts, tmp_path, lowers)
    component = "d" * 250
    (point / "dir" / component).mkdir()
    start = os.getcwd()
    os.chdir(point / "dir" / component)
    try:
        deep = "/".join([component] * 16)          # 4,020 bytes from the cwd, 4,275 from the root
        os.makedirs(deep)
        name = f"{deep}/file"
        os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644))
        os.truncate(name, 123)
        assert os.stat(name).st_size == 123
        fd = os.open(name, os.O_WRONLY)
        try:
            os.ftruncate(fd, 7)
            os.write(fd, b"written")
        finally:
            os.close(fd)
        with open(name, "rb") as handle:
            assert handle.read() == b"written"
        os.chmod(name, 0o600)
        assert stat.S_IMODE(os.stat(name).st_mode) == 0o600
        os.unlink(name)
        assert not os.path.lexists(name)
    finally:
        os.chdir(start)


# ---- directory and file mtimes against kernel overlayfs ----------------------------------------

def _mtime_lowers(tmp_path: Path) -> list[Path]:
    top = make_tree(tmp_path / "mtop", {"t/keep": b"t", "dir/sub/top": b"merged in"})
    bottom = make_tree(tmp_path / "mbottom", {
        "dir/file": b"lower file", "dir/sub/inner": b"inner", "dir/other": b"o", "dir/sym": ("link", "file"),
        "hard/a": b"hard", "hard/b": ("hard", "hard/a"), "hard/in/c": ("hard", "hard/a"),
    })
    (bottom / "dir/empty").mkdir()
    os.mkfifo(bottom / "dir/fifo")
    return [_old_times(top), _old_times(bottom)]


def _append(path: Path) -> None:
    with open(path, "ab") as handle:
        handle.write(b"more")


def _open_for_writing(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY))


# name -> (steps run on both mounts, the paths whose mtimes are compared afterwards)
MTIME_CASES = {
    "chmod copies up": ([lambda r: os.chmod(r / "dir/file", 0o600)], ["", "dir", "dir/file"]),
    "chown copies up": ([lambda r: os.chown(r / "dir/sub/inner", 1, 1)], ["dir", "dir/sub", "dir/sub/inner"]),
    "open for writing copies up": ([lambda r: _open_for_writing(r / "dir/file")], ["dir", "dir/file"]),
    "append": ([lambda r: _append(r / "dir/sub/inner")], ["", "dir", "dir/sub", "dir/sub/inner"]),
    "truncate": ([lambda r: os.truncate(r / "dir/file", 3)], ["dir", "dir/file"]),
    "setxattr on a file": ([lambda r: os.setxattr(r / "dir/file", "user.k", b"v")], ["dir", "dir/file"]),
    "chmod of a merged dir": ([lambda r: os.chmod(r / "dir/sub", 0o700)], ["", "dir", "dir/sub"]),
    "lchown of a symlink": ([lambda r: os.lchown(r / "dir/sym", 2, 2)], ["dir", "dir/sym"]),
    "chmod of a fifo": ([lambda r: os.chmod(r / "dir/fifo", 0o600)], ["dir", "dir/fifo"]),
    "chmod of a hardlinked file": ([lambda r: os.chmod(r / "hard/a", 0o600)], ["hard", "hard/in", "hard/a"]),
    "unlink": ([lambda r: os.unlink(r / "dir/file")], ["", "dir"]),
    "rmdir": ([lambda r: os.rmdir(r / "dir/empty")], ["", "dir"]),
    "create": ([lambda r: (r / "dir/sub/new").write_bytes(b"n")], ["", "dir", "dir/sub"]),
    "mkdir": ([lambda r: os.mkdir(r / "dir/sub/newdir")], ["dir", "dir/sub"]),
    "link": ([lambda r: os.link(r / "dir/file", r / "dir/sub/file")], ["", "dir", "dir/sub", "dir/file"]),
    "rename in a dir": ([lambda r: os.rename(r / "dir/file", r / "dir/moved")], ["", "dir", "dir/moved"]),
    "rename across dirs": ([lambda r: os.rename(r / "dir/file", r / "t/file")], ["", "dir", "t", "t/file"]),
    "rename over a file": ([lambda r: os.rename(r / "dir/other", r / "dir/file")], ["dir", "dir/file"]),
    "rename a lower dir": ([lambda r: os.rename(r / "dir/sub", r / "dir/moved")],
                           ["", "dir", "dir/moved", "dir/moved/inner", "dir/moved/top"]),
    "rename a dir onto a deleted lower name": (
        [lambda r: os.rmdir(r / "dir/empty"), lambda r: os.rename(r / "t", r / "dir/empty")],
        ["dir/empty", "dir/empty/keep"]),
    "mkdir over a deleted lower dir": (
        [lambda r: os.rmdir(r / "dir/empty"), lambda r: os.utime(r / "dir", ns=(OLD_NS, OLD_NS)),
         lambda r: os.mkdir(r / "dir/empty")], ["", "dir"]),
}


def _changed(root: Path, paths: list[str]) -> dict[str, str]:
    """Whether each path still has the layers' old mtime."""
    return {path: "kept" if os.lstat(root / path).st_mtime_ns == OLD_NS else "changed" for path in paths}


@pytest.mark.parametrize("whiteouts", ["overlay", "oci"])
@pytest.mark.parametrize("case", sorted(MTIME_CASES))
def test_mtimes_after_an_operation_on_lower_entries_are_the_kernels(mounts, tmp_path, case, whiteouts):
    """Copy-up of a child, whiteouts, opaque markers and rename bookkeeping leave parents' (and the
    entry's own) mtimes as kernel overlayfs leaves them: only what the operation itself changes moves."""
    steps, paths = MTIME_CASES[case]
    lowers = _mtime_lowers(tmp_path)
    for part in ("upper", "work", "kernel-upper"):
        (tmp_path / part).mkdir()
    extra = ("--whiteout-format", "oci") if whiteouts == "oci" else ()
    spec = "lowerdir=" + ":".join(map(str, lowers)) + f",upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}"
    ours = mounts.mount("-o", spec, *extra, store=False, mountpoint=mounts.mountpoint("ours"))
    with kernel_overlay(lowers, mountpoint=tmp_path / "kernel", upper=tmp_path / "kernel-upper",
                        options=KERNEL_FEATURES) as kernel:
        for root in (ours, kernel):
            for step in steps:
                step(root)
        expected = _changed(kernel, paths)
        assert _changed(ours, paths) == expected
    # What the kernel cached of a lower directory hides nothing after a remount: the upper itself must be right.
    mounts.umount(ours)
    again = mounts.mount("-o", spec, *extra, store=False, mountpoint=mounts.mountpoint("again"))
    assert _changed(again, paths) == expected


# ---- link counts: the names the merged view has ------------------------------------------------

def test_a_file_whose_hardlink_partner_a_later_layer_replaced_has_one_name(mounts, tmp_path, lowers):
    """umoci's reference rootfs (a fresh unpack of the merged tree) says 1: the layer's own count of 2
    includes a name the top layer replaced by a symlink. So before and after copy-up and a remount."""
    point = mount_writable(mounts, tmp_path, lowers)
    assert os.lstat(point / "hl1").st_nlink == 1
    assert [entry.stat(follow_symlinks=False).st_nlink for entry in os.scandir(point) if entry.name == "hl1"] == [1]
    os.chmod(point / "hl1", 0o600)
    assert os.lstat(point / "hl1").st_nlink == 1
    mounts.umount(point)
    again = mount_writable(mounts, tmp_path, lowers, "again")
    assert os.lstat(again / "hl1").st_nlink == 1


def test_link_counts_follow_unlink_copy_up_link_and_remount(mounts, tmp_path, lowers):
    point = mount_writable(mounts, tmp_path, lowers)
    names = ["hard/a", "hard/b", "hard/c"]
    assert [os.lstat(point / name).st_nlink for name in names] == [3, 3, 3]
    os.unlink(point / "hard/b")                       # a whiteout over a lower name
    assert [os.lstat(point / name).st_nlink for name in ("hard/a", "hard/c")] == [2, 2]
    os.chmod(point / "hard/c", 0o600)                 # copy-up links the names still there
    assert [os.lstat(point / name).st_nlink for name in ("hard/a", "hard/c")] == [2, 2]
    os.link(point / "hard/a", point / "hard/d")
    assert os.lstat(point / "hard/d").st_nlink == 3
    mounts.umount(point)
    again = mount_writable(mounts, tmp_path, lowers, "again")
    assert [os.lstat(again / name).st_nlink for name in ("hard/a", "hard/c", "hard/d")] == [3, 3, 3]
    assert os.lstat(again / "hard/a").st_ino == os.lstat(again / "hard/d").st_ino


@pytest.mark.parametrize("opened", ["for reading (the lower file)", "for writing (the upper copy)"])
def test_fstat_of_an_open_file_counts_the_names_left(mounts, tmp_path, lowers, opened):
    """An open file whose names go one by one: fstat says how many are left, 0 when none (the
    kernel had held none of the other names, so the daemon must find them itself)."""
    point = mount_writable(mounts, tmp_path, lowers)
    flags = os.O_RDONLY if opened.startswith("for reading") else os.O_RDWR
    fd = os.open(point / "hard/a", flags)
    try:
        seen = [os.fstat(fd).st_nlink]
        for name in ("hard/a", "hard/b", "hard/c"):
            os.unlink(point / name)
            seen.append(os.fstat(fd).st_nlink)
        assert seen == [3, 2, 1, 0]
        assert os.pread(fd, 4, 0) == b"hard"
    finally:
        os.close(fd)


def test_the_other_names_keep_the_inode_number_when_the_copied_up_name_goes(mounts, tmp_path, lowers):
    """A copy-up links the other names afterwards; the first name's unlink once judged by its link
    count from before those links (1), retired the host inode and handed the other names a new st_ino."""
    point = mount_writable(mounts, tmp_path, lowers)
    ino = os.lstat(point / "hard/a").st_ino
    os.close(os.open(point / "hard/a", os.O_WRONLY))
    os.unlink(point / "hard/a")
    assert [os.lstat(point / name).st_ino for name in ("hard/b", "hard/c")] == [ino, ino]
    os.rename(point / "dir/file", point / "hard/b")    # replaces one of the two names left
    assert os.lstat(point / "hard/c").st_ino == ino
    assert os.lstat(point / "hard/c").st_nlink == 1


# ---- numbers the kernel compares: d_ino, st_dev, blocks, xattrs ----------------------------------

def test_readdir_d_ino_is_st_ino_and_the_mount_has_one_st_dev(mounts, tmp_path, lowers):
    point = mount_writable(mounts, tmp_path, lowers)
    os.chmod(point / "hard/a", 0o600)                 # copied up with its hardlinks
    os.rename(point / "dir/file", point / "dir/renamed")
    (point / "dir/new").write_bytes(b"new")
    devices = {os.lstat(point).st_dev}
    for directory in ("", "dir", "hard", ".layers/1", ".layers/2/t"):
        with os.scandir(point / directory) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                assert entry.inode() == st.st_ino, f"{directory}/{entry.name}"
                devices.add(st.st_dev)
    assert len(devices) == 1


def test_sparse_lower_files_report_their_blocks_and_xattrs_survive_copy_up(mounts, tmp_path):
    bottom = tmp_path / "bottom"
    bottom.mkdir()
    with open(bottom / "sparse", "wb") as handle:
        handle.truncate(64 << 20)
        handle.write(b"head")
    os.setxattr(bottom / "sparse", "user.note", b"kept")
    layer_blocks = os.stat(bottom / "sparse").st_blocks
    (tmp_path / "top").mkdir()
    point = mount_writable(mounts, tmp_path, [tmp_path / "top", bottom])
    assert os.stat(point / "sparse").st_blocks == layer_blocks
    os.chmod(point / "sparse", 0o600)
    assert os.getxattr(point / "sparse", "user.note") == b"kept"
    assert os.getxattr(tmp_path / "upper/sparse", "user.note") == b"kept"

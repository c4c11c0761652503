"""Attacks on the merged view: copy-up, xattrs, deep trees (issue 9: 6, 13, 17, item 4's leftovers).

Each case is what a user of the mount (root's own processes, or ``nobody`` on an
``--allow-other`` mount) or a hostile lower layer tries, and what must hold.
They go through real mounts with ordinary syscalls; the daemon is squeezed
from outside (``prlimit``), never called directly.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import alive
from unionfs.image.writer import Dir, File, layer_tar, new_config, write_image
from unionfs.mount import FSTYPE, daemon_pid, mount_entries

NOBODY = 65534
DEEP = 1_200          # past Python's recursion limit (1,000) and issue 9's 1,100 levels

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="needs root (tmpfs, prlimit on the daemon) and setpriv to act as nobody")


# ---- helpers ----------------------------------------------------------------------

NOBODY_PYTHON = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                 "--inh-caps=-all,+dac_read_search", "--ambient-caps=-all,+dac_read_search", sys.executable]
# This machine's Python lives under /root: a nobody running it keeps CAP_DAC_READ_SEARCH (as in
# test_rootless), which lets it read files, not trusted.* xattrs (that takes CAP_SYS_ADMIN).


@pytest.fixture(autouse=True)
def deep_trees_removed(tmp_path):
    """pytest's own (recursive) clean-up fails on the deep trees made here: rm -rf is iterative."""
    yield
    for child in tmp_path.iterdir():
        subprocess.run(["rm", "-rf", "--one-file-system", str(child)], capture_output=True)


@pytest.fixture
def shared_dir():
    """A directory other users can traverse (0755): pytest's tmp dirs are 0700."""
    path = Path(tempfile.mkdtemp(prefix="layermount-overlay-attack-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for point, kind in reversed(mount_entries()):
            if point.startswith(str(path)) and kind == FSTYPE:
                pid = daemon_pid(point)
                subprocess.run(["fusermount3", "-uz", point], capture_output=True)
                deadline = time.monotonic() + 10
                while pid and alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path):
    """make(name, options): a tmpfs below tmp_path, unmounted at teardown (request before ``mounts``)."""
    made: list[Path] = []

    def make(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)
        made.append(point)
        return point

    try:
        yield make
    finally:
        for point in reversed(made):
            if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(point)], capture_output=True)


def writable_mount(mounts, base: Path, lower: Path, *extra):
    """An ``-o lowerdir=,upperdir=,workdir=`` mount: its work dir is where a copy-up is made."""
    upper, work = base / "upper", base / "work"
    upper.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    spec = f"lowerdir={lower},upperdir={upper},workdir={work}"
    point = mounts.mount("-o", spec, *extra, mountpoint=mounts.mountpoint(base.name + "-mnt"), store=False)
    return point, upper, work, spec


def write_real_data(path: Path, size: int) -> str:
    """A file of ``size`` bytes of data (no holes), so its copy takes a while; returns its sha256."""
    digest = hashlib.sha256()
    block = hashlib.sha256(b"seed").digest() * (1 << 15)      # 1 MiB that does not compress to nothing
    with open(path, "wb") as out:
        for _ in range(size // len(block)):
            out.write(block)
            digest.update(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def partial_copies(work: Path) -> list[str]:
    return [name for name in os.listdir(work) if name.startswith("copyup-")]


def make_deep(root_fd: int, depth: int) -> None:
    """``depth`` nested directories below a directory fd (no path is ever that long)."""
    current = os.dup(root_fd)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=current)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=current)
            os.close(current)
            current = child
        os.close(os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=current))
    finally:
        os.close(current)


# ---- 6: a metadata change froze the mount; copy-up filled holes -----------------------

@pytest.fixture(scope="module")
def big_lower(tmp_path_factory):
    """A lower layer with a 2 GiB file of real data in dir/ (shared: lower layers never change)."""
    lower = tmp_path_factory.mktemp("big") / "lower"
    (lower / "dir").mkdir(parents=True)
    digest = write_real_data(lower / "dir/big", 2 << 30)
    (lower / "small").write_bytes(b"small")
    for index in range(10):
        (lower / f"other-{index}").write_bytes(b"other")
    try:
        yield lower, digest
    finally:
        shutil.rmtree(lower.parent, ignore_errors=True)


# Each change copies up dir/big and says where its copy lands in the upper.
TRIGGERS = {
    "chmod": lambda point: (os.chmod(point / "dir/big", 0o600), "dir/big")[1],
    "setxattr": lambda point: (os.setxattr(point / "dir/big", "user.mark", b"1"), "dir/big")[1],
    "link": lambda point: (os.link(point / "dir/big", point / "dir/big-too"), "dir/big-too")[1],
    "truncate": lambda point: (os.truncate(point / "dir/big", (2 << 30) + 1), "dir/big")[1],
    "rename-dir": lambda point: (os.rename(point / "dir", point / "moved"), "moved/big")[1],
}


@pytest.mark.parametrize("trigger", [name if name == "chmod" else pytest.param(name, marks=pytest.mark.slow)
                                     for name in TRIGGERS])      # one 2 GiB copy-up in the default suite
def test_a_metadata_change_of_a_2gib_lower_file_leaves_the_mount_serving(big_lower, mounts, tmp_path, trigger):
    """Attack: chmod (or setxattr, link, truncate, or renaming its directory: changes that write no
    data) of a 2 GiB lower file makes the daemon copy it up; the copy ran on the thread that serves
    every request, so the whole mount hung for the copy's length (9.9 s). Must hold: while the copy
    is in progress (its partial file sits in the work dir), requests on other inodes are answered
    (an xattr read, never cached by the kernel); a change of another file goes through too, except
    during a directory's rename (its tree is copied holding changes back, by design). A change of
    the same file waits for the copy (it returns with the whole copy in place); the copy is exact."""
    lower, big_digest = big_lower
    point, upper, work, _ = writable_mount(mounts, tmp_path, lower)
    done = threading.Event()
    errors, landed = [], []

    def change_big():
        try:
            landed.append(TRIGGERS[trigger](point))
        except OSError as exc:
            errors.append(exc)
        finally:
            done.set()

    def during_copy(request) -> bool:
        """Whether ``request`` was answered while one and the same partial copy stayed in the work dir."""
        copying = partial_copies(work)
        request()
        return bool(copying) and partial_copies(work) == copying and not done.is_set()

    os.stat(point / "small")
    os.stat(point / "other-0")      # looked up now: a rename holds its directory's lock in the kernel
    worker = threading.Thread(target=change_big)
    worker.start()
    served_during_copy = changed_during_copy = False
    same_file_waited = None
    try:
        while not done.is_set() and not partial_copies(work):
            pass
        while not done.is_set() and not (served_during_copy and changed_during_copy):
            if not served_during_copy:
                served_during_copy = during_copy(lambda: os.getxattr(point / "small", "user.layermount.layer"))
            else:
                changed_during_copy = during_copy(lambda: os.chmod(point / "other-0", 0o640))
        if not done.is_set() and trigger != "rename-dir":
            os.utime(point / "dir/big", ns=(1, 10**18))              # the same inode: waits for the copy
            same_file_waited = os.path.exists(upper / "dir/big") and os.stat(upper / "dir/big").st_size >= 2 << 30
    finally:
        worker.join()
    assert not errors, errors
    assert served_during_copy, "no request on another inode was answered while the copy ran"
    assert changed_during_copy == (trigger != "rename-dir"), "changes of other files: wrong policy"
    assert same_file_waited in (True, None), "a change of the same file ran before its copy was in place"
    assert os.stat(point / "other-0").st_mode & 0o777 == 0o640
    assert partial_copies(work) == []
    copy = upper / landed[0]
    if trigger == "truncate":
        assert copy.stat().st_size == (2 << 30) + 1
    else:
        assert sha256_of(copy) == big_digest


def test_chmod_of_a_sparse_8tib_lower_file_keeps_its_holes(tmpfs, mounts, tmp_path):
    """Attack: a layer holds an 8 TiB sparse file (it unpacks fine, a few KiB on disk); one chmod
    copies it up and the copy wrote the holes as zeros, filling the disk. Must hold: the copy keeps
    its holes (a few blocks), the same size, and the data where it was. The upper lives on a 64 MiB
    tmpfs, so a regression fails with ENOSPC instead of filling this machine's disk."""
    lower = tmp_path / "lower"
    lower.mkdir()
    size = 8 << 40
    with open(lower / "sparse", "wb") as handle:
        handle.truncate(size)
        handle.seek(1 << 30)
        handle.write(b"middle" * 100)
        handle.seek(size - 4096)
        handle.write(b"tail")
    small = tmpfs("upperfs", "size=64m,mode=0755")
    point, upper, _, _ = writable_mount(mounts, small, lower)
    os.chmod(point / "sparse", 0o600)
    copy = os.stat(upper / "sparse")
    assert copy.st_size == size
    assert copy.st_blocks * 512 <= 1 << 20, f"{copy.st_blocks * 512} bytes on disk: holes were written"
    with open(point / "sparse", "rb") as handle:
        handle.seek(1 << 30)
        assert handle.read(600) == b"middle" * 100
        handle.seek(size - 4096)
        assert handle.read(8) == b"tail" + b"\0" * 4
        handle.seek(1 << 40)
        assert handle.read(16) == b"\0" * 16


# ---- 13: EMFILE in the middle of a hardlinked copy-up ----------------------------------

def test_emfile_during_a_hardlinked_copy_up_leaves_both_names_agreeing(mounts, tmp_path):
    """Attack: the daemon runs out of fds (another user holding files open on an --allow-other
    mount does this) while it copies up one name of a hardlinked lower file; the first name was
    renamed into the upper and linking the second failed, so the write that followed changed one
    name and the other kept the old data, also after a remount. Must hold: a copy-up of all names
    is all or nothing; whichever fd limit the daemon hits, once a write goes through both names
    show it, through the mount and after a remount."""
    lower = tmp_path / "lower"
    (lower / "a").mkdir(parents=True)
    (lower / "b/c").mkdir(parents=True)
    (lower / "a/file").write_bytes(b"old data")
    os.link(lower / "a/file", lower / "b/c/link")
    point, upper, _, spec = writable_mount(mounts, tmp_path, lower)
    pid = daemon_pid(str(point))
    assert pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    failures = 0
    try:
        for spare in range(16):
            os.stat(point / "a/file")                            # looked up while fds are plenty
            open_now = len(os.listdir(f"/proc/{pid}/fd"))
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_now + spare, hard))
            try:
                with open(point / "a/file", "r+b") as handle:
                    handle.write(b"NEW")
                break
            except OSError as exc:
                assert exc.errno == errno.EMFILE, exc
                failures += 1
            finally:
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        else:
            pytest.fail("the write never went through")
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert failures, "the fd limit never bit: the test did not squeeze the copy-up"
    assert (point / "a/file").read_bytes() == b"NEW data"
    assert (point / "b/c/link").read_bytes() == b"NEW data"
    assert os.stat(upper / "a/file").st_ino == os.stat(upper / "b/c/link").st_ino   # one file on disk
    mounts.umount(point)
    point = mounts.mount("-o", spec, mountpoint=point, store=False)
    assert (point / "a/file").read_bytes() == b"NEW data"
    assert (point / "b/c/link").read_bytes() == b"NEW data"
    assert os.stat(point / "a/file").st_ino == os.stat(point / "b/c/link").st_ino


# ---- 17: trusted.* and the store paths shown to everyone -------------------------------

def test_trusted_xattrs_and_the_stack_are_hidden_from_other_users(shared_dir, mounts):
    """Attack: nobody, on root's --allow-other mount, lists a file's xattrs and reads the root's
    user.layermount.stack: the names of root's trusted.* attributes and the store's host paths came
    through. Must hold: nobody sees no trusted.* name and no stack (ENODATA); root still sees both,
    and nobody still sees the file's user.* attributes and which layer provides it."""
    image = shared_dir / "image.tar"
    write_image(image, [layer_tar([Dir("etc"), File("etc/motd", b"hello\n", mode=0o644)])],
                new_config(["add motd"]), repo_tag="attack:xattrs")
    image.chmod(0o644)
    point = shared_dir / "mnt"
    point.mkdir()
    mounts.mount(image, "--allow-other", "-q", mountpoint=point)
    os.setxattr(point / "etc/motd", "trusted.root-only", b"secret")
    os.setxattr(point / "etc/motd", "user.note", b"public")
    assert "trusted.root-only" in os.listxattr(point / "etc/motd")
    assert b"layers" in os.getxattr(point, "user.layermount.stack")
    probe = ("import os, sys\n"
             "names = os.listxattr(sys.argv[1] + '/etc/motd')\n"
             "print(sorted(names))\n"
             "print(os.getxattr(sys.argv[1] + '/etc/motd', 'user.layermount.layer').decode())\n"
             "try:\n"
             "    print(os.getxattr(sys.argv[1], 'user.layermount.stack').decode())\n"
             "except OSError as exc:\n"
             "    print('stack', exc.errno)\n")
    result = subprocess.run([*NOBODY_PYTHON, "-c", probe, str(point)], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "HOME": "/nonexistent"}, timeout=60)
    assert result.returncode == 0, result.stderr
    listed, layer, stack = result.stdout.splitlines()
    assert "trusted.root-only" not in listed and "user.note" in listed, listed
    assert layer, "nobody no longer sees which layer provides a file"
    assert stack == f"stack {errno.ENODATA}", stack


# ---- 4's leftovers: the overlay's own walks and removals --------------------------------

def test_a_deep_tree_left_in_the_work_dir_does_not_stop_the_mount(mounts, tmp_path):
    """Attack: whoever controls a workdir (podman's, or an upper reused from elsewhere) leaves a
    tree 1,200 levels deep in it; the mount empties the work dir at start with a recursive removal,
    which hit RecursionError, and the mount failed. Must hold: the mount comes up, the work dir is
    empty, and nothing outside it was touched."""
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "keep").write_bytes(b"keep")
    (tmp_path / "work").mkdir()
    fd = os.open(tmp_path / "work", os.O_RDONLY | os.O_DIRECTORY)
    try:
        make_deep(fd, DEEP)
    finally:
        os.close(fd)
    point, _, work, _ = writable_mount(mounts, tmp_path, lower)
    assert os.listdir(work) == []
    assert (point / "keep").read_bytes() == b"keep"
    assert os.listdir(lower) == ["keep"]


def test_a_hardlinked_copy_up_walks_a_layer_1200_levels_deep(mounts, tmp_path):
    """Attack: a layer holds a hardlinked file and a tree 1,200 levels deep; copying up one name
    walks the layer for the other names with os.fwalk, which recurses per level (RecursionError:
    the write failed with EIO). Must hold: the write goes through and both names show it."""
    lower = tmp_path / "lower"
    lower.mkdir()
    fd = os.open(lower, os.O_RDONLY | os.O_DIRECTORY)
    try:
        make_deep(fd, DEEP)
    finally:
        os.close(fd)
    (lower / "first").write_bytes(b"old")
    os.link(lower / "first", lower / "second")
    point, _, _, _ = writable_mount(mounts, tmp_path, lower)
    with open(point / "first", "r+b") as handle:
        handle.write(b"new")
    assert (point / "second").read_bytes() == b"new"


def _layer_file_state(path: Path) -> tuple:
    st = os.lstat(path)
    return path.read_bytes(), st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ino


@pytest.mark.parametrize("change", ["write", "ftruncate", "fchmod", "fchown", "futimens", "fsetxattr"])
def test_changes_through_an_fd_of_a_deleted_lower_file_never_reach_the_layer(mounts, tmp_path, change):
    """Attack: open a lower file, delete it (a whiteout hides it), then change it through the fd
    still open: write, truncate, chmod, chown, utime, setxattr. The fd now names a file of a
    shared layer that no path of the mount reaches. Kernel overlayfs copies such a file up into
    a private (unnamed) file first. What must hold: the layer's file is untouched (data, mode,
    owner, times, inode), and the fd sees its own change."""
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for path in (lower, upper, work):
        path.mkdir()
    (lower / "f").write_bytes(b"layer data")
    os.chmod(lower / "f", 0o644)
    os.utime(lower / "f", ns=(1_000_000_000, 1_000_000_000))
    before = _layer_file_state(lower / "f")
    point = mounts.mount("-o", f"lowerdir={lower},upperdir={upper},workdir={work}", store=False)
    fd = os.open(point / "f", os.O_RDWR if change in ("write", "ftruncate") else os.O_RDONLY)
    try:
        os.unlink(point / "f")
        if change == "write":
            os.pwrite(fd, b"MINE", 0)
            assert os.pread(fd, 100, 0) == b"MINEr data"
        elif change == "ftruncate":
            os.ftruncate(fd, 2)
            assert os.fstat(fd).st_size == 2
        elif change == "fchmod":
            os.fchmod(fd, 0o4777)
            assert os.fstat(fd).st_mode & 0o7777 == 0o4777
        elif change == "fchown":
            os.fchown(fd, NOBODY, NOBODY)
            assert os.fstat(fd).st_uid == NOBODY
        elif change == "futimens":
            os.utime(fd, ns=(5_000_000_000, 5_000_000_000))
            assert os.fstat(fd).st_mtime_ns == 5_000_000_000
        else:       # xattrs change by path, and a deleted file has none: refused, never misplaced
            with pytest.raises(FileNotFoundError):
                os.setxattr(fd, "user.planted", b"x")
    finally:
        os.close(fd)
    assert _layer_file_state(lower / "f") == before, "a change through a deleted file's fd reached the layer"
    assert os.listxattr(lower / "f") == []
    assert not (point / "f").exists()
    assert os.listdir(work) == [], "the private copy outlived the fd"

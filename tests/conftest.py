"""Fixtures shared by the tests: real mounts through the real CLI, always cleaned up."""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from unionfs import fstree
from unionfs.mount import FSTYPE, daemon_pid, is_mounted, mount_entries

LAYERMOUNT = [sys.executable, "-m", "unionfs"]


def run_layermount(*args, check=False, env=None, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([*LAYERMOUNT, *map(str, args)], capture_output=True, text=True, check=check,
                          env=full_env, timeout=timeout, **kwargs)


def alive(pid: int) -> bool:
    """True while the process runs (a zombie waiting for init to reap it has exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as proc_stat:
            return proc_stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


class Mounts:
    """Mounts made by one test; teardown unmounts them all and kills any daemon left."""

    def __init__(self, tmp_path: Path, store: Path):
        self.tmp_path = tmp_path
        self.store = store
        self.points: list[Path] = []
        self.pids: set[int] = set()

    def mountpoint(self, name: str = "mnt") -> Path:
        point = self.tmp_path / name
        point.mkdir(exist_ok=True)
        return point

    def mount(self, *args, mountpoint: Path | None = None, expect_ok: bool = True, store: bool = True):
        point = mountpoint or self.mountpoint()
        extra = ["--store", self.store] if store else []
        result = run_layermount(*args, point, *extra)
        if is_mounted(str(point)):
            self.points.append(point)
            pid = daemon_pid(str(point))
            if pid:
                self.pids.add(pid)
        if expect_ok:
            assert result.returncode == 0, f"mount failed: {result.stderr}"
            return point
        return result

    def mount_lowers(self, lowers_top_first, *args, mountpoint: Path | None = None, expect_ok: bool = True):
        spec = "lowerdir=" + ":".join(str(path) for path in lowers_top_first)
        return self.mount("-o", spec, *args, mountpoint=mountpoint, expect_ok=expect_ok, store=False)

    def umount(self, point: Path) -> None:
        result = run_layermount("umount", point)
        assert result.returncode == 0, result.stderr

    def cleanup(self) -> None:
        for point in reversed(self.points):
            if is_mounted(str(point)):
                run_layermount("umount", point, timeout=60)
            if is_mounted(str(point)):
                subprocess.run(["fusermount3", "-uz", str(point)], capture_output=True)
        deadline = time.monotonic() + 10
        for pid in self.pids:
            while time.monotonic() < deadline and alive(pid):
                time.sleep(0.05)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def fuse_missing() -> str | None:
    """Why a real FUSE mount cannot be made here, or None when it can."""
    if shutil.which("fusermount3") is None:
        return "FUSE missing: fusermount3 is not installed (scripts/setup installs fuse3)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"FUSE missing: cannot open /dev/fuse ({exc.strerror})"
    return None


# For a test that mounts without the ``mounts`` fixture (which skips by itself).
needs_fuse = pytest.mark.skipif(fuse_missing() is not None, reason=fuse_missing() or "")


HOST_NODES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/dev/full", "/dev/tty")


@contextlib.contextmanager
def host_nodes_restored():
    """The host's device nodes as they were before: what some tool run as root on the host
    (stress-ng's open stressor touches /dev/null), or a failing containment test, changed in
    them must not break the tests after (a 0644 /dev/null breaks podman and every non-root run).
    Yields the stat of each node from before."""
    before = {path: os.stat(path) for path in HOST_NODES if os.path.exists(path)}
    try:
        yield before
    finally:
        for path, st in before.items():
            os.chmod(path, st.st_mode & 0o7777)
            os.chown(path, st.st_uid, st.st_gid)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def mounts(tmp_path, store_dir):
    missing = fuse_missing()
    if missing:
        pytest.skip(missing)
    manager = Mounts(tmp_path, store_dir)
    try:
        yield manager
    finally:
        manager.cleanup()


@pytest.fixture(autouse=True, scope="session")
def no_mount_left_behind(tmp_path_factory):
    """Fails the run if any test left a layermount mount below pytest's temp dirs (and removes it)."""
    base = str(tmp_path_factory.getbasetemp())
    yield
    left = [point for point, kind in mount_entries() if kind == FSTYPE and point.startswith(base)]
    for point in left:
        subprocess.run(["fusermount3", "-uz", point], capture_output=True)
    _remove_deep_trees(Path(base))
    assert not left, f"tests left layermount mounts behind: {sorted(left)}"


def pytest_configure(config):
    """Before pytest deletes its old temp dirs (with the recursive shutil.rmtree): remove, with fstree,
    the half-deleted ``garbage-*`` dirs a killed or crashed earlier run left, which may hold an attack
    test's 2,000-level tree and would end this run with RecursionError before any test ran."""
    if config.option.basetemp:
        return
    root = Path(tempfile.gettempdir()) / f"pytest-of-{getpass.getuser()}"
    if root.is_dir() and not root.is_symlink():
        for garbage in root.glob("garbage-*"):
            if garbage.is_dir() and not garbage.is_symlink():
                fstree.remove_tree(garbage)


def _remove_deep_trees(base: Path, deep: int = 400) -> None:
    """Remove each test's temp dir that holds a tree deeper than ``deep`` levels (the attack tests make them).

    pytest deletes old temp dirs with the recursive shutil.rmtree, which dies with RecursionError on
    such a tree and takes the next run (CI's included) down with it; fstree removes any depth.
    """
    for test_dir in base.iterdir():
        if test_dir.is_symlink() or not test_dir.is_dir():
            continue
        fd = os.open(test_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            too_deep = any(entry.relpath.count("/") >= deep for entry in fstree.walk(fd))
        except OSError:
            too_deep = True
        finally:
            os.close(fd)
        if too_deep:
            fstree.remove_tree(test_dir)

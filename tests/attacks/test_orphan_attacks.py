"""Attacks on the files the daemon keeps for the kernel: a removed file that someone still holds
(an O_PATH handle, a cwd) lives on by one daemon fd until the kernel forgets it.

Holding costs the holder an fd per file as well, but the daemon's fds are one pool for every
user of the mount: running it dry must never make a removal fail or mix two files up.
"""

from __future__ import annotations

import os
import resource
import time

from test_load import overlay_mount
from test_mount import make_tree
from unionfs.mount import daemon_pid

HELD = 24


def test_holding_removed_files_until_the_daemon_runs_out_of_fds_never_fails_a_removal(mounts, tmp_path):
    """Hold many files by O_PATH, with the daemon left a few spare fds, then remove them all.
    Every unlink must succeed; each handle then reaches its own old file or nothing (ENOENT
    where no fd was left to keep it), never another file; and once the handles go, the daemon's
    fd count comes back."""
    lower = make_tree(tmp_path / "lower", {"d/keep": b"keep"})
    point, _ = overlay_mount(mounts, tmp_path, [lower])
    pid = daemon_pid(str(point))
    names = [point / f"d/held{index}" for index in range(HELD)]
    for index, path in enumerate(names):
        path.write_bytes(b"file %d" % index)
    handles = [os.open(path, os.O_PATH) for path in names]
    open_fds = lambda: len(os.listdir(f"/proc/{pid}/fd"))   # noqa: E731
    baseline = open_fds()
    # Fds the daemon may let go of at any time (without OPEN it keeps files by inode) do not count.
    spare = sum(1 for fd in os.listdir(f"/proc/{pid}/fd") if "/held" in _target(pid, fd))
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (baseline - spare + 8, limits[1]))
    try:
        for path in names:
            os.unlink(path)
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
    outcomes = []
    try:
        assert os.listdir(point / "d") == ["keep"]
        for index, handle in enumerate(handles):
            try:
                with open(f"/proc/self/fd/{handle}", "rb") as reopened:
                    outcomes.append(reopened.read())
            except FileNotFoundError:
                outcomes.append(None)
        for index, outcome in enumerate(outcomes):
            assert outcome in (b"file %d" % index, None), f"handle {index} reached {outcome!r}"
        assert None in outcomes, "every file was kept: the daemon never ran out of fds"
        assert any(outcomes), "no file was kept at all"
    finally:
        for handle in handles:
            os.close(handle)
    deadline = time.monotonic() + 10
    while open_fds() > baseline - spare and time.monotonic() < deadline:
        time.sleep(0.01)
    assert open_fds() <= baseline - spare


def _target(pid: int, fd: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return ""



def test_files_deleted_while_open_stay_reachable_when_the_daemon_is_short_of_fds(mounts, tmp_path):
    """Hold 300 files open, delete them all, read 1,100 other files (which fills the daemon's
    cache of fds), then keep writing and reading through the held fds, with the daemon squeezed
    to 450 fds. Without OPEN the daemon keeps each file by inode: its cache of fds must give way
    to the fds that keep deleted files alive (the only thing left that reaches them), so every
    write and read still reaches its own file."""
    others = {f"many/m{index}": b"%d" % index for index in range(1_100)}
    lower = make_tree(tmp_path / "lower", {"d/keep": b"keep", **others})
    point, _ = overlay_mount(mounts, tmp_path, [lower])
    pid = daemon_pid(str(point))
    count = 300
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (450, limits[1]))
    fds = []
    try:
        for index in range(count):
            fd = os.open(point / f"d/f{index}", os.O_RDWR | os.O_CREAT, 0o644)
            fds.append(fd)
            os.write(fd, b"file %d" % index)
        for index in range(count):
            os.unlink(point / f"d/f{index}")
        for rel, data in others.items():
            assert (point / rel).read_bytes() == data
        failures = []
        for index, fd in enumerate(fds):
            try:
                os.pwrite(fd, b"FILE", 0)
                data = os.pread(fd, 100, 0)
                if data != b"FILE %d" % index:
                    failures.append((index, data))
            except OSError as exc:
                failures.append((index, exc.errno))
        assert failures == [], f"{len(failures)} deleted files lost: {failures[:5]}"
        assert os.listdir(point / "d") == ["keep"]
    finally:
        for fd in fds:
            os.close(fd)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)

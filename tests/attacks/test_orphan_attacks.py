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
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (baseline + 8, limits[1]))
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
    while open_fds() > baseline and time.monotonic() < deadline:
        time.sleep(0.01)
    assert open_fds() <= baseline

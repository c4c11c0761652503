"""Which operations reach the daemon at all: what the kernel may cache, it must not ask again.

Counted from libfuse's own request log (``-o debug``, one line per request), so the
count is the kernel's, not what a handler thinks it answered.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from unionfs.fuse_ops import UPPER_ATTR_TIMEOUT

REQUEST_LINE = re.compile(rb"^unique: \d+, opcode: (\S+) \(\d+\), nodeid: (\d+)", re.MULTILINE)


class RequestLog:
    """The requests libfuse logged, read from where the last look stopped."""

    def __init__(self, path: Path):
        self.path = path
        self.seen = 0

    def new(self) -> list[tuple[str, int]]:
        data = self.path.read_bytes()
        fresh, self.seen = data[self.seen:], len(data)
        return [(opcode.decode(), int(nodeid)) for opcode, nodeid in REQUEST_LINE.findall(fresh)]


def writable_mount(mounts, tmp_path: Path) -> tuple[Path, RequestLog]:
    """A writable lowerdir mount whose upper sits on the same filesystem as its lower (the usual case)."""
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    (lower / "dir").mkdir(parents=True)
    (lower / "dir" / "file").write_bytes(b"lower data\n")
    upper.mkdir()
    work.mkdir()
    assert os.stat(lower).st_dev == os.stat(upper).st_dev
    log = tmp_path / "daemon.log"
    point = mounts.mount("-o", f"lowerdir={lower},upperdir={upper},workdir={work},debug", "--log", log,
                         store=False)
    return point, RequestLog(log)


def test_warm_lstat_of_a_lower_entry_stays_in_the_kernel(mounts, tmp_path):
    """A lower entry's attributes are cached for long even when the upper shares its filesystem:
    after the upper's attribute timeout has passed, lstat of a lower file asks the daemon nothing
    about it (only the upper root may be revalidated on the way)."""
    point, requests = writable_mount(mounts, tmp_path)
    target = point / "dir" / "file"
    ino = os.lstat(target).st_ino
    cold = requests.new()
    assert any(opcode == "LOOKUP" for opcode, _ in cold), cold
    time.sleep(UPPER_ATTR_TIMEOUT + 0.3)
    assert os.lstat(target).st_ino == ino
    warm = [(opcode, nodeid) for opcode, nodeid in requests.new() if nodeid != 1]
    assert warm == [], f"a warm lstat of a lower file reached the daemon: {warm}"


def test_a_copied_up_entry_is_asked_again(mounts, tmp_path):
    """The other side of the same rule: once the upper supplies the entry, its short timeout applies."""
    point, requests = writable_mount(mounts, tmp_path)
    target = point / "dir" / "file"
    os.chmod(target, 0o600)
    requests.new()
    time.sleep(UPPER_ATTR_TIMEOUT + 0.3)
    assert os.lstat(target).st_mode & 0o777 == 0o600
    assert any(opcode == "GETATTR" and nodeid != 1 for opcode, nodeid in requests.new())

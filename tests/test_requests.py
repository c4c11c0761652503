"""Which operations reach the daemon at all: what the kernel may cache, it must not ask again.

Counted from libfuse's own request log (``-o debug``, one line per request), so the
count is the kernel's, not what a handler thinks it answered.
"""

from __future__ import annotations

import errno
import os
import re
import time
from pathlib import Path

import pytest

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
    (lower / "dir" / "big").write_bytes(b"b" * 100_000)
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
    for _ in range(3):      # memory reclaim elsewhere on the machine may make the kernel forget it
        time.sleep(UPPER_ATTR_TIMEOUT + 0.3)
        assert os.lstat(target).st_ino == ino
        warm = [(opcode, nodeid) for opcode, nodeid in requests.new() if nodeid != 1]
        if not any("FORGET" in opcode for opcode, _ in warm):
            break
    assert warm == [], f"a warm lstat of a lower file reached the daemon: {warm}"


def test_a_copied_up_entry_is_asked_again(mounts, tmp_path):
    """The other side of the same rule: once the upper supplies the entry, its short timeout applies."""
    point, requests = writable_mount(mounts, tmp_path)
    target = point / "dir" / "file"
    os.chmod(target, 0o600)
    requests.new()
    time.sleep(UPPER_ATTR_TIMEOUT + 0.3)
    assert os.lstat(target).st_mode & 0o777 == 0o600
    # GETATTR, or LOOKUP if memory reclaim made the kernel forget the inode meanwhile
    assert any(opcode in ("GETATTR", "LOOKUP") and nodeid != 1 for opcode, nodeid in requests.new())


def read(path: Path) -> bytes:
    """open, read, close, as a program does (Python's open() adds an isatty ioctl: one more request)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def test_warm_reads_and_listings_of_a_read_only_mount_stay_in_the_kernel(mounts, tmp_path):
    """A read-only mount answers OPEN and OPENDIR with ENOSYS once (patches/pyfuse3-noopen.patch):
    from then on the kernel serves a warm open+read+close and a warm listing from its caches,
    asking the daemon nothing, and a read from the cold cache comes by inode."""
    from unionfs.fuse_ops import NO_OPEN
    assert NO_OPEN, "pyfuse3 without patches/pyfuse3-noopen.patch (scripts/setup builds it)"
    lower = tmp_path / "lower"
    (lower / "dir").mkdir(parents=True)
    for index in range(50):
        (lower / "dir" / f"f{index}").write_bytes(b"%d" % index * 1000)
    log = tmp_path / "daemon.log"
    point = mounts.mount("-o", f"lowerdir={lower},debug", "--log", log, store=False)
    requests = RequestLog(log)
    names = sorted(os.listdir(point / "dir"))
    data = {name: read(point / "dir" / name) for name in names}
    cold = [opcode for opcode, _ in requests.new()]
    assert "READ" in cold and cold.count("OPEN") <= 1 and "RELEASE" not in cold, cold
    assert sorted(os.listdir(point / "dir")) == names
    assert all(read(point / "dir" / name) == content for name, content in data.items())
    assert data["f7"] == b"7" * 1000
    assert requests.new() == []
    for flags in (os.O_WRONLY, os.O_RDWR | os.O_TRUNC):
        with pytest.raises(OSError) as caught:
            os.open(point / "dir" / "f1", flags)
        assert caught.value.errno == errno.EROFS


def opcodes(requests: list[tuple[str, int]]) -> list[str]:
    return [opcode for opcode, _ in requests]


def test_a_writable_mount_copies_up_at_the_first_write_and_asks_nothing_for_warm_reads(mounts, tmp_path):
    """No OPEN on a writable mount either (patches/pyfuse3-noopen.patch): a warm open+read+close
    of a lower file asks nothing; opening it for writing copies nothing until the first write
    does, and the lower file is never written; open(O_TRUNC) comes as a SETATTR that copies up
    without the data; a created file is served by inode like the others."""
    from unionfs.fuse_ops import NO_OPEN
    assert NO_OPEN, "pyfuse3 without patches/pyfuse3-noopen.patch (scripts/setup builds it)"
    point, requests = writable_mount(mounts, tmp_path)
    lower, upper = tmp_path / "lower" / "dir", tmp_path / "upper" / "dir"
    assert read(point / "dir" / "file") == b"lower data\n"
    requests.new()
    assert read(point / "dir" / "file") == b"lower data\n"
    assert [request for request in requests.new() if request[1] != 1] == []

    fd = os.open(point / "dir" / "file", os.O_WRONLY)
    try:
        assert not (upper / "file").exists(), "copied up at open, before anything was written"
        os.pwrite(fd, b"LOWER", 0)
    finally:
        os.close(fd)
    assert (upper / "file").read_bytes() == b"LOWER data\n"
    assert (lower / "file").read_bytes() == b"lower data\n"
    assert read(point / "dir" / "file") == b"LOWER data\n"

    os.close(os.open(point / "dir" / "big", os.O_WRONLY | os.O_TRUNC))
    assert os.stat(point / "dir" / "big").st_size == 0
    assert (upper / "big").stat().st_size == 0 and (lower / "big").stat().st_size == 100_000

    fd = os.open(point / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    try:
        os.write(fd, b"made")
    finally:
        os.close(fd)
    assert read(point / "new") == b"made"
    seen = opcodes(requests.new())
    assert "OPEN" not in seen and "SETATTR" in seen and "CREATE" in seen and "WRITE" in seen, seen

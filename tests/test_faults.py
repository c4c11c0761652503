"""Faults, through real mounts and ordinary syscalls: nothing written is lost, nothing escapes.

kill -9 of the daemon during heavy writes and in the middle of a large copy-up, an upper
filesystem that runs out of blocks or inodes, layers damaged behind the daemon's back, an
exception inside a handler, SIGTERM/SIGINT, and ``store gc`` next to a live mount.

Every test mounts through the real CLI (the ``mounts`` fixture unmounts whatever is left);
tmpfs mounts made here go through the ``tmpfs`` fixture, which unmounts them after the
layermount mounts on top of them are gone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyfuse3
import pytest
import trio

import images
from conftest import alive, run_layermount
from test_mount import make_tree
from unionfs.fuse_ops import _fuse_boundary
from unionfs.image.writer import Dir, File
from unionfs.mount import daemon_pid, is_mounted
from unionfs.store import LayerStore

TESTS = Path(__file__).resolve().parent


# ---- helpers -------------------------------------------------------------------------

def wait_until(condition, timeout: float = 10.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def answers(point: Path, timeout: float = 5.0) -> bool:
    """The mount answers a listing (always a request to the daemon) within ``timeout``."""
    try:
        return subprocess.run(["ls", "-a", str(point)], capture_output=True, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def kill9(point: Path) -> int:
    """SIGKILL the daemon of ``point``; return once it is gone and the mount says ENOTCONN."""
    pid = daemon_pid(str(point))
    assert pid and alive(pid)
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not alive(pid)), f"daemon {pid} survived SIGKILL"
    assert wait_until(lambda: listing_errno(point) == errno.ENOTCONN), listing_errno(point)
    return pid


def listing_errno(point: Path) -> int:
    """0 if the mount lists, else the errno (ECONNABORTED while the kernel aborts the requests in flight)."""
    try:
        os.listdir(point)
    except OSError as exc:
        return exc.errno
    return 0


def umount_dead(point: Path) -> None:
    result = run_layermount("umount", point)
    assert result.returncode == 0, result.stderr
    assert not is_mounted(str(point))


def sha256_file(path: Path, extra: bytes = b"") -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(4 << 20):
            digest.update(chunk)
    digest.update(extra)
    return digest.hexdigest()


def stop(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)


@pytest.fixture
def tmpfs(tmp_path):
    """make(name, options) mounts a tmpfs below tmp_path; all are unmounted at teardown.

    Request it before ``mounts`` so its teardown runs after the layermount mounts are gone.
    """
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
            subprocess.run(["mount", "-o", "remount,rw", str(point)], capture_output=True)
            if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(point)], capture_output=True)
            assert not is_mounted(str(point)), f"tmpfs {point} left mounted"


@pytest.fixture
def disposable():
    """Paths (large files, trees) removed at teardown, after the mounts that use them are gone."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# ---- kill -9 during heavy writes ----------------------------------------------------------

WRITERS = 4
LOG_SIZE = 2 << 20   # each writer appends to its own lower file: a threaded copy-up first


def log_data(worker: int) -> bytes:
    return random.Random(f"log{worker}").randbytes(LOG_SIZE)


def file_data(worker: int, index: int) -> bytes:
    seed = worker * 1_000_000 + index
    return random.Random(seed).randbytes(random.Random(-seed).randrange(1, 256 * 1024))


def log_record(worker: int, index: int) -> bytes:
    return b"<%d:%d>" % (worker, index)


def writer(root: str, journal_path: str, worker: int) -> None:
    """One writer process: new files and appends to a lower file, each fsynced, then journaled."""
    journal = os.open(journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    try:
        os.makedirs(f"{root}/w{worker}", exist_ok=True)
        log = os.open(f"{root}/logs/log{worker}", os.O_WRONLY | os.O_APPEND)
        index = 0
        while True:
            fd = os.open(f"{root}/w{worker}/f{index}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            write_all(fd, file_data(worker, index))
            os.fsync(fd)
            os.close(fd)
            os.write(journal, b"file %d %d\n" % (worker, index))
            write_all(log, log_record(worker, index))
            os.fsync(log)
            os.write(journal, b"log %d %d\n" % (worker, index))
            index += 1
    except OSError as exc:   # the daemon is gone: ENOTCONN / ECONNABORTED
        print(errno.errorcode.get(exc.errno, exc.errno), file=sys.stderr)


def spawn_writer(point: Path, journal: Path, worker: int) -> subprocess.Popen:
    code = "import sys, test_faults; test_faults.writer(sys.argv[1], sys.argv[2], int(sys.argv[3]))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", code, str(point), str(journal), str(worker)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def journal_entries(journal: Path) -> list[tuple[str, int, int]]:
    if not journal.exists():
        return []
    entries = []
    for line in journal.read_text().splitlines():
        kind, worker, index = line.split()
        entries.append((kind, int(worker), int(index)))
    return entries


def test_kill9_during_heavy_writes_loses_nothing_fsynced(mounts, tmp_path):
    layers = [[Dir("logs")] + [File(f"logs/log{w}", log_data(w)) for w in range(WRITERS)],
              [File("etc/marker", b"top layer\n")]]
    image = images.build(tmp_path / "image.tar", layers=layers, compression="none")
    upper = tmp_path / "upper"
    point = mounts.mount(image, "--upper", upper, "-q")
    journal = tmp_path / "journal"
    procs = [spawn_writer(point, journal, worker) for worker in range(WRITERS)]
    try:
        assert wait_until(lambda: len(journal_entries(journal)) >= 80, timeout=60), "writers made no progress"
        kill9(point)
        for proc in procs:
            proc.wait(timeout=30)
    finally:
        stop(procs)
    umount_dead(point)

    entries = journal_entries(journal)
    # No partial copy-up in the upper: a copied-up log is the whole lower file plus appends.
    for worker in range(WRITERS):
        copy = upper / "diff" / "logs" / f"log{worker}"
        if copy.exists():
            assert copy.read_bytes()[:LOG_SIZE] == log_data(worker), f"log{worker}: partial copy-up in the upper"

    point = mounts.mount(image, "--upper", upper, "-q", mountpoint=point)
    assert os.listdir(upper / "work") == [], "the work dir still holds an interrupted copy"
    for kind, worker, index in entries:
        if kind == "file":
            assert (point / f"w{worker}/f{index}").read_bytes() == file_data(worker, index), \
                f"w{worker}/f{index}: fsynced data lost"
    for worker in range(WRITERS):
        done = [index for kind, w, index in entries if kind == "log" and w == worker]
        if not done:
            continue
        last = max(done)
        content = (point / f"logs/log{worker}").read_bytes()
        synced = log_data(worker) + b"".join(log_record(worker, i) for i in range(last + 1))
        assert content.startswith(synced), f"logs/log{worker}: fsynced appends lost"
        possible = synced + b"".join(log_record(worker, i) for i in range(last + 1, last + 3))
        assert possible.startswith(content), f"logs/log{worker}: unexpected bytes after the appends"
    assert (point / "etc/marker").read_bytes() == b"top layer\n"
    (point / "after-remount").write_bytes(b"still writable")
    assert (point / "after-remount").read_bytes() == b"still writable"


# ---- kill -9 during the copy-up of a large lower file ------------------------------------

BIG = 200 << 20
APPEND = b"APPENDED"
APPENDER = ("import os, sys\n"
            "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)\n"
            "os.write(fd, b'APPENDED'); os.fsync(fd); os.close(fd)\n"
            "print('appended')\n")


def make_big_file(path: Path) -> str:
    """BIG bytes of real (incompressible, non-sparse) data; returns its sha256."""
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        for _ in range(BIG // (4 << 20)):
            chunk = os.urandom(4 << 20)
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def first_staged_copy(work: Path, proc: subprocess.Popen, timeout: float = 60.0) -> tuple[str, int] | None:
    """Poll the work dir until a copy-up shows up in it; (name, size seen), or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with os.scandir(work) as scan:
            for entry in scan:
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_file(follow_symlinks=False) and (size := entry.stat().st_size) > 0:
                        return entry.name, size
    return None


def test_kill9_during_copy_up_of_a_large_file_leaves_no_partial_copy(disposable, mounts, tmp_path):
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    disposable.extend([lower, upper, work])
    lower_sha = make_big_file(lower / "big" / "file")
    appended_sha = sha256_file(lower / "big" / "file", APPEND)
    upper.mkdir()
    work.mkdir()
    spec = f"lowerdir={lower},upperdir={upper},workdir={work}"
    point = mounts.mount("-o", spec, store=False)

    appender = subprocess.Popen([sys.executable, "-c", APPENDER, str(point / "big" / "file")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        staged = first_staged_copy(work, appender)
        kill9(point)
        out, _ = appender.communicate(timeout=30)
    finally:
        stop([appender])
    assert staged is not None, "the copy-up never showed in the work dir"
    print(f"killed the daemon with {staged[1] / 2**20:.1f} MiB of {BIG >> 20} MiB copied into {staged[0]}")
    completed = b"appended" in out
    umount_dead(point)

    copy = upper / "big" / "file"
    if copy.exists():   # only a complete copy may be in the upper, never a partial one
        assert copy.stat().st_size in (BIG, BIG + len(APPEND))
        assert sha256_file(copy) in ((appended_sha,) if completed else (lower_sha, appended_sha))
    else:
        assert not completed
    point = mounts.mount("-o", spec, mountpoint=point, store=False)
    assert os.listdir(work) == [], "the remount left the interrupted copy in the work dir"
    assert sha256_file(point / "big" / "file") in ((appended_sha,) if completed else (lower_sha, appended_sha))

    # A copy-up that completes, appended to and fsynced, survives a kill right after.
    if not completed:
        done = subprocess.run([sys.executable, "-c", APPENDER, str(point / "big" / "file")],
                              capture_output=True, text=True, timeout=120)
        assert done.stdout.strip() == "appended", done.stderr
    kill9(point)
    umount_dead(point)
    assert sha256_file(upper / "big" / "file") == appended_sha
    point = mounts.mount("-o", spec, mountpoint=point, store=False)
    assert os.listdir(work) == []
    assert sha256_file(point / "big" / "file") == appended_sha


# ---- a full upper filesystem --------------------------------------------------------------

def fill(point: Path, name: str) -> int:
    """Write into a new file until the upper is full; the errno that stopped it."""
    fd = os.open(point / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    chunk = b"f" * (256 << 10)
    try:
        for _ in range(10_000):
            os.write(fd, chunk)
    except OSError as exc:
        return exc.errno
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return 0


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def append(path: Path, data: bytes) -> None:
    """open, write, close, unbuffered: a copy-up fails at open (OPEN) or at the first write (no OPEN)."""
    with open(path, "ab", buffering=0) as handle:
        handle.write(data)


def expect_errno(number: int, action) -> None:
    with pytest.raises(OSError) as caught:
        action()
    assert caught.value.errno == number, f"expected {errno.errorcode[number]}, got {caught.value!r}"


def test_full_upper_fails_with_enospc_keeps_what_was_written_and_recovers(tmpfs, mounts, tmp_path):
    small = tmpfs("small", "size=8m,mode=0755")
    big_data = random.Random("big").randbytes(5 << 20)
    image = images.build(tmp_path / "image.tar", compression="none", layers=[
        [File("big", big_data), File("small", b"small lower"), Dir("d"), File("d/x", b"x")]])
    upper = small / "up"
    point = mounts.mount(image, "--upper", upper, "-q")
    keep = random.Random("keep").randbytes(1 << 20)
    with open(point / "keep", "wb") as handle:
        handle.write(keep)
        handle.flush()
        os.fsync(handle.fileno())

    assert fill(point, "filler") == errno.ENOSPC
    # Copy-ups need room too: they fail whole, leaving neither a copy nor a temp file behind.
    expect_errno(errno.ENOSPC, lambda: append(point / "big", b"+"))
    expect_errno(errno.ENOSPC, lambda: append(point / "small", b"!"))
    assert fill(point, "more") == errno.ENOSPC
    assert not (upper / "diff" / "big").exists() and not (upper / "diff" / "small").exists()
    assert os.listdir(upper / "work") == []

    # The mount stays usable: reads, listings, stats; nothing written is damaged.
    assert answers(point)
    assert (point / "big").read_bytes() == big_data
    assert (point / "small").read_bytes() == b"small lower"
    assert (point / "keep").read_bytes() == keep
    assert sorted(os.listdir(point)) == ["big", "d", "filler", "keep", "more", "small"]

    os.unlink(point / "filler")
    os.unlink(point / "more")
    # A deleted file's blocks go when the kernel forgets its inode: the FORGET is queued as the
    # unlink returns, but served beside the next requests, not necessarily before them.
    assert wait_until(lambda: free_bytes(small) > 6 << 20), "the deleted files' space never came back"
    with open(point / "big", "ab") as handle:   # a 5 MB copy-up fits again
        handle.write(b"+tail")
    with open(point / "small", "ab") as handle:
        handle.write(b"!")
    (point / "new").write_bytes(b"n" * 100_000)
    os.mkdir(point / "newdir")
    os.rename(point / "d/x", point / "newdir/x")
    expected = {"big": big_data + b"+tail", "small": b"small lower!", "keep": keep, "new": b"n" * 100_000,
                "newdir/x": b"x"}
    for rel, data in expected.items():
        assert (point / rel).read_bytes() == data, rel
    mounts.umount(point)
    point = mounts.mount(image, "--upper", upper, "-q", mountpoint=point)
    assert os.listdir(upper / "work") == []
    for rel, data in expected.items():
        assert (point / rel).read_bytes() == data, rel
    assert not (point / "d/x").exists()


def test_failed_rename_on_an_upper_out_of_inodes_changes_nothing(tmpfs, mounts, tmp_path):
    small = tmpfs("inodes", "size=8m,nr_inodes=64,mode=0755")
    lower = make_tree(tmp_path / "lower", {"d/g": b"lower g", "d/keep": b"keep"})
    (small / "upper").mkdir()
    (small / "work").mkdir()
    spec = f"lowerdir={lower},upperdir={small / 'upper'},workdir={small / 'work'}"
    point = mounts.mount("-o", spec, store=False)
    with open(point / "d/g", "ab") as handle:   # g now lives in the upper
        handle.write(b" changed")
    os.mkdir(point / "fill")
    with pytest.raises(OSError) as full:
        for index in range(10_000):
            os.close(os.open(point / f"fill/{index}", os.O_WRONLY | os.O_CREAT, 0o644))
    assert full.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as caught:   # the whiteout left at d/g needs an inode there is none of
        os.rename(point / "d/g", point / "d/g2")
    assert caught.value.errno == errno.ENOSPC
    expected = {"g": b"lower g changed", "keep": b"keep"}

    def check(root: Path) -> None:
        assert sorted(os.listdir(root / "d")) == sorted(expected)
        for name, data in expected.items():
            assert (root / "d" / name).read_bytes() == data, name

    check(point)
    mounts.umount(point)
    point = mounts.mount("-o", spec, mountpoint=point, store=False)
    check(point)


# ---- layers damaged behind the daemon's back; exceptions in handlers -------------------------

def layer_dir_of(store_dir: Path, point: Path, rel: str) -> Path:
    """The store directory of the layer that provides ``rel`` in the mount."""
    diff_id = os.getxattr(point / rel, "user.layermount.layer").decode()
    return Path(LayerStore(store_dir).layer(diff_id).path)


def scratch_upper(store_dir: Path) -> Path:
    found = [path for path in (store_dir / "tmp").iterdir() if path.name.startswith("mount-")]
    assert len(found) == 1, found
    return found[0]


def test_lower_file_removed_from_the_store_fails_that_file_only(mounts, tmp_path, store_dir):
    image = images.build(tmp_path / "image.tar")
    log = tmp_path / "daemon.log"
    point = mounts.mount(image, "-q", "--log", log)
    pid = daemon_pid(str(point))
    assert (point / "etc/app.conf").read_bytes() == b"conf=1\n"
    os.unlink(layer_dir_of(store_dir, point, "etc/app.conf") / "etc/app.conf")
    # The merged listing still names the file (cached). Reading it may still give what the kernel
    # or the daemon holds of it (without OPEN both keep it by inode), never anything else;
    # copying it up must fail cleanly.
    try:
        assert (point / "etc/app.conf").read_bytes() == b"conf=1\n"
    except FileNotFoundError:
        pass
    with pytest.raises(OSError) as caught:
        append(point / "etc/app.conf", b"x")
    assert caught.value.errno == errno.ENOENT, caught.value   # the layer's file is gone, not broken
    upper = scratch_upper(store_dir)
    assert not (upper / "diff/etc/app.conf").exists() and os.listdir(upper / "work") == []
    assert alive(pid) and answers(point)
    assert (point / "etc/os-release").read_bytes() == b"ID=demo\n"
    with open(point / "etc/os-release", "ab") as handle:
        handle.write(b"X=1\n")
    assert (point / "etc/os-release").read_bytes() == b"ID=demo\nX=1\n"
    assert "Traceback" not in log.read_text()


def test_lower_dir_swapped_for_a_host_symlink_exposes_nothing(mounts, tmp_path):
    secret = make_tree(tmp_path / "host", {"passwd": b"host secret"})
    lower = make_tree(tmp_path / "lower", {"etc/passwd": b"image passwd", "etc/sub/f": b"f", "usr/x": b"x"})
    point = mounts.mount_lowers([lower])
    pid = daemon_pid(str(point))
    assert (point / "etc/passwd").read_bytes() == b"image passwd"
    os.rename(lower / "etc", tmp_path / "etc.moved")
    os.symlink(secret, lower / "etc")
    with open("/proc/sys/vm/drop_caches", "w") as drop:
        drop.write("3\n")
    for attempt in (lambda: (point / "etc/passwd").read_bytes(), lambda: os.listdir(point / "etc"),
                    lambda: os.listdir(point / "etc/sub"), lambda: (point / "etc/sub/f").read_bytes()):
        with pytest.raises(OSError) as caught:   # never the host's data: the daemon resolves no symlink
            seen = attempt()
            pytest.fail(f"the swapped directory was served: {seen!r}")
        assert caught.value.errno == errno.ELOOP, caught.value
    assert alive(pid) and answers(point)
    assert (point / "usr/x").read_bytes() == b"x"


def deep_lower(root: Path, depth: int) -> None:
    """``d/d/.../d/leaf`` ``depth`` directories down, made with dir fds (no long paths)."""
    root.mkdir(parents=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"leaf")
        os.close(leaf)
    finally:
        os.close(fd)


DEPTH = 1500   # beyond Python's default recursion limit; the path (3 KB) stays below PATH_MAX


@pytest.fixture
def deep_mount(mounts, tmp_path):
    deep_lower(tmp_path / "lower", DEPTH)
    (tmp_path / "upper").mkdir()
    (tmp_path / "work").mkdir()
    log = tmp_path / "daemon.log"
    point = mounts.mount("-o", f"lowerdir={tmp_path / 'lower'},upperdir={tmp_path / 'upper'},"
                         f"workdir={tmp_path / 'work'}", "--log", log, store=False)
    try:
        yield point, point / "/".join(["d"] * DEPTH) / "leaf", log
    finally:
        if is_mounted(str(point)):
            run_layermount("umount", point)
        # pytest's own clean-up (shutil.rmtree) recurses per level and gives up on 1500 levels.
        subprocess.run(["rm", "-rf", str(tmp_path / "lower"), str(tmp_path / "upper")], check=False)


def test_handler_exception_is_an_errno_for_that_request_and_logged(caplog):
    """Any exception but FUSEError would end pyfuse3.main(): the boundary answers EIO and logs it.

    (Through a real mount this was a RecursionError on a copy-up 1500 directories deep; that is
    fixed, so the boundary is exercised directly here, and the daemon's survival of failing
    requests is shown by the fault tests around it.)
    """
    @_fuse_boundary
    async def broken(*args):
        raise RecursionError("too deep")

    with caplog.at_level(logging.ERROR, logger="layermount"):
        with pytest.raises(pyfuse3.FUSEError) as caught:
            trio.run(broken)
    assert caught.value.errno == errno.EIO
    assert "internal error in broken" in caplog.text and "RecursionError" in caplog.text


def test_copy_up_deep_below_many_lower_directories_works(deep_mount):
    point, leaf, log = deep_mount
    try:
        with open(leaf, "ab") as handle:
            handle.write(b"+more")
    except OSError as exc:
        pytest.fail(f"append {DEPTH} lower directories down: {exc.strerror}")
    assert leaf.read_bytes() == b"leaf+more"


def test_rename_of_a_deep_lower_directory_works(deep_mount):
    """Renaming a lower directory copies its tree up; 1500 levels must not exhaust a recursion."""
    point, leaf, log = deep_mount
    os.rename(point / "d", point / "moved")
    moved_leaf = point / "moved" / "/".join(["d"] * (DEPTH - 1)) / "leaf"
    assert moved_leaf.read_bytes() == b"leaf"
    assert not (point / "d").exists()


def test_lower_file_swapped_for_a_fifo_does_not_hang_the_mount(mounts, tmp_path):
    """The daemon must refuse the FIFO (EIO: the file it listed changed type), not block opening it."""
    lower = make_tree(tmp_path / "lower", {"data/f": b"file", "data/other": b"other"})
    point = mounts.mount_lowers([lower])
    assert os.stat(point / "data/f").st_size == 4   # the kernel now caches it as a regular file
    os.unlink(lower / "data/f")
    os.mkfifo(lower / "data/f")
    reader = subprocess.Popen(["cat", str(point / "data/f")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while reader.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reader.poll() is not None, "opening the swapped file is still blocked: the daemon opened the FIFO"
        assert reader.returncode == 1 and b"Input/output error" in reader.stderr.read()
        assert answers(point), "the mount stopped answering"
        assert (point / "data/other").read_bytes() == b"other"
    finally:
        # Unblock a daemon stuck opening the FIFO, so the mount can be unmounted.
        deadline = time.monotonic() + 10
        while reader.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                os.close(os.open(lower / "data/f", os.O_WRONLY | os.O_NONBLOCK))
            time.sleep(0.05)
        stop([reader])


def test_upper_made_read_only_behind_the_daemon_gives_erofs_and_recovers(tmpfs, mounts, tmp_path):
    fs = tmpfs("upperfs", "size=16m,mode=0755")
    image = images.build(tmp_path / "image.tar")
    point = mounts.mount(image, "--upper", fs / "up", "-q")
    pid = daemon_pid(str(point))
    (point / "before").write_bytes(b"written before")
    # Until the daemon closes its write fd (RELEASE comes after close(2) returns; without OPEN,
    # a second without writes), remounting read-only is EBUSY.
    assert wait_until(lambda: subprocess.run(["mount", "-o", "remount,ro", str(fs)],
                                             capture_output=True).returncode == 0), "the upper stayed busy"
    try:
        expect_errno(errno.EROFS, lambda: (point / "new").write_bytes(b"x"))
        expect_errno(errno.EROFS, lambda: append(point / "etc/passwd", b"x"))
        expect_errno(errno.EROFS, lambda: os.mkdir(point / "newdir"))
        expect_errno(errno.EROFS, lambda: os.unlink(point / "etc/os-release"))
        assert alive(pid) and answers(point)
        assert (point / "before").read_bytes() == b"written before"
        assert (point / "etc/os-release").read_bytes() == b"ID=demo\n"
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(fs)], check=True)
    (point / "new").write_bytes(b"x")
    with open(point / "etc/passwd", "ab") as handle:
        handle.write(b"user:x:1000:1000::/home/user:/bin/sh\n")
    assert (point / "new").read_bytes() == b"x"
    assert sorted(os.listdir(point)).count("new") == 1
    assert os.listdir(fs / "up" / "work") == []


# ---- signals ------------------------------------------------------------------------------

@pytest.mark.parametrize("signum,kept_upper", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGTERM-throwaway-upper", "SIGINT-kept-upper"])
def test_signal_unmounts_cleanly_even_while_busy(mounts, tmp_path, store_dir, signum, kept_upper):
    image = images.build(tmp_path / "image.tar")
    upper = tmp_path / "upper"
    point = mounts.mount(image, "-q", *(["--upper", upper] if kept_upper else []))
    pid = daemon_pid(str(point))
    (point / "note").write_bytes(b"kept?")
    busy = open(point / "etc/os-release", "rb")   # an open file keeps the mount busy
    try:
        os.kill(pid, signum)
        assert wait_until(lambda: not is_mounted(str(point)) and not alive(pid)), "still mounted or running"
    finally:
        with contextlib.suppress(OSError):
            busy.close()
    assert os.listdir(point) == []
    assert [path for path in (store_dir / "tmp").iterdir() if path.name.startswith("mount-")] == []
    # The daemon's store locks went with it: gc may now take the layers.
    assert run_layermount("store", "rm", "fixture:latest", "--store", store_dir).returncode == 0
    assert "removed 4 layers" in run_layermount("store", "gc", "--store", store_dir).stdout
    if kept_upper:
        assert (upper / "diff" / "note").read_bytes() == b"kept?"
        assert os.listdir(upper / "work") == []


# ---- store gc next to a live mount ----------------------------------------------------------

def test_gc_during_a_mount_never_removes_a_layer_it_uses(mounts, tmp_path, store_dir):
    base = [Dir("etc"), File("etc/os-release", b"ID=base\n"), Dir("bin"), File("bin/sh", b"#!sh\n")]
    image_a = images.build(tmp_path / "a.tar", tag="a:1", layers=[base, [File("a-only", b"a")]])
    image_b = images.build(tmp_path / "b.tar", tag="b:1", layers=[base, [File("b-only", b"b")]])
    assert run_layermount("unpack", image_b, "--store", store_dir, "-q").returncode == 0
    writable = mounts.mount(image_a, "-q", mountpoint=mounts.mountpoint("rw"))
    read_only = mounts.mount(image_a, "-q", "--read-only", mountpoint=mounts.mountpoint("ro"))
    store = LayerStore(store_dir)
    assert len(store.layers()) == 3
    for tag in ("a:1", "b:1"):
        assert run_layermount("store", "rm", tag, "--store", store_dir).returncode == 0
    scratch = scratch_upper(store_dir)

    errors: list[BaseException] = []
    stop_reading = threading.Event()

    def read_all() -> None:
        while not stop_reading.is_set():
            try:
                for point in (writable, read_only):
                    assert (point / "etc/os-release").read_bytes() == b"ID=base\n"
                    assert (point / "a-only").read_bytes() == b"a"
                    assert {"a-only", "bin", "etc"} <= set(os.listdir(point))
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)
                return

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        outputs = [run_layermount("store", "gc", "--store", store_dir) for _ in range(5)]
        (writable / "written-during-gc").write_bytes(b"w")
    finally:
        stop_reading.set()
        reader.join(timeout=30)
    assert not errors, errors
    assert all(result.returncode == 0 for result in outputs), [result.stderr for result in outputs]
    assert "removed 1 layer," in outputs[0].stdout and outputs[0].stdout.count("in use by a mount") == 2
    assert all("removed 0 layers" in result.stdout for result in outputs[1:])
    assert len(store.layers()) == 2 and scratch.exists()
    with open("/proc/sys/vm/drop_caches", "w") as drop:
        drop.write("3\n")
    for point in (writable, read_only):
        assert (point / "bin/sh").read_bytes() == b"#!sh\n"
    assert (writable / "written-during-gc").read_bytes() == b"w"
    for point in (writable, read_only):
        mounts.umount(point)
    assert "removed 2 layers" in run_layermount("store", "gc", "--store", store_dir).stdout
    assert store.layers() == []

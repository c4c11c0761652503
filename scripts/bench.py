#!/usr/bin/env python3
"""Side-by-side benchmark: kernel overlayfs, fuse-overlayfs and layermount on the same layers, as ratios.

  scripts/bench.py mount [--quick] [--json FILE]   mount, tree walks, reads, stats at 2/64/128 layers
  scripts/bench.py write [--quick] [--json FILE]   creates, a big write, copy-up, rm -rf of a lower tree
  scripts/bench.py unpack [--quick] [--json FILE]  layermount unpack vs GNU tar -xzf, layer after layer
  scripts/bench.py mount-ready [--quick]           mount to ready (median of 20 mounts), and where it goes
  scripts/bench.py stall [--quick] [--json FILE]   chmod of a 2 GiB lower file: its time, others' longest wait
  scripts/bench.py pull [--quick] [--rate MB/S]    layermount pull vs skopeo copy to a layout + unpack of it
  scripts/bench.py requests [--quick] [--json FILE] per-file costs on one flat dir, with a do-nothing
                                                   pyfuse3 floor ("nullfs"); FUSE requests per operation;
                                                   a 20,000-entry merged listdir; daemon RSS after a walk

Run as root (kernel overlayfs and drop_caches need it), e.g. with .venv/bin/python.
The layers are generated into a temp dir (--dir picks where) that is removed at
exit, and every mount is undone at exit, Ctrl-C included. Each number is the
median of 3 runs (1 with --quick). Kernel overlayfs and fuse-overlayfs read
overlay-form copies of the layers (0/0 char device whiteouts, opaque xattr),
layermount the OCI-form originals. A mounter that is missing or fails shows its
error in its column and the others carry on. Each mode is a subcommand, so a
benchmark of `layermount unpack` can join as another one.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
BIG_SIZE = 256 * MiB
TREE_TOPS, DIRS_PER_TOP, FILES_PER_DIR = 4, 250, 20        # 20,000 files in 1,000 dirs
SMALL_FILE_SIZES = (0, 100, 700, 2_000, 4_096, 9_000, 30_000)
STACK_DIRS, STACK_FILES = 100, 100                          # 10,000 paths to stat
STACK_DEPTHS = (2, 64, 128)
CREATE_DIRS, CREATE_FILES, CREATE_SIZE = 50, 100, 1024      # 5,000 new files
FLAT_FILES, FLAT_SIZE = 10_000, 4_096                       # one flat directory of 4 KiB files
MERGED_DIR_FILES = 20_000                                   # one directory spread over 2 layers
RSS_LAYERS, RSS_DIRS, RSS_FILES = 8, 60, 98                 # 8 x 60 x 98 = 47,040 files (+ dirs)
LONG_TIMEOUT = 86_400.0
WHITEOUT_PREFIX, OPAQUE_MARKER, AUFS_META_PREFIX = ".wh.", ".wh..wh..opq", ".wh..wh."


class BenchError(Exception):
    """A mounter or an operation failed; the message goes into that mounter's column."""


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise BenchError(lines[-1] if lines else f"{Path(str(command[0])).name} exited with {result.returncode}")
    return result


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- layers


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.write(data)


def write_big_file(path: Path, block: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        for _ in range(BIG_SIZE // len(block)):
            file.write(block)


def make_image_layers(oci: Path, block: bytes) -> list[str]:
    """base (20,000 small files, one 256 MiB file), mid and top (edits, whiteouts, opaque dir, type change).

    Returns the layer names, top first. tree/t0 (5,000 files) is only in base.
    """
    sizes = random.Random(42)
    view = memoryview(block)
    for top in range(TREE_TOPS):
        for directory in range(DIRS_PER_TOP):
            folder = oci / "base" / "tree" / f"t{top}" / f"d{directory:03d}"
            folder.mkdir(parents=True)
            for index in range(FILES_PER_DIR):
                size = sizes.choice(SMALL_FILE_SIZES)
                offset = sizes.randrange(len(block) - size)
                write_bytes(folder / f"f{index:02d}", view[offset:offset + size])
    write_big_file(oci / "base" / "big" / "big.bin", block)

    mid = oci / "mid"
    for directory in range(0, DIRS_PER_TOP, 5):
        write_bytes(mid / "tree" / "t1" / f"d{directory:03d}" / "f00", view[:3_000])
    for directory in range(0, DIRS_PER_TOP, 10):
        write_bytes(mid / "tree" / "t2" / f"d{directory:03d}" / f"{WHITEOUT_PREFIX}f01", b"")
    write_bytes(mid / "tree" / "t3" / "d000" / OPAQUE_MARKER, b"")
    for index in range(10):
        write_bytes(mid / "tree" / "t3" / "d000" / f"n{index}", view[index:index + 500])
    for index in range(100):
        write_bytes(mid / "extra" / f"e{index:03d}", view[index:index + 1_000])

    top = oci / "top"
    write_bytes(top / "tree" / "t2" / f"{WHITEOUT_PREFIX}d{DIRS_PER_TOP - 1:03d}", b"")
    write_bytes(top / "tree" / "t1" / "d001", b"a file over a directory\n")
    for index in range(10):
        write_bytes(top / "etc" / f"c{index:02d}", f"setting {index}\n".encode())
    return ["top", "mid", "base"]


def make_stack_layers(oci: Path) -> dict[int, list[str]]:
    """A base of 10,000 files under 100 dirs and 127 small layers above it, each touching 3 dirs.

    Returns, per depth, the layer names top first.
    """
    for directory in range(STACK_DIRS):
        folder = oci / "stack" / "base" / f"d{directory:02d}"
        folder.mkdir(parents=True)
        for index in range(STACK_FILES):
            write_bytes(folder / f"f{index:02d}", b"x" * 100)
    for layer in range(1, max(STACK_DEPTHS)):
        for touch in range(3):
            folder = oci / "stack" / f"{layer:03d}" / f"d{(layer * 37 + touch * 11) % STACK_DIRS:02d}"
            write_bytes(folder / f"n{layer:03d}", b"y" * 50)
        write_bytes(oci / "stack" / f"{layer:03d}" / f"d{layer * 37 % STACK_DIRS:02d}"
                    / f"{WHITEOUT_PREFIX}f{layer % STACK_FILES:02d}", b"")
    return {depth: [f"stack/{layer:03d}" for layer in range(depth - 1, 0, -1)] + ["stack/base"]
            for depth in STACK_DEPTHS}


def stat_targets() -> list[str]:
    return [f"d{directory:02d}/f{index:02d}" for directory in range(STACK_DIRS) for index in range(STACK_FILES)]


def to_overlay_form(layer: Path, out: Path) -> None:
    """Copy an OCI-form layer into kernel overlayfs form (whiteouts as 0/0 char devices, opaque xattr)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    run(["cp", "-a", "--no-target-directory", layer, out])
    for directory, dirnames, filenames in os.walk(out):
        markers = [name for name in dirnames + filenames if name.startswith(WHITEOUT_PREFIX)]
        if not markers:
            continue
        times = os.lstat(directory)
        for name in markers:
            os.unlink(os.path.join(directory, name))
            target = name[len(WHITEOUT_PREFIX):]
            if name == OPAQUE_MARKER:
                os.setxattr(directory, "trusted.overlay.opaque", b"y")
            elif not name.startswith(AUFS_META_PREFIX) and target not in ("", ".", ".."):
                os.mknod(os.path.join(directory, target), stat.S_IFCHR, os.makedev(0, 0))
        os.utime(directory, ns=(times.st_atime_ns, times.st_mtime_ns))


@dataclass
class Layers:
    """The generated layers in both forms: ROOT/oci/NAME and ROOT/ovl/NAME."""

    root: Path
    image: list[str]
    stacks: dict[int, list[str]] = field(default_factory=dict)

    def paths(self, form: str, names: list[str]) -> list[Path]:
        return [self.root / form / name for name in names]


def make_layers(root: Path, with_stacks: bool) -> Layers:
    started = time.perf_counter()
    block = os.urandom(MiB)
    layers = Layers(root, make_image_layers(root / "oci", block))
    names = list(layers.image)
    if with_stacks:
        layers.stacks = make_stack_layers(root / "oci")
        names += layers.stacks[max(STACK_DEPTHS)]
    for name in names:
        to_overlay_form(root / "oci" / name, root / "ovl" / name)
    os.sync()
    progress(f"generated {len(names)} layers in both forms under {root} in {time.perf_counter() - started:.1f} s")
    return layers


# ---------------------------------------------------------------- mounters


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
        return [re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), line.split()[4]) for line in info]


def is_mounted(path: Path) -> bool:
    return os.path.realpath(path) in mount_points()


def alive(pid: int) -> bool:
    """True while the process runs (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as proc_stat:
            return proc_stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


class Mounter:
    """Mounts lowers (top first, optionally with upper and work) on a point, and unmounts it."""

    name = ""
    form = "ovl"          # which copy of the layers it reads

    def __init__(self, problem: str | None = None):
        self.problem = problem       # why it cannot run at all, shown in its column


def overlay_options(lowers: list[Path], upper: Path | None, work: Path | None, relative_to: Path | None = None) -> str:
    names = [os.path.relpath(lower, relative_to) if relative_to else str(lower) for lower in lowers]
    options = "lowerdir=" + ":".join(names)
    if upper is not None:
        options += f",upperdir={upper},workdir={work}"
    return options


class KernelOverlay(Mounter):
    name = "kernel overlayfs"

    def mount(self, lowers, point, upper, work):
        """Lowers are named relative to their common parent so 128 layers fit the one-page option limit."""
        base = Path(os.path.commonpath(lowers))
        run(["mount", "-t", "overlay", "overlay", "-o", overlay_options(lowers, upper, work, base), point], cwd=base)

    def unmount(self, point):
        run(["umount", point])


class FuseOverlayfs(Mounter):
    name = "fuse-overlayfs"

    def __init__(self, binary: str | None):
        super().__init__(None if binary else "fuse-overlayfs not found on PATH")
        self.binary = binary
        self.daemons: dict[Path, int] = {}

    def mount(self, lowers, point, upper, work):
        run([self.binary, "-o", overlay_options(lowers, upper, work), point])
        self.daemons[point] = self._daemon_pid(point)

    def mount_logged(self, lowers, point, log: Path):
        """In the foreground with libfuse's request log (-d), for counting requests."""
        with open(log, "wb") as out:
            process = subprocess.Popen([self.binary, "-d", "-o", overlay_options(lowers, None, None), str(point)],
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        wait_mounted(point, process)
        self.daemons[point] = process.pid

    def daemon_pid(self, point):
        return self.daemons.get(point)

    def unmount(self, point):
        run(["fusermount3", "-u", point])
        pid = self.daemons.pop(point, None)
        deadline = time.monotonic() + 30
        while pid and alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)

    @staticmethod
    def _daemon_pid(point: Path) -> int | None:
        """fuse-overlayfs backgrounds itself; find the daemon serving ``point`` by its command line."""
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[:-1]
                    if argv and argv[0].endswith(b"fuse-overlayfs") and argv[-1] == bytes(point):
                        return int(entry)
        return None


class Layermount(Mounter):
    name = "layermount"
    form = "oci"

    def __init__(self, binary: str | None, problem: str | None):
        super().__init__(problem)
        self.binary = binary

    def mount(self, lowers, point, upper, work):
        run([self.binary, "-o", overlay_options(lowers, upper, work), point])

    def mount_logged(self, lowers, point, log: Path):
        run([self.binary, "-o", overlay_options(lowers, None, None) + ",debug", "--log", log, point])

    def unmount(self, point):
        run([self.binary, "umount", point])

    @staticmethod
    def daemon_pid(point):
        return int(os.getxattr(point, "user.layermount.pid"))


class NullFs(Mounter):
    """The floor of the binding: a pyfuse3 filesystem that answers from arithmetic (``null_serve``).

    It shows what the requests benchmark's layers show (``flat/`` with FLAT_FILES files of
    FLAT_SIZE bytes, ``big/`` with the merged directory's names), so every cost above it is the
    overlay's own.
    """

    name = "nullfs floor"

    def __init__(self):
        super().__init__(None)
        self.daemons: dict[Path, subprocess.Popen] = {}

    def mount(self, lowers, point, upper, work, log: Path | None = None):
        out = open(log, "wb") if log else subprocess.DEVNULL
        try:
            process = subprocess.Popen([sys.executable, __file__, "_nullfs", str(point), "debug" if log else "-"],
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        finally:
            if log:
                out.close()
        self.daemons[point] = process
        wait_mounted(point, process)

    def mount_logged(self, lowers, point, log: Path):
        self.mount(lowers, point, None, None, log)

    def unmount(self, point):
        run(["fusermount3", "-u", point])
        process = self.daemons.pop(point, None)
        if process is not None:
            process.wait(timeout=30)

    def daemon_pid(self, point):
        return self.daemons[point].pid


def wait_mounted(point: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while not is_mounted(point):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise BenchError(f"{Path(process.args[0]).name} did not mount {point}")
        time.sleep(0.01)


def null_serve(point: str, debug: bool) -> None:
    """The nullfs daemon: root (1) holds flat (2) and big (3); flat holds f00000 ... (FLAT_SIZE bytes
    each), big the MERGED_DIR_FILES empty files e00000 ... that the merged listdir shows."""
    import errno
    import pyfuse3
    import trio

    data = b"n" * FLAT_SIZE
    dirs = {1: [b"flat", b"big"], 2: [b"f%05d" % index for index in range(FLAT_FILES)],
            3: [b"e%05d" % index for index in range(MERGED_DIR_FILES)]}
    first_ino = {1: 2, 2: 10, 3: 10 + FLAT_FILES}
    file_size = {2: FLAT_SIZE, 3: 0}

    def attr(ino: int) -> "pyfuse3.EntryAttributes":
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = ino
        entry.entry_timeout = entry.attr_timeout = LONG_TIMEOUT
        if ino in dirs:
            entry.st_mode, entry.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            entry.st_mode = stat.S_IFREG | 0o644
            entry.st_size = file_size[2 if ino < first_ino[3] else 3]
            entry.st_blocks = entry.st_size // 512
        return entry

    class NullOperations(pyfuse3.Operations):
        async def lookup(self, parent, name, ctx=None):
            if parent == 1 and name in dirs[1]:
                return attr(2 + dirs[1].index(name))
            if parent in (2, 3) and len(name) == 6 and name[:1] == dirs[parent][0][:1] and name[1:].isdigit() \
                    and int(name[1:]) < len(dirs[parent]):
                return attr(first_ino[parent] + int(name[1:]))
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def getattr(self, inode, ctx=None):
            return attr(inode)

        async def opendir(self, inode, ctx):
            return inode

        async def readdir(self, fh, start_id, token):
            names = dirs[fh]
            for index in range(start_id, len(names)):
                if not pyfuse3.readdir_reply(token, names[index], attr(first_ino[fh] + index), index + 1):
                    return

        async def open(self, inode, flags, ctx):
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

        async def read(self, fh, off, size):
            return data[off:off + size]

    options = set(pyfuse3.default_options) | {"fsname=nullfs"}
    if debug:
        options.add("debug")
    pyfuse3.init(NullOperations(), point, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


def find_layermount(explicit: str | None) -> Layermount:
    """--layermount PATH, else .venv/bin/layermount in this repo, else layermount on PATH."""
    candidates = [explicit] if explicit else [str(REPO / ".venv" / "bin" / "layermount"), shutil.which("layermount")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and os.path.isfile(candidate):
            return Layermount(candidate, None)
    where = explicit or f"{REPO / '.venv/bin/layermount'} or on PATH"
    return Layermount(None, f"not installed ({where})")


class Session:
    """The temp dir and every mount made in it; ``close`` undoes them all."""

    def __init__(self, parent: str | None):
        self.root = Path(tempfile.mkdtemp(prefix="lmbench-", dir=parent)).resolve()
        self.active: dict[Path, Mounter] = {}
        self.counter = 0

    def scratch(self, kind: str) -> Path:
        self.counter += 1
        path = self.root / kind / str(self.counter)
        path.mkdir(parents=True)
        return path

    @contextlib.contextmanager
    def mounted(self, mounter: Mounter, lowers: list[Path], upper: Path | None = None,
                work: Path | None = None, log: Path | None = None) -> Iterator[tuple[Path, float]]:
        """Mount (read-only with libfuse's request log in ``log`` if given); yield the mountpoint
        and the seconds until its root listed; always unmount."""
        point = self.scratch("mnt")
        try:
            started = time.perf_counter()
            try:
                if log is not None:
                    mounter.mount_logged(lowers, point, log)
                else:
                    mounter.mount(lowers, point, upper, work)
            finally:
                if is_mounted(point):
                    self.active[point] = mounter
            os.listdir(point)
            yield point, time.perf_counter() - started
        finally:
            self.unmount(point)

    def unmount(self, point: Path) -> None:
        mounter = self.active.pop(point, None)
        if mounter is not None:
            with contextlib.suppress(BenchError):
                mounter.unmount(point)
        if is_mounted(point):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
        with contextlib.suppress(OSError):
            point.rmdir()

    def close(self) -> None:
        for point in list(self.active):
            self.unmount(point)
        below = [point for point in mount_points() if point.startswith(f"{self.root}/")]
        for point in sorted(below, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        if any(point.startswith(f"{self.root}/") for point in mount_points()):
            progress(f"warning: something is still mounted below {self.root}; left it in place")
            return
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------- operations


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as drop:
        drop.write("3\n")


def timed(operation: Callable, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = operation(*args)
    return time.perf_counter() - started, result


def walk(root: Path) -> int:
    """lstat every entry below root; returns how many there were."""
    count, pending = 0, [str(root)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                entry.stat(follow_symlinks=False)
                count += 1
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
    return count


def read_file(path: str, buffer: bytearray) -> int:
    total = 0
    with open(path, "rb", buffering=0) as file:
        while count := file.readinto(buffer):
            total += count
    return total


def read_tree(root: Path) -> tuple[int, int]:
    """Read every regular file below root; returns (files, bytes)."""
    files, total, pending, buffer = 0, 0, [str(root)], bytearray(MiB)
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += read_file(entry.path, buffer)
                    files += 1
    return files, total


def stat_paths(root: Path, targets: list[str]) -> int:
    """lstat each target; returns how many exist (some are whited out on purpose)."""
    found, prefix = 0, f"{root}/"
    for target in targets:
        with contextlib.suppress(FileNotFoundError):
            os.lstat(prefix + target)
            found += 1
    return found


def create_files(point: Path) -> None:
    payload = b"c" * CREATE_SIZE
    for directory in range(CREATE_DIRS):
        folder = point / "created" / f"c{directory:02d}"
        folder.mkdir(parents=True)
        for index in range(CREATE_FILES):
            fd = os.open(folder / f"f{index:03d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, payload)
            finally:
                os.close(fd)


def write_big(point: Path) -> None:
    block = os.urandom(MiB)
    with open(point / "big-new.bin", "wb", buffering=0) as file:
        for _ in range(BIG_SIZE // MiB):
            file.write(block)


def append_one_byte(point: Path) -> None:
    fd = os.open(point / "big" / "big.bin", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"!")
    finally:
        os.close(fd)


def remove_lower_tree(point: Path) -> None:
    run(["rm", "-rf", point / "tree" / "t0"])


def count_created(point: Path) -> int:
    return sum(len(os.listdir(point / "created" / name)) for name in os.listdir(point / "created"))


WRITE_CASES = {   # row key: (label, operation, what it leaves behind, what that must be)
    "create": ("create 5,000 small files", create_files, count_created, CREATE_DIRS * CREATE_FILES),
    "write_big": ("write one 256 MiB file", write_big, lambda p: os.stat(p / "big-new.bin").st_size, BIG_SIZE),
    "copy_up": ("copy-up: 1-byte append to 256 MiB", append_one_byte,
                lambda p: os.stat(p / "big" / "big.bin").st_size, BIG_SIZE + 1),
    "rm_tree": ("rm -rf of a 5,000-file lower tree", remove_lower_tree,
                lambda p: os.path.lexists(p / "tree" / "t0"), False),
}


# ---------------------------------------------------------------- results


@dataclass
class Row:
    label: str
    unit: str                 # "s" (lower is better), "MiB/s" (higher is better) or "x"
    samples: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    observed: dict[str, object] = field(default_factory=dict)   # what each mounter saw, to cross-check

    def median(self, mounter: str) -> float | None:
        values = self.samples.get(mounter)
        return statistics.median(values) if values and mounter not in self.errors else None


class Results:
    def __init__(self, mounters: list[Mounter]):
        self.mounters = [mounter.name for mounter in mounters]
        self.rows: dict[str, Row] = {}
        self.requests: dict[str, dict[str, str]] = {}   # per mounter: operation -> requests per file

    def row(self, key: str, label: str, unit: str) -> Row:
        return self.rows.setdefault(key, Row(label, unit))

    def run_case(self, mounter: Mounter, keys: list[str], body: Callable[[], dict[str, tuple[float, object]]]) -> None:
        """Run one case for one mounter; any failure becomes that mounter's entry in these rows."""
        if any(mounter.name in self.rows[key].errors for key in keys):
            return
        if mounter.problem:
            for key in keys:
                self.rows[key].errors[mounter.name] = mounter.problem
            return
        progress(f"  {mounter.name}: {', '.join(self.rows[key].label for key in keys)}")
        try:
            values = body()
        except Exception as error:          # one mounter's failure must not stop the others
            message = describe(error)
            progress(f"    failed: {message}")
            for key in keys:
                self.rows[key].errors[mounter.name] = message
            return
        for key, (value, observed) in values.items():
            self.rows[key].samples.setdefault(mounter.name, []).append(value)
            self.rows[key].observed.setdefault(mounter.name, observed)

    def mismatches(self) -> list[str]:
        """Rows where the mounters saw different trees: a speed ratio means little then."""
        notes = []
        for row in self.rows.values():
            seen = {name: value for name, value in row.observed.items() if name not in row.errors}
            if len({repr(value) for value in seen.values()}) > 1:
                notes.append(f"{row.label}: results differ: " + ", ".join(f"{n}={v}" for n, v in seen.items()))
        return notes


def describe(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return str(error) or type(error).__name__


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "MiB/s":
        return f"{value:.0f} MiB/s"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "us":
        return f"{value * 1e6:.1f} µs"
    if unit == "MB":
        return f"{value:.0f} MB"
    return f"{value:.3f} s" if value < 100 else f"{value:.0f} s"


def print_table(results: Results, title: str) -> None:
    kernel, fuse, ours = results.mounters[:3]
    table = [["", *results.mounters, f"{ours}/{fuse}", f"{ours}/kernel"]]
    footnotes: list[str] = []
    for row in results.rows.values():
        cells = [row.label]
        for name in results.mounters:
            if name in row.errors:
                if row.errors[name] not in footnotes:
                    footnotes.append(row.errors[name])
                cells.append(f"error [{footnotes.index(row.errors[name]) + 1}]")
            else:
                cells.append(format_value(row.median(name), row.unit))
        for other in (fuse, kernel):
            mine, theirs = row.median(ours), row.median(other)
            cells.append(f"{mine / theirs:.2f}x" if mine is not None and theirs else "-")
        table.append(cells)
    widths = [max(len(cells[column]) for cells in table) + 3 for column in range(len(table[0]))]
    print(f"\n{title}")
    for cells in table:
        print("".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip())
    print("ratios: layermount ÷ other in the row's unit (s, µs, MB: above 1 is worse; MiB/s: above 1 is better)")
    for number, message in enumerate(footnotes, 1):
        print(f"[{number}] {message}")
    for note in results.mismatches():
        print(f"warning: {note}")


def environment(mounters: list[Mounter], reps: int) -> dict:
    versions = {"kernel": os.uname().release, "cpus": os.cpu_count(), "repetitions": reps}
    for mounter in mounters:
        if isinstance(mounter, FuseOverlayfs) and mounter.binary:
            output = subprocess.run([mounter.binary, "--version"], capture_output=True, text=True).stdout
            versions["fuse-overlayfs"] = next((line for line in output.splitlines() if "fuse-overlayfs" in line), None)
        if isinstance(mounter, Layermount):
            versions["layermount"] = mounter.binary
    return versions


# ---------------------------------------------------------------- benchmarks


def bench_mount(session: Session, mounters: list[Mounter], reps: int) -> Results:
    layers = make_layers(session.root, with_stacks=True)
    targets = stat_targets()
    results = Results(mounters)
    results.row("ready", "mount to ready", "s")
    results.row("walk_cold", "walk (lstat all) cold", "s")
    results.row("walk_warm", "walk (lstat all) warm", "s")
    results.row("read_cold", "read all 20k files cold", "s")
    results.row("read_warm", "read all 20k files warm", "s")
    results.row("big_cold", "read 256 MiB file cold", "MiB/s")
    results.row("big_warm", "read 256 MiB file warm", "MiB/s")
    for depth in STACK_DEPTHS:
        results.row(f"stat_{depth}", f"stat 10k paths, {depth} layers", "s")

    def image(mounter):
        return layers.paths(mounter.form, layers.image)

    def ready(mounter):
        """The second of two mounts: the program and the layers' roots come from a warm cache."""
        with session.mounted(mounter, image(mounter)):
            pass
        with session.mounted(mounter, image(mounter)) as (_, seconds):
            return {"ready": (seconds, None)}

    def walks(mounter):
        drop_caches()
        with session.mounted(mounter, image(mounter)) as (point, _):
            cold, entries = timed(walk, point)
            warm, again = timed(walk, point)
        return {"walk_cold": (cold, entries), "walk_warm": (warm, again)}

    def reads(mounter):
        drop_caches()
        with session.mounted(mounter, image(mounter)) as (point, _):
            cold, seen = timed(read_tree, point / "tree")
            warm, again = timed(read_tree, point / "tree")
        return {"read_cold": (cold, seen), "read_warm": (warm, again)}

    def big_read(mounter):
        drop_caches()
        buffer = bytearray(MiB)
        with session.mounted(mounter, image(mounter)) as (point, _):
            cold, size = timed(read_file, str(point / "big" / "big.bin"), buffer)
            warm, again = timed(read_file, str(point / "big" / "big.bin"), buffer)
        return {"big_cold": (size / MiB / cold, size), "big_warm": (again / MiB / warm, again)}

    def stats(mounter, depth):
        """Timed on a fresh mount after an untimed pass on another, so no run pays for cold lower caches."""
        lowers = layers.paths(mounter.form, layers.stacks[depth])
        with session.mounted(mounter, lowers) as (point, _):
            stat_paths(point, targets)
        with session.mounted(mounter, lowers) as (point, _):
            seconds, found = timed(stat_paths, point, targets)
        return {f"stat_{depth}": (seconds, found)}

    for rep in range(reps):
        progress(f"repetition {rep + 1}/{reps}")
        for mounter in mounters:
            results.run_case(mounter, ["ready"], lambda: ready(mounter))
            results.run_case(mounter, ["walk_cold", "walk_warm"], lambda: walks(mounter))
            results.run_case(mounter, ["read_cold", "read_warm"], lambda: reads(mounter))
            results.run_case(mounter, ["big_cold", "big_warm"], lambda: big_read(mounter))
            for depth in STACK_DEPTHS:
                results.run_case(mounter, [f"stat_{depth}"], lambda: stats(mounter, depth))

    growth = results.row("stat_growth", f"stat growth {max(STACK_DEPTHS)} vs {min(STACK_DEPTHS)} layers", "x")
    deepest, shallowest = results.rows[f"stat_{max(STACK_DEPTHS)}"], results.rows[f"stat_{min(STACK_DEPTHS)}"]
    for name in results.mounters:
        if name in deepest.errors or name in shallowest.errors:
            growth.errors[name] = deepest.errors.get(name) or shallowest.errors[name]
        elif deepest.median(name) and shallowest.median(name):
            growth.samples[name] = [deepest.median(name) / shallowest.median(name)]
    return results


def bench_write(session: Session, mounters: list[Mounter], reps: int) -> Results:
    layers = make_layers(session.root, with_stacks=False)
    results = Results(mounters)
    for key, (label, *_) in WRITE_CASES.items():
        results.row(key, label, "s")

    def write_case(mounter, key):
        """A fresh upper and work dir, lower caches warm, then one timed operation."""
        _, operation, leftover, expected = WRITE_CASES[key]
        lowers = layers.paths(mounter.form, layers.image)
        scratch = session.scratch("rw")
        upper, work = scratch / "upper", scratch / "work"
        upper.mkdir()
        work.mkdir()
        try:
            for lower in lowers:
                walk(lower)
            if key == "copy_up":
                read_file(str(lowers[-1] / "big" / "big.bin"), bytearray(MiB))
            os.sync()
            with session.mounted(mounter, lowers, upper, work) as (point, _):
                seconds, _ = timed(operation, point)
                found = leftover(point)
            if found != expected:
                raise BenchError(f"wrong result: {found!r}, expected {expected!r}")
            return {key: (seconds, found)}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    for rep in range(reps):
        progress(f"repetition {rep + 1}/{reps}")
        for mounter in mounters:
            for key in WRITE_CASES:
                results.run_case(mounter, [key], lambda: write_case(mounter, key))
    return results


def bench_unpack(session: Session, reps: int, layermount_binary: str | None,
                 baseline_binary: str | None = None) -> list[tuple[str, float, float, float]]:
    """layermount unpack of a multi-layer gzip image vs GNU tar -xzf of the same layers, one after another.

    Each row: wall seconds, ratio to tar, CPU seconds (user + system, all processes).
    ``baseline_binary`` (another build) runs as one more contender, in the same rounds.
    Nothing is deleted until the session ends: on a journal-less ext4 every create scans
    past the inodes freed in the last minutes (``recently_deleted``), so deleting one
    round's tree before the next made that run pay for the bench's own cleanup, up to
    1 ms a file and by where the allocator happened to put it, not by the tool.
    """
    sys.path.insert(0, str(REPO))
    from unionfs.image.writer import new_config, write_image

    progress("making a 4-layer gzip image (4 x 5,000 files, plus a 32 MiB file per layer)")
    layer_paths = []
    rng = random.Random(7)
    for index in range(4):
        tree = session.root / f"unpack-src{index}"
        for number in range(5000):
            directory = tree / f"layer{index}" / f"d{number // 100}"
            directory.mkdir(parents=True, exist_ok=True)
            size = rng.choice(SMALL_FILE_SIZES)
            write_bytes(directory / f"f{number}", (b"%d-" % number) * (size // 6 + 1))
        write_bytes(tree / f"layer{index}" / "big", rng.randbytes(16 * MiB) * 2)
        tar_path = session.root / f"layer{index}.tar"
        run(["tar", "-cf", tar_path, "-C", tree, "."])
        layer_paths.append(tar_path)
    image = session.root / "image.tar"
    write_image(image, [str(path) for path in layer_paths], new_config([f"layer {i}" for i in range(4)]),
                compression="gzip")
    gz_layers = []
    for path in layer_paths:
        run(["gzip", "-6", "-k", path])
        gz_layers.append(Path(f"{path}.gz"))
        path.unlink()

    rounds = itertools.count()

    def with_tar() -> None:
        out = session.root / f"tar-out{next(rounds)}"
        for index, layer in enumerate(gz_layers):
            target = out / str(index)
            target.mkdir(parents=True)
            run(["tar", "-xzf", layer, "-C", target])

    def unpack_with(binary: str, store: str) -> Callable[[], None]:
        return lambda: run([binary, "unpack", image, "--store", session.root / f"{store}{next(rounds)}", "-q"])

    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    # Rounds alternate, and each repetition starts with the next contender, so that a load that
    # drifts (other work on the machine, the file system's recently freed inodes) and the place
    # in the round (the first after tar ran up to 0.4x tar slower, whichever build it was) weigh
    # on all alike.
    contenders = [("GNU tar -xzf, layer after layer", with_tar),
                  ("layermount unpack (verified)", unpack_with(layermount_binary, "store-out"))]
    if baseline_binary:
        contenders.append(("layermount baseline unpack", unpack_with(baseline_binary, "store-base")))
    walls: dict[str, list[float]] = {name: [] for name, _ in contenders}
    cpus: dict[str, list[float]] = {name: [] for name, _ in contenders}
    for rep in range(reps):
        progress(f"repetition {rep + 1}/{reps}")
        for name, operation in contenders[rep % len(contenders):] + contenders[:rep % len(contenders)]:
            run(["sync"])
            drop_caches()
            cpu_before = children_cpu()
            seconds, _ = timed(operation)
            walls[name].append(seconds)
            cpus[name].append(children_cpu() - cpu_before)
    baseline = statistics.median(walls[contenders[0][0]])
    return [(name, statistics.median(walls[name]), statistics.median(walls[name]) / baseline,
             statistics.median(cpus[name])) for name, _ in contenders]


def make_flat_layers(root: Path) -> None:
    """flat/ (FLAT_FILES files of FLAT_SIZE bytes) under an empty top layer; 2 layers of
    MERGED_DIR_FILES / 2 names in one directory; RSS_LAYERS layers over the same RSS_DIRS dirs."""
    block = os.urandom(FLAT_SIZE)
    for form in ("oci", "ovl"):
        (root / form / "empty").mkdir(parents=True)
        for index in range(FLAT_FILES):
            write_bytes(root / form / "flat" / "flat" / f"f{index:05d}", block)
        for layer in range(2):
            folder = root / form / f"merged{layer}" / "big"
            folder.mkdir(parents=True)
            for index in range(layer, MERGED_DIR_FILES, 2):
                (folder / f"e{index:05d}").touch()
        for layer in range(RSS_LAYERS):
            for directory in range(RSS_DIRS):
                folder = root / form / f"rss{layer}" / f"d{directory:02d}"
                folder.mkdir(parents=True)
                for index in range(RSS_FILES):
                    (folder / f"l{layer}f{index:03d}").touch()
    os.sync()


def flat_paths(point: Path) -> list[str]:
    return [f"{point}/flat/f{index:05d}" for index in range(FLAT_FILES)]


def lstat_all(paths: list[str]) -> int:
    for path in paths:
        os.lstat(path)
    return len(paths)


def read_all(paths: list[str]) -> int:
    """open + read + close of each file, as an exec or an import does."""
    total = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            total += len(os.read(fd, 2 * FLAT_SIZE))
        finally:
            os.close(fd)
    return total


def find_printf(point: Path) -> int:
    output = run(["find", point / "flat", "-printf", "%s %i\n"]).stdout
    return output.count("\n")


REQUEST_LINE = re.compile(r"^unique: \d+, opcode: (\S+) \(\d+\)", re.MULTILINE)


class RequestLog:
    """libfuse's request log (``-o debug``): the requests since the last look, by opcode."""

    def __init__(self, path: Path):
        self.path, self.seen = path, 0

    def since(self) -> dict[str, int]:
        data = self.path.read_text(errors="replace")
        fresh, self.seen = data[self.seen:], len(data)
        counts: dict[str, int] = {}
        for opcode in REQUEST_LINE.findall(fresh):
            counts[opcode] = counts.get(opcode, 0) + 1
        return counts


def per_file(counts: dict[str, int], files: int) -> str:
    total = sum(counts.values()) / files
    parts = ", ".join(f"{opcode} {count / files:.2f}" for opcode, count in sorted(counts.items(), key=lambda kv: -kv[1])
                      if count / files >= 0.005)
    return f"{total:.2f}" + (f" ({parts})" if parts else "")


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def bench_requests(session: Session, mounters: list[Mounter], reps: int) -> Results:
    """Where containers spend their time: per-file costs on one flat directory, the requests they take."""
    progress(f"making the layers: {FLAT_FILES:,} x {FLAT_SIZE} B flat, {MERGED_DIR_FILES:,}-entry merged dir, "
             f"{RSS_LAYERS} x {RSS_DIRS * RSS_FILES:,} for RSS")
    make_flat_layers(session.root)
    results = Results(mounters)
    per_op = [("lstat_cold", "lstat, cold (per file)"), ("lstat_warm", "lstat, warm (per file)"),
              ("find_cold", "find -printf, cold (per file)"),
              ("read_cold", "open+read+close, cold (per file)"), ("read_warm", "open+read+close, warm (per file)"),
              ("read_warm_rw", "open+read+close, warm, writable mount (per file)")]
    for key, label in per_op:
        results.row(key, label, "us")
    results.row("listdir_cold", f"listdir of a {MERGED_DIR_FILES:,}-entry dir over 2 layers, cold", "s")
    results.row("listdir_warm", f"listdir of a {MERGED_DIR_FILES:,}-entry dir over 2 layers, warm", "s")
    results.row("rss", f"daemon RSS after a walk of {RSS_LAYERS} x {RSS_DIRS * RSS_FILES:,} entries", "MB")
    results.row("rss_peak", "daemon peak RSS (VmHWM) after that walk", "MB")

    def lowers(mounter, *names):
        return [session.root / mounter.form / name for name in names]

    def flat(mounter):
        layers = lowers(mounter, "empty", "flat")
        for layer in layers:
            walk(layer)
        with session.mounted(mounter, layers) as (point, _):
            paths = flat_paths(point)
            cold, seen = timed(lstat_all, paths)
            warm, again = timed(lstat_all, paths)
        with session.mounted(mounter, layers) as (point, _):
            found_cold, found = timed(find_printf, point)
        with session.mounted(mounter, layers) as (point, _):
            paths = flat_paths(point)
            read_cold, size = timed(read_all, paths)
            read_warm, size_again = timed(read_all, paths)
        # The container case: an upper beside the layers (nothing is written, so nothing copies up).
        with session.mounted(mounter, layers, session.scratch("upper"), session.scratch("work")) as (point, _):
            paths = flat_paths(point)
            read_all(paths)
            read_warm_rw, size_rw = timed(read_all, paths)
        return {"lstat_cold": (cold / FLAT_FILES, seen), "lstat_warm": (warm / FLAT_FILES, again),
                "find_cold": (found_cold / FLAT_FILES, found),
                "read_cold": (read_cold / FLAT_FILES, size), "read_warm": (read_warm / FLAT_FILES, size_again),
                "read_warm_rw": (read_warm_rw / FLAT_FILES, size_rw)}

    def listdir(mounter):
        """For nullfs, the same 20,000 names in one directory (the floor of a readdirplus listing)."""
        layers = lowers(mounter, "merged1", "merged0")
        for layer in layers:
            walk(layer)
        with session.mounted(mounter, layers) as (point, _):
            cold, names = timed(os.listdir, point / "big")
            warm, again = timed(os.listdir, point / "big")
        return {"listdir_cold": (cold, len(names)), "listdir_warm": (warm, len(again))}

    def rss(mounter):
        if not hasattr(mounter, "daemon_pid") or isinstance(mounter, NullFs):
            raise BenchError("no daemon" if isinstance(mounter, KernelOverlay) else "not an overlay")
        with session.mounted(mounter, lowers(mounter, *[f"rss{layer}" for layer in reversed(range(RSS_LAYERS))])) \
                as (point, _):
            entries = walk(point)
            now, peak = rss_mb(mounter.daemon_pid(point))
        return {"rss": (now, entries), "rss_peak": (peak, entries)}

    for rep in range(reps):
        progress(f"repetition {rep + 1}/{reps}")
        for mounter in mounters:
            results.run_case(mounter, [key for key, _ in per_op], lambda: flat(mounter))
            results.run_case(mounter, ["listdir_cold", "listdir_warm"], lambda: listdir(mounter))
            results.run_case(mounter, ["rss", "rss_peak"], lambda: rss(mounter))
    results.requests = count_requests(session, [m for m in mounters if hasattr(m, "mount_logged") and not m.problem])
    return results


def count_requests(session: Session, mounters: list[Mounter]) -> dict[str, dict[str, str]]:
    """FUSE requests per file for each operation, from libfuse's request log (the same counter for all)."""
    progress("counting requests (libfuse -d logs)")
    counted: dict[str, dict[str, str]] = {}
    for mounter in mounters:
        rows = counted[mounter.name] = {}
        layers = [session.root / mounter.form / name for name in ("empty", "flat")]

        def counted_passes(operation, *labels):
            """On a fresh mount with libfuse's request log: ``operation`` once per label, each counted."""
            log = session.scratch("log") / "requests.log"
            with session.mounted(mounter, layers, log=log) as (point, _):
                requests = RequestLog(log)
                requests.since()
                for label in labels:
                    operation(point)
                    rows[label] = per_file(requests.since(), FLAT_FILES)
        try:
            counted_passes(lambda point: lstat_all(flat_paths(point)), "lstat, cold", "lstat, warm")
            counted_passes(find_printf, "find -printf, cold")
            counted_passes(lambda point: read_all(flat_paths(point)), "open+read+close, cold", "open+read+close, warm")
        except Exception as error:
            rows["error"] = describe(error)
    return counted


def print_requests(counted: dict[str, dict[str, str]]) -> None:
    print("\nFUSE requests per file (libfuse -d request log; by opcode)")
    for name, rows in counted.items():
        print(f"  {name}")
        for operation, text in rows.items():
            print(f"    {operation:<24} {text}")


READY_LAYERS, READY_FILES = 3, 200
# What the daemon needs before it can answer: the CLI, the FUSE operations, pyfuse3 and trio.
MOUNT_PATH_IMPORTS = "import unionfs.cli, unionfs.mount, unionfs.daemon, unionfs.mountopts, pyfuse3, trio"


def python_seconds(code: str) -> float:
    """One run of this Python (the one running the benchmark) with the worktree importable."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    started = time.perf_counter()
    run([sys.executable, "-P", "-c", code], env=env)   # -P: the worktree, not a unionfs in the cwd
    return time.perf_counter() - started


def bench_mount_ready(session: Session, mounters: list[Mounter], reps: int) -> Results:
    """Mount-to-ready, the cost podman and buildah pay on every run, diff and commit.

    Each sample is one mount of 3 small layers (read-only, then with upper + work as podman
    mounts them), timed from exec until the root lists; the rows below split layermount's
    time into the interpreter's start and the imports on the mount path.
    """
    mounts = 5 if reps == 1 else 20
    for name in range(READY_LAYERS):
        for form in ("oci", "ovl"):
            for number in range(READY_FILES):
                write_bytes(session.root / "ready" / form / f"l{name}" / f"d{number % 10}" / f"f{name}-{number}",
                            b"x" * number)
    results = Results(mounters)
    results.row("ready_ro", f"mount to ready, {READY_LAYERS} lowers read-only", "s")
    results.row("ready_rw", f"mount to ready, {READY_LAYERS} lowers + upper (as podman)", "s")
    python_start = results.row("python_start", "  of which: Python start (python -c pass)", "s")
    imports = results.row("imports", "  of which: Python start + mount-path imports", "s")

    def ready(mounter, writable):
        lowers = [session.root / "ready" / mounter.form / f"l{name}" for name in reversed(range(READY_LAYERS))]
        upper = work = None
        if writable:
            scratch = session.scratch("rw")
            (upper := scratch / "upper").mkdir()
            (work := scratch / "work").mkdir()
        with session.mounted(mounter, lowers, upper, work) as (point, seconds):
            return {"ready_rw" if writable else "ready_ro": (seconds, sorted(os.listdir(point)))}

    progress(f"{mounts} mounts per mounter and kind")
    for _ in range(mounts):
        for mounter in mounters:
            results.run_case(mounter, ["ready_ro"], lambda: ready(mounter, False))
            results.run_case(mounter, ["ready_rw"], lambda: ready(mounter, True))
        python_start.samples.setdefault("layermount", []).append(python_seconds("pass"))
        imports.samples.setdefault("layermount", []).append(python_seconds(MOUNT_PATH_IMPORTS))
    return results

STALL_SIZE = 2 << 30


def bench_stall(session: Session, mounters: list[Mounter], reps: int) -> Results:
    """chmod of a 2 GiB lower file copies it up; meanwhile another thread opens and reads other
    files (an open always reaches a FUSE daemon) and the longest wait of one of those is the stall."""
    lower = session.scratch("stall-lower")
    block = os.urandom(MiB)
    with open(lower / "big.bin", "wb") as out:
        for _ in range(STALL_SIZE // MiB):
            out.write(block)
    for index in range(100):
        (lower / f"other-{index}").write_bytes(b"other")
    results = Results(mounters)
    results.row("chmod", "chmod of a 2 GiB lower file (copy-up)", "s")
    results.row("stall", "  longest stall of other requests meanwhile", "s")

    def stall_case(mounter):
        scratch = session.scratch("stall")
        upper, work = scratch / "upper", scratch / "work"
        upper.mkdir()
        work.mkdir()
        try:
            read_file(str(lower / "big.bin"), bytearray(MiB))      # the lower file's pages warm for all
            with session.mounted(mounter, [lower], upper, work) as (point, _):
                done, longest = threading.Event(), [0.0]

                def probe():
                    index = 0
                    while not done.is_set():
                        started = time.perf_counter()
                        with open(point / f"other-{index % 100}", "rb") as handle:
                            handle.read()
                        longest[0] = max(longest[0], time.perf_counter() - started)
                        index += 1

                prober = threading.Thread(target=probe)
                prober.start()
                try:
                    seconds, _ = timed(os.chmod, point / "big.bin", 0o600)
                finally:
                    done.set()
                    prober.join()
                size = os.stat(upper / "big.bin").st_size
            if size != STALL_SIZE:
                raise BenchError(f"wrong result: the copy has {size} bytes")
            return {"chmod": (seconds, size), "stall": (longest[0], size)}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    for rep in range(reps):
        progress(f"repetition {rep + 1}/{reps}")
        for mounter in mounters:
            results.run_case(mounter, ["chmod", "stall"], lambda: stall_case(mounter))
    return results


class ThrottledProxy:
    """A TCP proxy to 127.0.0.1:``port`` that passes at most ``rate`` bytes a second towards the client
    (all connections together), standing in for a network slower than loopback."""

    def __init__(self, port: int, rate: float):
        import threading

        self.port, self.rate = port, rate
        self._lock = threading.Lock()
        self._next_free = time.monotonic()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._threading = threading
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port))
            self._threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            self._threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, throttled: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if throttled:
                    with self._lock:
                        start = max(self._next_free, time.monotonic())
                        self._next_free = start + len(data) / self.rate
                    time.sleep(max(start - time.monotonic(), 0))
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()


def bench_pull(session: Session, reps: int, layermount_binary: str,
               rate: float | None = None) -> list[tuple[str, float, float]]:
    """Pull + unpack from a local docker-registry: layermount's one pass (3 layers at once) against
    what a user does today, skopeo copy docker://... oci:DIR and then the unpack of that layout.
    With ``rate`` (bytes/s) both fetch through a throttling proxy, as over a slower network."""
    sys.path.insert(0, str(REPO))
    from unionfs.image.writer import new_config, write_image

    registry_binary, skopeo = shutil.which("docker-registry"), shutil.which("skopeo")
    if not registry_binary or not skopeo:
        raise BenchError("needs docker-registry and skopeo (scripts/setup installs them)")
    progress("making a 4-layer gzip image (4 x 3,000 files, plus a 24 MiB file per layer)")
    rng = random.Random(11)
    layer_paths = []
    for index in range(4):
        tree = session.root / f"pull-src{index}"
        for number in range(3000):
            directory = tree / f"layer{index}" / f"d{number // 100}"
            directory.mkdir(parents=True, exist_ok=True)
            size = rng.choice(SMALL_FILE_SIZES)
            write_bytes(directory / f"f{number}", (b"%d-" % number) * (size // 6 + 1))
        write_bytes(tree / f"layer{index}" / "big", rng.randbytes(12 * MiB) * 2)
        tar_path = session.root / f"pull-layer{index}.tar"
        run(["tar", "-cf", tar_path, "-C", tree, "."])
        shutil.rmtree(tree)
        layer_paths.append(tar_path)
    image = session.root / "pull-image.tar"
    write_image(image, [str(path) for path in layer_paths], new_config([f"layer {i}" for i in range(4)]),
                compression="gzip")
    for path in layer_paths:
        path.unlink()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{probe.getsockname()[1]}"
    config = session.root / "registry.yml"
    config.write_text(json.dumps({"version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
                                  "storage": {"filesystem": {"rootdirectory": str(session.root / "registry")}},
                                  "http": {"addr": host}}))
    registry = subprocess.Popen([registry_binary, "serve", str(config)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    proxy = None
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(host.split(":"), timeout=1):
                break
            time.sleep(0.05)
        progress(f"pushing it into docker-registry on {host} with skopeo")
        run([skopeo, "copy", "-q", "--dest-tls-verify=false", f"docker-archive:{image}",
             f"docker://{host}/bench/image:v1"])
        proxy = ThrottledProxy(int(host.split(":")[1]), rate) if rate else None
        ref = f"docker://{proxy.host if proxy else host}/bench/image:v1"

        def with_skopeo() -> None:
            layout = session.root / "layout"
            run([skopeo, "copy", "-q", "--src-tls-verify=false", ref, f"oci:{layout}:v1"])
            run([layermount_binary, "unpack", f"oci:{layout}:v1", "--store", session.root / "store-skopeo", "-q"])

        def with_layermount() -> None:
            run([layermount_binary, "pull", ref, "--store", session.root / "store-pull", "-q"])

        cases = (("skopeo copy to oci: + layermount unpack", with_skopeo, ("layout", "store-skopeo")),
                 ("layermount pull (streamed, verified)", with_layermount, ("store-pull",)))
        samples: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        for _ in range(reps):           # interleaved, so a change of load hits both alike
            for name, operation, outputs in cases:
                run(["sync"])
                drop_caches()
                seconds, _ = timed(operation)
                samples[name].append(seconds)
                for output in outputs:
                    shutil.rmtree(session.root / output)
        progress("samples: " + "; ".join(f"{name}: {', '.join(f'{value:.2f}' for value in values)}"
                                         for name, values in samples.items()))
        rows = [(name, statistics.median(values), 0.0) for name, values in samples.items()]
    finally:
        if proxy is not None:
            proxy.close()
        registry.terminate()
        registry.wait(timeout=30)
    baseline = rows[0][1]
    return [(name, seconds, seconds / baseline) for name, seconds, _ in rows]


BENCHMARKS = {
    "mount": (bench_mount, "read-only mount: mount, walks, reads, lookups through deep stacks"),
    "write": (bench_write, "writable mount (upper + work): creates, big write, copy-up, rm -rf"),
    "mount-ready": (bench_mount_ready, "mount to ready, median of 20 mounts (5 with --quick)"),
    "stall": (bench_stall, "chmod of a 2 GiB lower file while other files are read: the longest stall"),
    "requests": (bench_requests, "per-file costs on one flat dir of 10,000 x 4 KiB, listdir, RSS, requests"),
}


def main_unpack(args: argparse.Namespace, layermount: Layermount, reps: int) -> int:
    if layermount.binary is None:
        print(f"bench.py: layermount {layermount.problem}", file=sys.stderr)
        return 1
    session = Session(args.dir)
    try:
        if args.mode == "pull":
            rows = bench_pull(session, reps, layermount.binary, args.rate * 1e6 if args.rate else None)
        else:
            baseline = find_layermount(args.baseline) if args.baseline else None
            if baseline is not None and baseline.binary is None:
                print(f"bench.py: baseline layermount {baseline.problem}", file=sys.stderr)
                return 1
            rows = bench_unpack(session, reps, layermount.binary, baseline.binary if baseline else None)
    except BenchError as exc:
        print(f"bench.py: {exc}", file=sys.stderr)
        return 1
    finally:
        session.close()
    what = "(median of {reps}, alternating rounds, caches dropped before each run)".format(reps=reps)
    if args.mode == "pull":
        what = "from a local docker-registry " + (f"through a {args.rate:g} MB/s proxy " if args.rate else "") + what
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"\n{args.mode}: 4-layer gzip image {what}; load average {load} at the end")
    for name, seconds, ratio, *cpu in rows:
        print(f"  {name:<40} {seconds:8.2f} s   {ratio:5.2f}x" + (f"   CPU {cpu[0]:6.2f} s" if cpu else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"mode": args.mode, "rows": rows}, indent=2) + "\n")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="mode", required=True)
    modes = dict(BENCHMARKS, unpack=(None, "layermount unpack vs sequential GNU tar -xzf of the same layers"),
                 pull=(None, "layermount pull vs skopeo copy to an OCI layout + unpack of it"))
    for mode, (_, help_text) in modes.items():
        command = commands.add_parser(mode, help=help_text)
        command.add_argument("--quick", action="store_true", help="one run per measurement instead of 3")
        command.add_argument("--json", metavar="FILE", help="also write the results as JSON")
        command.add_argument("--dir", help="where to make the temp dir (same disk for every mounter)")
        command.add_argument("--layermount", metavar="PATH", help="the layermount binary to use")
        command.add_argument("--baseline", metavar="PATH",
                             help="another layermount binary (e.g. main's) as one more column, for before/after")
        if mode == "pull":
            command.add_argument("--rate", type=float, metavar="MB/S",
                                 help="fetch through a proxy passing this many MB a second (a slower network)")
    return parser.parse_args(argv)


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_nullfs"]:             # the nullfs daemon of `requests`, started by NullFs.mount
        null_serve(argv[1], argv[2] == "debug")
        return 0
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.py: run as root (kernel overlayfs and drop_caches need it)", file=sys.stderr)
        return 2
    mounters = [KernelOverlay(), FuseOverlayfs(shutil.which("fuse-overlayfs")), find_layermount(args.layermount)]
    if args.mode == "requests":
        mounters.append(NullFs())
    if args.baseline and args.mode not in ("unpack", "pull"):
        baseline = find_layermount(args.baseline)
        baseline.name = "layermount baseline"
        mounters.append(baseline)
    reps = 1 if args.quick else 3
    if args.mode in ("unpack", "pull"):
        return main_unpack(args, mounters[-1], reps)
    benchmark, description = BENCHMARKS[args.mode]
    signal.signal(signal.SIGTERM, raise_interrupt)
    session = Session(args.dir)
    started = time.perf_counter()
    try:
        results = benchmark(session, mounters, reps)
    except KeyboardInterrupt:
        print("bench.py: interrupted; unmounting and cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        session.close()
    env = environment(mounters, reps)
    print_table(results, f"{args.mode}: {description} ({'' if args.mode == 'mount-ready' else f'median of {reps}; '}kernel {env['kernel']}, "
                         f"{env['cpus']} CPUs, {time.perf_counter() - started:.0f} s)")
    if results.requests:
        print_requests(results.requests)
    if args.json:
        rows = [{"key": key, "label": row.label, "unit": row.unit,
                 "median": {name: row.median(name) for name in results.mounters},
                 "samples": row.samples, "errors": row.errors} for key, row in results.rows.items()]
        Path(args.json).write_text(json.dumps({"mode": args.mode, "environment": env, "rows": rows,
                                               "requests": results.requests, "warnings": results.mismatches()},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Kernel overlayfs as the test oracle for layermount's merged view.

The FUSE tests mount the same layer directories twice, once with layermount and
once with the kernel's own overlayfs, and compare ``snapshot()`` of both. The
kernel reads whiteouts only in its own form, so each layer is first copied into
that form by ``to_overlay_form``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
AUFS_META_PREFIX = ".wh..wh."
OPAQUE_XATTR = "trusted.overlay.opaque"
IGNORED_XATTR_PREFIXES = ("trusted.overlay.", "security.selinux", "user.layermount.")

FILE_TYPES = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket",
}


def _whiteout_target(name: str) -> str | None:
    """The name an OCI ``.wh.`` marker hides, or None for markers that hide nothing."""
    if name.startswith(AUFS_META_PREFIX):
        return None
    target = name[len(WHITEOUT_PREFIX):]
    return target if target not in ("", ".", "..") else None


def to_overlay_form(layer_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy an OCI-form layer into the form kernel overlayfs reads.

    ``.wh.NAME`` becomes a 0/0 character device NAME, ``.wh..wh..opq`` becomes
    ``trusted.overlay.opaque=y`` on its directory, and other ``.wh.`` names (AUFS
    metadata, empty targets) are dropped since no merged view ever shows them.
    Everything else keeps type, mode, owner, times, xattrs and hardlinks (cp -a);
    directories the fix-up touched get their original times back.
    """
    out = Path(out_dir)
    subprocess.run(["cp", "-a", "--no-target-directory", str(layer_dir), str(out)],
                   check=True, capture_output=True)
    for directory, dirnames, filenames in os.walk(out):
        markers = [name for name in dirnames + filenames if name.startswith(WHITEOUT_PREFIX)]
        if not markers:
            continue
        times = os.lstat(directory)
        for name in markers:
            marker = os.path.join(directory, name)
            if os.path.isdir(marker) and not os.path.islink(marker):
                shutil.rmtree(marker)
            else:
                os.unlink(marker)
            if name == OPAQUE_MARKER:
                os.setxattr(directory, OPAQUE_XATTR, b"y")
            elif (target := _whiteout_target(name)) is not None:
                hidden = os.path.join(directory, target)
                if not os.path.lexists(hidden):
                    os.mknod(hidden, stat.S_IFCHR | 0o000, os.makedev(0, 0))
                elif os.path.isdir(hidden) and not os.path.islink(hidden):
                    # Whiteout and re-add in one layer: the new directory must hide the old one's contents.
                    os.setxattr(hidden, OPAQUE_XATTR, b"y")
        dirnames[:] = [name for name in dirnames if name not in markers]
        os.utime(directory, ns=(times.st_atime_ns, times.st_mtime_ns))
    return out


def mount_points() -> set[str]:
    """Every mountpoint this process sees, with mountinfo's octal escapes undone."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
        return {re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), line.split()[4])
                for line in info}


def is_mounted(path: str | os.PathLike) -> bool:
    return os.path.realpath(path) in mount_points()


@contextlib.contextmanager
def kernel_overlay(lower_dirs_top_first: list[str | os.PathLike], mountpoint: str | os.PathLike | None = None,
                   upper: str | os.PathLike | None = None, work: str | os.PathLike | None = None,
                   options: str = "") -> Iterator[Path]:
    """Mount OCI-form layers with kernel overlayfs; yield the mountpoint; always unmount and clean up.

    Lowers are converted into a temp dir and named relative to it, so long stacks
    stay under the kernel's one-page limit on mount options. Without ``upper``
    the mount is read-only, and the kernel wants two lowers then, so a single
    layer gets an empty one beneath it. ``upper`` is used as it is (overlay form);
    a missing ``work`` is made beside it and removed afterwards. ``options`` adds
    kernel features (e.g. "index=on,redirect_dir=on") to the mount options.
    """
    if not lower_dirs_top_first:
        raise ValueError("kernel_overlay needs at least one lower directory")
    scratch = Path(tempfile.mkdtemp(prefix="oracle-"))
    made_work = None
    point = Path(mountpoint) if mountpoint is not None else scratch / "mnt"
    mounted = False
    try:
        names = []
        for index, lower in enumerate(lower_dirs_top_first):
            to_overlay_form(lower, scratch / f"L{index}")
            names.append(f"L{index}")
        if len(names) == 1 and upper is None:
            (scratch / "empty").mkdir()
            names.append("empty")
        options = "lowerdir=" + ":".join(names) + (f",{options}" if options else "")
        if upper is not None:
            if work is None:
                made_work = work = tempfile.mkdtemp(prefix=".oracle-work-", dir=Path(upper).resolve().parent)
            options += f",upperdir={Path(upper).resolve()},workdir={Path(work).resolve()}"
        point.mkdir(exist_ok=True)
        result = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(point.resolve())],
                                cwd=scratch, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"mount -t overlay -o {options} {point}: {result.stderr.strip()}")
        mounted = True
        yield point
    finally:
        if mounted:
            _unmount(point)
        if made_work is not None:
            shutil.rmtree(made_work, ignore_errors=True)
        if not any(found == str(scratch.resolve()) or found.startswith(str(scratch.resolve()) + "/")
                   for found in mount_points()):
            shutil.rmtree(scratch, ignore_errors=True)


def _unmount(point: Path) -> None:
    """Unmount; if busy, detach lazily so nothing stays mounted past the test."""
    if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
    if is_mounted(point):
        raise RuntimeError(f"{point}: still mounted after umount -l")


def _xattrs(path: str) -> list[tuple[str, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as error:
        if error.errno != errno.EOPNOTSUPP:
            raise
        return []
    return sorted((name, os.getxattr(path, name, follow_symlinks=False)) for name in names
                  if not name.startswith(IGNORED_XATTR_PREFIXES))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def snapshot(root: str | os.PathLike, mtimes: bool = True) -> dict[str, dict]:
    """A comparable picture of the tree under ``root``, keyed by relative path ("." is root).

    Never follows symlinks and never descends into another mount. Hardlinks are
    shown as ``links``: the sorted paths in this tree sharing the entry's inode,
    so the picture holds no inode numbers. Mtimes (files and symlinks only) are
    left out with ``mtimes=False``.
    """
    root = os.path.realpath(root)
    other_mounts = {point for point in mount_points() if point.startswith(root + "/")}
    entries: dict[str, dict] = {}
    by_inode: dict[tuple[int, int], list[str]] = {}
    pending = ["."]
    while pending:
        rel = pending.pop()
        path = os.path.normpath(os.path.join(root, rel))
        info = os.lstat(path)
        kind = FILE_TYPES[stat.S_IFMT(info.st_mode)]
        entry = {"type": kind, "mode": stat.S_IMODE(info.st_mode), "uid": info.st_uid, "gid": info.st_gid,
                 "xattrs": _xattrs(path)}
        if kind == "file":
            entry["size"] = info.st_size
            entry["sha256"] = _sha256(path)
        elif kind == "symlink":
            entry["target"] = os.readlink(path)
        elif kind in ("chardev", "blockdev"):
            entry["rdev"] = (os.major(info.st_rdev), os.minor(info.st_rdev))
        if mtimes and kind in ("file", "symlink"):
            entry["mtime_ns"] = info.st_mtime_ns
        if kind == "dir":
            for name in os.listdir(path):
                child = name if rel == "." else f"{rel}/{name}"
                if os.path.join(path, name) not in other_mounts:
                    pending.append(child)
        else:
            by_inode.setdefault((info.st_dev, info.st_ino), []).append(rel)
        entries[rel] = entry
    for paths in by_inode.values():
        if len(paths) > 1:
            for rel in paths:
                entries[rel]["links"] = sorted(paths)
    return dict(sorted(entries.items()))


def _show(key: str, value, limit: int = 72) -> str:
    text = oct(value) if key == "mode" and value is not None else repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def diff_snapshots(a: dict[str, dict], b: dict[str, dict], names: tuple[str, str] = ("a", "b")) -> list[str]:
    """Every difference between two snapshots, one readable line each (empty when equal)."""
    first, second = names
    lines = []
    for rel in sorted(a.keys() | b.keys()):
        if rel not in b:
            lines.append(f"{rel}: only in {first} ({a[rel]['type']})")
        elif rel not in a:
            lines.append(f"{rel}: only in {second} ({b[rel]['type']})")
        else:
            for key in sorted(a[rel].keys() | b[rel].keys()):
                left, right = a[rel].get(key), b[rel].get(key)
                if left != right:
                    lines.append(f"{rel}: {key} {first}={_show(key, left)} {second}={_show(key, right)}")
    return lines


def stamps(root: str | os.PathLike) -> dict[str, dict]:
    """Every entry's type, mtime, link count and inode number under ``root`` (atime and ctime aside).

    The companion of ``snapshot`` for the attributes that change with each
    operation: the differential tests take one after every step.
    """
    root = os.path.realpath(root)
    entries: dict[str, dict] = {}
    pending = ["."]
    while pending:
        rel = pending.pop()
        path = os.path.normpath(os.path.join(root, rel))
        info = os.lstat(path)
        kind = FILE_TYPES[stat.S_IFMT(info.st_mode)]
        entries[rel] = {"type": kind, "mtime_ns": info.st_mtime_ns, "nlink": info.st_nlink, "ino": info.st_ino}
        if kind == "dir":
            pending.extend(name if rel == "." else f"{rel}/{name}" for name in os.listdir(path))
    return dict(sorted(entries.items()))


class MtimeClock:
    """Names each entry's mtime by the step that last set it, so two mounts made at different times compare.

    An entry whose mtime is unchanged since the last step keeps its name. A new
    or changed mtime is "@N" when the clock stamped it during step N (it is not
    older than the step's start) or it was never seen before; an older value
    seen before (a rename, a copy-up keeping the lower time) keeps that value's
    name. Values present when the mount was made are named by their first path
    (the root's, the upper's own, only by itself).
    """

    def __init__(self):
        self.by_value: dict[int, str] = {}
        self.last: dict[str, tuple[int, str]] = {}

    def observe(self, step: int, step_start_ns: int, entries: dict[str, dict]) -> dict[str, str]:
        names = {}
        for rel, entry in entries.items():
            value = entry["mtime_ns"]
            previous = self.last.get(rel)
            if previous is not None and previous[0] == value:
                name = previous[1]
            elif step == 0:
                name = f"@0 {rel}"
                if rel == ".":   # the upper's own root, made just now: its time may equal a lower's
                    names[rel] = name
                    continue
            elif value >= step_start_ns or value not in self.by_value:
                name = f"@{step}"
            else:
                name = self.by_value[value]
            self.by_value.setdefault(value, name)
            names[rel] = name
        self.last = {rel: (entry["mtime_ns"], names[rel]) for rel, entry in entries.items()}
        return names


def coarse_now_ns() -> int:
    return time.clock_gettime_ns(5)   # CLOCK_REALTIME_COARSE, the clock the kernel stamps inodes with


def next_clock_tick() -> None:
    """Wait until the kernel's coarse clock moves on, so consecutive operations get distinct timestamps."""
    start = coarse_now_ns()
    while coarse_now_ns() == start:
        time.sleep(0.001)


# Where layermount is right and kernel overlayfs approximate, on purpose; the one list of them.
DELIBERATE_DIFFERENCES = {
    "nlink of a lower file": (
        "st_nlink of a file is the number of names the merged view has for it (what a fresh unpack "
        "of the merged tree gives); kernel overlayfs reports the lower inode's own count for a file "
        "it has not copied up, counting partners that a later layer or the upper deleted"),
    "nlink of a directory": (
        "a directory's st_nlink is 2 + its subdirectories where layermount has its whole copy in the upper "
        "(e.g. a renamed lower directory, copied up whole); kernel overlayfs says 1 for every directory with "
        "a lower part (merged or redirected), which find and fts take as 'count unknown'"),
    "st_ino after a remount": (
        "a copied-up file keeps its st_ino for the mount's life only; after a remount it has the upper file's "
        "own number. Kernel overlayfs (index=on) keeps it by an origin xattr it verifies against the lower "
        "filesystem; here st_ino is also the FUSE node id content is served by, and an unverified origin (an "
        "upper reused over another image, or edited) could make two files one inode (README: where layermount "
        "differs)"),
    "copy-up at the first write": (
        "opening a lower file for writing copies nothing until something is written (no OPEN reaches the "
        "daemon, patches/pyfuse3-noopen.patch); kernel overlayfs copies up at open(O_WRONLY/O_RDWR), so a "
        "program that opens read-write and only reads leaves a copy in its upper"),
}


def kernel_nlink_is_the_lower_count(rel: str, nlink: int, kernel_upper: Path, lowers_top_first) -> bool:
    """True when the kernel's nlink for ``rel`` is the deliberate difference "nlink of a lower file":
    the upper has no copy of it (nothing, or the whiteout an unlink left) and it is the lower's count."""
    try:
        upper = os.lstat(Path(kernel_upper) / rel)
        if not (stat.S_ISCHR(upper.st_mode) and upper.st_rdev == 0):
            return False
    except FileNotFoundError:
        pass
    for lower in lowers_top_first:
        path = Path(lower) / rel
        if os.path.lexists(path):
            return os.lstat(path).st_nlink == nlink
    return False


def directory_nlink_is_deliberate(ours: int, kernels: int, exact: int) -> bool:
    """True for the deliberate difference "nlink of a directory": layermount knows, the kernel says 1."""
    return ours == exact and kernels == 1

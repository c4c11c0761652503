"""The writable upper, differentially: the same operations on layermount and on kernel overlayfs.

Both mount the same OCI-form lower layers (the oracle converts its copy to the
kernel's whiteout form); each operation's result or errno must agree, and so
must the final trees. The kernel runs with index=on and redirect_dir=on, the
features that make it keep hardlinks across copy-up and rename lower
directories, which layermount does without options.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from oracle import (DELIBERATE_DIFFERENCES, MtimeClock, coarse_now_ns, diff_snapshots, directory_nlink_is_deliberate,
                    kernel_nlink_is_the_lower_count, kernel_overlay, next_clock_tick, snapshot, stamps)
from test_mount import make_tree

KERNEL_FEATURES = "index=on,redirect_dir=on"
LOWER_TOP = {
    "d/.wh.gone": b"", "d/g": b"g-top", "o/.wh..wh..opq": b"", "o/new": b"new",
    "e": b"e is a file now", "link": ("link", "d/f"),
}
LOWER_BOTTOM = {
    "f": b"bottom f", "d/f": b"d/f bottom", "d/g": b"g-bottom", "d/gone": b"gone", "d/sub/h": b"h",
    "o/old": b"hidden by opaque", "e/inner": b"hidden", "big": b"x" * 300_000, "hl1": b"hard",
    "hl2": ("hard", "hl1"),
}


@pytest.fixture(scope="module")
def lowers(tmp_path_factory):
    base = tmp_path_factory.mktemp("lowers")
    return [make_tree(base / "top", LOWER_TOP), make_tree(base / "bottom", LOWER_BOTTOM)]


def renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:   # AT_FDCWD
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def outcome(action):
    try:
        value = action()
        return ("ok", value)
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno, exc.errno))


def apply(root: Path, op: tuple):
    """Run one operation below ``root``; return a comparable outcome."""
    kind, *args = op
    path = lambda rel: root / rel  # noqa: E731
    if kind == "write":
        rel, data, mode = args
        def write():
            with open(path(rel), mode) as handle:
                handle.write(data)
        return outcome(write)
    if kind == "read":
        return outcome(lambda: path(args[0]).read_bytes())
    if kind == "mkdir":
        return outcome(lambda: os.mkdir(path(args[0])))
    if kind == "rmdir":
        return outcome(lambda: os.rmdir(path(args[0])))
    if kind == "unlink":
        return outcome(lambda: os.unlink(path(args[0])))
    if kind == "symlink":
        return outcome(lambda: os.symlink(args[0], path(args[1])))
    if kind == "link":
        return outcome(lambda: os.link(path(args[0]), path(args[1])))
    if kind == "chmod":
        return outcome(lambda: os.chmod(path(args[0]), args[1]))
    if kind == "truncate":
        return outcome(lambda: os.truncate(path(args[0]), args[1]))
    if kind in ("exchange", "noreplace"):
        flags = {"exchange": 2, "noreplace": 1}[kind]   # RENAME_EXCHANGE, RENAME_NOREPLACE
        return outcome(lambda: renameat2(path(args[0]), path(args[1]), flags))
    if kind == "setxattr":
        return outcome(lambda: os.setxattr(path(args[0]), args[1], args[2]))
    if kind == "removexattr":
        return outcome(lambda: os.removexattr(path(args[0]), args[1]))
    if kind == "chown":
        return outcome(lambda: os.chown(path(args[0]), args[1], args[2], follow_symlinks=False))
    if kind == "utime":
        return outcome(lambda: os.utime(path(args[0]), ns=(args[1], args[1])))
    if kind == "mkfifo":
        return outcome(lambda: os.mkfifo(path(args[0])))
    if kind == "excl":
        return outcome(lambda: os.close(os.open(path(args[0]), os.O_WRONLY | os.O_CREAT | os.O_EXCL)))
    if kind == "fsync":
        def sync():
            fd = os.open(path(args[0]), os.O_RDWR)
            try:
                os.write(fd, b"synced")
                os.fsync(fd)
                os.fdatasync(fd)
            finally:
                os.close(fd)
        return outcome(sync)
    if kind == "unlink-open":
        def unlink_while_open():   # the temp-file pattern: the fd's st_nlink is the names left
            fd = os.open(path(args[0]), os.O_RDONLY)
            try:
                os.unlink(path(args[0]))
                info = os.fstat(fd)
                return info.st_nlink, info.st_ino
            finally:
                os.close(fd)
        return outcome(unlink_while_open)
    if kind == "listdir":
        return outcome(lambda: sorted(os.listdir(path(args[0]))))
    if kind == "stat":
        def describe():
            info = os.lstat(path(args[0]))
            return (oct(info.st_mode), info.st_size if not os.path.isdir(path(args[0])) else None,
                    info.st_nlink if not os.path.isdir(path(args[0])) else None)
        return outcome(describe)
    if kind == "rename":
        src, dst = args
        return outcome(lambda: os.rename(path(src), path(dst)))
    raise ValueError(kind)


class Pair:
    """layermount and kernel overlayfs over the same lowers, each with its own upper."""

    def __init__(self, mounts, tmp: Path, lowers, *, extra=()):
        self.tmp = tmp
        self.lowers = lowers
        for name in ("ours-upper", "ours-work", "kernel-upper"):
            (tmp / name).mkdir()
        self.ours = mounts.mount("-o", "lowerdir=" + ":".join(map(str, lowers)) +
                                 f",upperdir={tmp / 'ours-upper'},workdir={tmp / 'ours-work'}", *extra,
                                 mountpoint=mounts.mountpoint(tmp.name + "-ours"), store=False)

    def run(self, ops, kernel_root: Path):
        results = []
        for op in ops:
            mine = apply(self.ours, op)
            theirs = apply(kernel_root, op)
            results.append((op, mine, theirs))
        return results


def comparable(op: tuple, result: tuple) -> tuple:
    """The part of an outcome both mounts must agree on; an fd's (nlink, ino) is judged by
    ``unlinked_fd_differences``."""
    return result[:1] if op[0] == "unlink-open" and result[0] == "ok" else result


def compare(pair: Pair, ops, kernel_root: Path):
    for op, mine, theirs in pair.run(ops, kernel_root):
        assert comparable(op, mine) == comparable(op, theirs), f"{op}: layermount {mine} but kernel overlayfs {theirs}"
    ours, kernels = snapshot(pair.ours, mtimes=False), snapshot(kernel_root, mtimes=False)
    differences = diff_snapshots(ours, kernels, ("layermount", "kernel"))
    assert not differences, "\n".join(differences)
    return ours


SCENARIOS = {
    "append to a lower file": [("write", "f", b"+more", "ab"), ("read", "f"), ("stat", "f")],
    "truncate-open a lower file": [("write", "d/f", b"new", "wb"), ("read", "d/f")],
    "truncate grow and shrink": [("truncate", "big", 10), ("read", "big"), ("truncate", "f", 5000), ("stat", "f")],
    "unlink lower then recreate": [("unlink", "d/g"), ("listdir", "d"), ("read", "d/g"),
                                   ("write", "d/g", b"again", "wb"), ("listdir", "d")],
    "rmdir non-empty lower dir": [("rmdir", "d/sub"), ("unlink", "d/sub/h"), ("rmdir", "d/sub"), ("listdir", "d")],
    "rmdir then mkdir is opaque": [("unlink", "d/sub/h"), ("rmdir", "d/sub"), ("mkdir", "d/sub"),
                                   ("listdir", "d/sub")],
    "delete upper-only file": [("write", "fresh", b"1", "wb"), ("unlink", "fresh"), ("listdir", "")],
    "rename lower file over lower file": [("rename", "f", "d/f"), ("read", "d/f"), ("listdir", "")],
    "rename lower directory": [("rename", "d", "moved"), ("listdir", "moved"), ("read", "moved/sub/h"),
                               ("listdir", "")],
    "rename directory over empty dir": [("mkdir", "empty"), ("rename", "o", "empty"), ("listdir", "empty")],
    "rename file onto directory": [("rename", "f", "d"), ("rename", "d", "f")],
    "hardlink a lower file": [("link", "f", "f2"), ("write", "f2", b"both", "ab"), ("read", "f"),
                              ("stat", "f")],
    "lower hardlinks stay linked": [("write", "hl1", b"!", "ab"), ("read", "hl2")],
    "symlink and chmod": [("symlink", "f", "sl"), ("chmod", "f", 0o600), ("stat", "f"), ("stat", "sl")],
    "errors": [("mkdir", "f"), ("unlink", "d"), ("rmdir", "f"), ("read", "nope"), ("mkdir", "nope/x"),
               ("rename", "nope", "x"), ("link", "d", "d2")],
    "opaque and whiteouts stay hidden": [("listdir", "o"), ("listdir", "d"), ("read", "e")],
    "rename exchange and noreplace": [("exchange", "f", "d"), ("listdir", "f"), ("read", "d"),
                                      ("noreplace", "d", "big"), ("noreplace", "d", "fresh"), ("read", "fresh"),
                                      ("exchange", "hl1", "nope")],
    "xattrs, owner and times of lower entries": [
        ("setxattr", "d/g", "user.note", b"hello"), ("setxattr", "d", "user.dir", b"x"),
        ("removexattr", "d/g", "user.note"), ("removexattr", "f", "user.absent"),
        ("chown", "f", 1000, 1000), ("chown", "link", 7, 7), ("utime", "d/f", 10**18)],
    "fifo, O_EXCL and fsync": [("mkfifo", "fifo"), ("mkfifo", "f"), ("excl", "f"), ("excl", "brand-new"),
                               ("fsync", "d/g"), ("read", "d/g")],
}


def test_opening_for_writing_copies_nothing_until_a_write(mounts, tmp_path, lowers):
    """The deliberate difference "copy-up at the first write", seen side by side: both mounts
    open a lower file read-write and close it unwritten; only the kernel's upper gets a copy.
    The first write then copies it up here too, and both show the same data."""
    pair = Pair(mounts, tmp_path, lowers)
    with kernel_overlay(lowers, tmp_path / "kernel", upper=tmp_path / "kernel-upper", options=KERNEL_FEATURES) as kernel_root:
        for root in (pair.ours, kernel_root):
            os.close(os.open(root / "d/f", os.O_RDWR))
        assert (tmp_path / "kernel-upper/d/f").exists(), DELIBERATE_DIFFERENCES["copy-up at the first write"]
        assert not (tmp_path / "ours-upper/d/f").exists()
        for root in (pair.ours, kernel_root):
            with open(root / "d/f", "r+b") as handle:
                handle.write(b"W")
        assert (tmp_path / "ours-upper/d/f").read_bytes() == (tmp_path / "kernel-upper/d/f").read_bytes()
        assert (pair.ours / "d/f").read_bytes() == (kernel_root / "d/f").read_bytes()


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_matches_kernel_overlayfs(mounts, tmp_path, lowers, name):
    pair = Pair(mounts, tmp_path, lowers)
    with kernel_overlay(lowers, tmp_path / "kernel", upper=tmp_path / "kernel-upper", options=KERNEL_FEATURES) as kernel_root:
        compare(pair, SCENARIOS[name], kernel_root)


def test_upper_remerged_offline_and_after_remount_shows_the_same(mounts, tmp_path, lowers):
    pair = Pair(mounts, tmp_path, lowers)
    ops = [op for steps in SCENARIOS.values() for op in steps]
    for op in ops:
        apply(pair.ours, op)
    seen = snapshot(pair.ours, mtimes=False)
    mounts.umount(pair.ours)
    # The upper is a layer in overlayfs form: the kernel can stack it on the lowers as they are.
    with kernel_overlay([tmp_path / "ours-upper", *lowers], tmp_path / "offline") as offline:
        differences = diff_snapshots(seen, snapshot(offline, mtimes=False), ("mount", "offline merge"))
        assert not differences, "\n".join(differences)
    again = mounts.mount("-o", "lowerdir=" + ":".join(map(str, lowers)) +
                         f",upperdir={tmp_path / 'ours-upper'},workdir={tmp_path / 'ours-work'}",
                         mountpoint=mounts.mountpoint("again"), store=False)
    differences = diff_snapshots(seen, snapshot(again, mtimes=False), ("first mount", "remount"))
    assert not differences, "\n".join(differences)


def test_st_ino_survives_copy_up_and_rename(mounts, tmp_path, lowers):
    pair = Pair(mounts, tmp_path, lowers)
    root = pair.ours
    before = os.stat(root / "d/f").st_ino
    with open(root / "d/f", "ab") as handle:
        handle.write(b"!")
    assert os.stat(root / "d/f").st_ino == before
    os.rename(root / "d/f", root / "renamed")
    assert os.stat(root / "renamed").st_ino == before
    with open("/proc/sys/vm/drop_caches", "w") as drop:
        drop.write("2\n")
    assert os.stat(root / "renamed").st_ino == before


def test_reader_opened_before_copy_up_sees_later_writes(mounts, tmp_path, lowers):
    pair = Pair(mounts, tmp_path, lowers)
    root = pair.ours
    reader = os.open(root / "f", os.O_RDONLY)
    try:
        with open(root / "f", "r+b") as writer:
            writer.write(b"CHANGED!")
        assert os.pread(reader, 8, 0) == b"CHANGED!"
    finally:
        os.close(reader)


def test_upper_whiteouts_in_oci_form_when_asked(mounts, tmp_path, lowers):
    Pair(mounts, tmp_path, lowers, extra=("--whiteout-format", "oci"))
    root = mounts.points[-1]
    os.unlink(root / "f")
    os.unlink(root / "d/sub/h")
    os.rmdir(root / "d/sub")
    os.mkdir(root / "d/sub")
    upper = tmp_path / "ours-upper"
    assert (upper / ".wh.f").is_file()
    assert (upper / "d/sub/.wh..wh..opq").is_file()
    assert os.listdir(root / "d/sub") == []


def test_names_reserved_for_whiteouts_are_refused(mounts, tmp_path, lowers):
    pair = Pair(mounts, tmp_path, lowers)
    with pytest.raises(OSError) as caught:
        open(pair.ours / ".wh.sneaky", "w")
    assert caught.value.errno == errno.EINVAL


PATHS = ["f", "d", "d/f", "d/g", "d/sub", "d/sub/h", "e", "o", "o/new", "o/old", "big", "hl1", "hl2", "new",
         "d/new", "newdir", "newdir/x"]
path_strategy = st.sampled_from(PATHS)
op_strategy = st.one_of(
    st.tuples(st.just("write"), path_strategy, st.sampled_from([b"", b"data", b"x" * 5000]), st.sampled_from(["wb", "ab"])),
    st.tuples(st.just("read"), path_strategy),
    st.tuples(st.just("mkdir"), path_strategy),
    st.tuples(st.just("rmdir"), path_strategy),
    st.tuples(st.just("unlink"), path_strategy),
    st.tuples(st.just("rename"), path_strategy, path_strategy),
    st.tuples(st.just("link"), path_strategy, path_strategy),
    st.tuples(st.just("symlink"), st.just("target"), path_strategy),
    st.tuples(st.just("chmod"), path_strategy, st.sampled_from([0o600, 0o755])),
    st.tuples(st.just("truncate"), path_strategy, st.sampled_from([0, 3, 70000])),
    st.tuples(st.just("listdir"), st.sampled_from(["", "d", "o", "newdir", "d/sub"])),
    st.tuples(st.just("unlink-open"), path_strategy),
)


WHITEOUT_FORMATS = ["overlay", "oci"]
# Per whiteout form: 25 sequences each in the default suite, 150 each (300 in all) of up to 40 steps with --slow.
EXAMPLES = int(os.environ.get("LAYERMOUNT_EXAMPLES", "25"))
SLOW_EXAMPLES = int(os.environ.get("LAYERMOUNT_SLOW_EXAMPLES", "150"))
sequences = st.lists(op_strategy, min_size=1, max_size=12)
long_sequences = st.lists(op_strategy, min_size=1, max_size=40)


@contextlib.contextmanager
def fresh_pair(mounts, tmp_path_factory, lowers, whiteout_format):
    """A Pair and its kernel twin in a fresh directory, gone again when the example ends."""
    tmp = tmp_path_factory.mktemp("gen")
    pair = Pair(mounts, tmp, lowers, extra=("--whiteout-format", whiteout_format))
    try:
        with kernel_overlay(lowers, tmp / "kernel", upper=tmp / "kernel-upper", options=KERNEL_FEATURES) as kernel_root:
            yield pair, kernel_root
    finally:
        mounts.umount(pair.ours)
        mounts.points.remove(pair.ours)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("whiteout_format", WHITEOUT_FORMATS)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=sequences)
def test_generated_sequences_match_kernel_overlayfs(mounts, tmp_path_factory, lowers, whiteout_format, ops):
    with fresh_pair(mounts, tmp_path_factory, lowers, whiteout_format) as (pair, kernel_root):
        compare(pair, ops, kernel_root)


def link_count_differences(ours: dict, kernels: dict, kernel_upper: Path, lowers, aspects) -> list[str]:
    """st_nlink of every entry. A file's (aspect "nlink") must be the names the merged view has for it on
    layermount; the kernel's the same or the deliberate difference "nlink of a lower file". A directory's
    (aspect "dir-nlink") is 2 + its subdirectories, or 1 where that is not known without listing every
    layer; layermount may know it where the kernel says 1 ("nlink of a directory"), not the reverse."""
    lines = []
    names: dict[int, list[str]] = {}
    subdirs: dict[str, int] = {}
    for rel, entry in ours.items():
        if entry["type"] != "dir":
            names.setdefault(entry["ino"], []).append(rel)
        elif rel != ".":
            parent = os.path.dirname(rel) or "."
            subdirs[parent] = subdirs.get(parent, 0) + 1
    for rel in sorted(ours.keys() & kernels.keys()):
        mine, theirs = ours[rel]["nlink"], kernels[rel]["nlink"]
        if ours[rel]["type"] == "dir":
            exact = 2 + subdirs.get(rel, 0)
            if "dir-nlink" in aspects and mine not in (1, exact):
                lines.append(f"{rel}: directory nlink layermount={mine}, neither 1 nor {exact}")
            elif "dir-nlink" in aspects and mine != theirs and not directory_nlink_is_deliberate(mine, theirs, exact):
                lines.append(f"{rel}: directory nlink layermount={mine} kernel={theirs} (exact {exact})")
            continue
        if "nlink" not in aspects:
            continue
        merged = len(names[ours[rel]["ino"]])
        if mine != merged:
            lines.append(f"{rel}: layermount nlink={mine} but the merged view has {merged} names for it")
        if theirs != merged and not kernel_nlink_is_the_lower_count(rel, theirs, kernel_upper, lowers):
            lines.append(f"{rel}: kernel nlink={theirs} layermount={mine}, merged names {merged}")
    return lines


ASPECTS = frozenset({"mtime", "nlink", "dir-nlink"})


def step_differences(pair: Pair, ops, kernel_root: Path, aspects=ASPECTS):
    """Run ``ops`` on both mounts; yield (history, differences) after every step: the outcome, each entry's
    mtime (named by the step that last set it) and each link count. Directory mtimes included; atime and
    ctime aside."""
    kernel_upper = pair.tmp / "kernel-upper"
    clocks = (MtimeClock(), MtimeClock())
    history = []
    for step, op in enumerate([None, *ops]):
        lines = []
        next_clock_tick()
        step_start = coarse_now_ns()
        if op is not None:
            mine, theirs = apply(pair.ours, op), apply(kernel_root, op)
            history.append(f"  {step}: {op} -> {mine}")
            if comparable(op, mine) != comparable(op, theirs):
                yield history, [f"layermount {mine} but kernel overlayfs {theirs}"]
                return
        ours, kernels = stamps(pair.ours), stamps(kernel_root)
        if op is not None and op[0] == "unlink-open" and mine[0] == "ok" and "nlink" in aspects:
            lines += unlinked_fd_differences(op[1], mine[1], theirs[1][0], ours, kernel_upper, pair.lowers)
        ours_times = clocks[0].observe(step, step_start, ours)
        kernel_times = clocks[1].observe(step, step_start, kernels)
        for rel in sorted(ours.keys() & kernels.keys()) if "mtime" in aspects else ():
            if ours_times[rel] != kernel_times[rel]:
                lines.append(f"{rel} ({ours[rel]['type']}): mtime last set layermount {ours_times[rel]} "
                             f"kernel {kernel_times[rel]}")
        lines += link_count_differences(ours, kernels, kernel_upper, pair.lowers, aspects)
        yield history, lines


def compare_step_by_step(pair: Pair, ops, kernel_root: Path, aspects=ASPECTS):
    for history, lines in step_differences(pair, ops, kernel_root, aspects):
        assert not lines, "\n".join(["after the operations", *history, *lines])


def unlinked_fd_differences(rel, mine, theirs, ours_after, kernel_upper, lowers) -> list[str]:
    """fstat of a file opened (through a symlink, maybe) and then unlinked: st_nlink is the names it has
    left (0 when none). ``mine`` is layermount's (nlink, ino), ``theirs`` the kernel's nlink."""
    mine, ino = mine
    left = sum(1 for entry in ours_after.values() if entry["type"] != "dir" and entry["ino"] == ino)
    lines = []
    if mine != left:
        lines.append(f"{rel}: fstat after unlink layermount nlink={mine} but {left} names are left")
    if theirs != left and not kernel_nlink_is_the_lower_count(rel, theirs, kernel_upper, lowers):
        lines.append(f"{rel}: fstat after unlink kernel nlink={theirs} layermount={mine}, names left {left}")
    return lines


STEP_SCENARIOS = [   # (name, operations, aspects compared, marks: for both whiteout forms or {form: mark})
    ("upper-only files and directories", [
        ("write", "new", b"x", "wb"), ("utime", "new", 10**18), ("mkdir", "nd"), ("rename", "new", "nd/new"),
        ("link", "nd/new", "nd/l"), ("unlink", "nd/l"), ("write", "nd/new", b"y", "ab")], {"mtime", "nlink"}, ()),
    ("whiteout and hardlink at the root", [("unlink", "f"), ("link", "big", "big2"), ("stat", "big")],
     {"mtime", "nlink"}, ()),
    ("renamed lower directory knows its link count", [("rename", "d", "moved"), ("mkdir", "moved/x")],
     {"dir-nlink"}, ()),   # the fixture's opaque "o" shows it too
    ("chmod copies up a file in a lower directory", [("chmod", "d/f", 0o600)], {"mtime"}, ()),
    ("append copies up a file at the root", [("write", "f", b"+", "ab"), ("read", "f")], {"mtime"}, ()),
    ("chown copies up a symlink", [("chown", "link", 7, 7)], {"mtime"}, ()),
    ("a whiteout two levels down copies up the directories", [("unlink", "d/sub/h")], {"mtime"}, ()),
    ("copy-up after a rename in the same directory", [("rename", "d/g", "d/g2"), ("chmod", "d/f", 0o600)],
     {"mtime"}, ()),
    ("copy-up of a hardlinked lower file", [("truncate", "hl1", 3)], {"mtime"}, ()),
    ("rename a lower directory", [("rename", "d/sub", "newdir")], {"mtime"}, ()),
    ("rename a lower tree", [("rename", "d", "moved")], {"mtime"}, ()),
    ("rename a new directory onto a deleted name", [("mkdir", "nd"), ("unlink", "f"), ("rename", "nd", "f")],
     {"mtime"}, ()),
    ("opaque directory over a lower one", [("listdir", "o")], {"dir-nlink"}, ()),
    ("hardlink partner deleted", [("unlink", "hl2"), ("stat", "hl1")], {"nlink"}, ()),
    ("fstat of a lower hardlink unlinked while open", [("unlink-open", "hl1")], {"nlink"}, ()),
]


@pytest.mark.parametrize("whiteout_format, ops, aspects", [
    pytest.param(form, ops, frozenset(aspects), id=f"{name}-{form}",
                 marks=marks.get(form, ()) if isinstance(marks, dict) else marks)
    for name, ops, aspects, marks in STEP_SCENARIOS for form in WHITEOUT_FORMATS])
def test_step_by_step_scenario_matches_kernel_overlayfs(mounts, tmp_path_factory, lowers, whiteout_format, ops,
                                                        aspects):
    with fresh_pair(mounts, tmp_path_factory, lowers, whiteout_format) as (pair, kernel_root):
        compare_step_by_step(pair, ops, kernel_root, aspects)




@pytest.mark.parametrize("whiteout_format", WHITEOUT_FORMATS)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=sequences)
def test_generated_sequences_keep_mtimes_and_link_counts_like_kernel_overlayfs(mounts, tmp_path_factory, lowers,
                                                                              whiteout_format, ops):
    with fresh_pair(mounts, tmp_path_factory, lowers, whiteout_format) as (pair, kernel_root):
        compare_step_by_step(pair, ops, kernel_root)


@pytest.mark.slow
@pytest.mark.parametrize("whiteout_format", WHITEOUT_FORMATS)
@settings(max_examples=SLOW_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=long_sequences)
def test_long_generated_sequences_match_kernel_overlayfs_step_by_step(mounts, tmp_path_factory, lowers,
                                                                      whiteout_format, ops):
    with fresh_pair(mounts, tmp_path_factory, lowers, whiteout_format) as (pair, kernel_root):
        compare_step_by_step(pair, ops, kernel_root)
        compare(pair, [], kernel_root)


def test_diff_lists_changes_like_docker_diff(mounts, tmp_path, lowers):
    pair = Pair(mounts, tmp_path, lowers)
    root = pair.ours
    with open(root / "d/f", "ab") as handle:
        handle.write(b"!")
    os.unlink(root / "f")
    os.mkdir(root / "newdir")
    (root / "newdir/x").write_bytes(b"x")
    os.unlink(root / "o/new")
    os.rmdir(root / "o")
    os.mkdir(root / "o")
    (root / "o/z").write_bytes(b"z")
    expected = ["C /d", "C /d/f", "D /f", "A /newdir", "A /newdir/x", "C /o", "D /o/new", "A /o/z"]
    from conftest import run_layermount
    by_mount = run_layermount("diff", root)
    assert by_mount.returncode == 0, by_mount.stderr
    assert by_mount.stdout.splitlines() == expected
    by_upper = run_layermount("diff", tmp_path / "ours-upper", "--lowerdir", ":".join(map(str, lowers)), "--json")
    assert [f"{c['kind']} {c['path']}" for c in json.loads(by_upper.stdout)] == expected


def test_open_deleted_file_keeps_its_data_and_size(mounts, tmp_path, lowers):
    """apt writes a temp file it has already unlinked, then reads it back."""
    pair = Pair(mounts, tmp_path, lowers)
    for root in (pair.ours,):
        fd = os.open(root / "tmpfile", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.unlink(root / "tmpfile")
            os.write(fd, b"x" * 10000)
            os.lseek(fd, 0, os.SEEK_SET)
            assert os.fstat(fd).st_size == 10000 and os.fstat(fd).st_nlink == 0
            assert os.read(fd, 20000) == b"x" * 10000
            os.ftruncate(fd, 10)
            assert os.fstat(fd).st_size == 10
        finally:
            os.close(fd)


def as_user(uid: int, gid: int, *command) -> subprocess.CompletedProcess:
    """``command`` as an ordinary user; it may search pytest's 0700 temp dirs (CAP_DAC_READ_SEARCH), no more."""
    caps = ["--inh-caps=-all,+dac_read_search", "--ambient-caps=-all,+dac_read_search"]
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *caps,
                           *map(str, command)], capture_output=True, text=True, timeout=60)


def test_new_entries_in_a_setgid_directory_take_its_group(mounts, tmp_path):
    """Group inheritance, by root and by an ordinary user, against kernel overlayfs on the same lower."""
    lower = make_tree(tmp_path / "lower", {"shared/old": b"old", "plain/x": b"x"})
    os.chown(lower / "shared", 0, 50)
    os.chmod(lower / "shared", 0o2777)
    os.chmod(lower / "plain", 0o777)
    pair = Pair(mounts, tmp_path, [lower], extra=("--allow-other",))
    with kernel_overlay([lower], tmp_path / "kernel", upper=tmp_path / "kernel-upper",
                        options=KERNEL_FEATURES) as kernel_root:
        for root in (pair.ours, kernel_root):
            (root / "shared/by-root").write_bytes(b"r")
            os.mkdir(root / "shared/dir-by-root")
            for command in (["touch", root / "shared/by-user"], ["mkdir", root / "shared/dir-by-user"],
                            ["mkfifo", root / "shared/fifo-by-user"], ["touch", root / "plain/by-user"]):
                result = as_user(1000, 1000, *command)
                assert result.returncode == 0, f"{command}: {result.stderr}"
        ours, kernels = snapshot(pair.ours, mtimes=False), snapshot(kernel_root, mtimes=False)
    assert not diff_snapshots(ours, kernels, ("layermount", "kernel")), \
        "\n".join(diff_snapshots(ours, kernels, ("layermount", "kernel")))
    for name in ("by-root", "dir-by-root", "by-user", "dir-by-user", "fifo-by-user"):
        assert ours[f"shared/{name}"]["gid"] == 50, name
    assert ours["shared/dir-by-user"]["mode"] & 0o2000 and ours["shared/dir-by-root"]["mode"] & 0o2000
    assert (ours["shared/by-user"]["uid"], ours["plain/by-user"]["gid"]) == (1000, 1000)


def served_identity(root: Path) -> dict[str, tuple]:
    """Every entry's (st_ino, d_ino from readdir, st_dev)."""
    found = {}
    for directory, _dirs, _files in os.walk(root):
        with os.scandir(directory) as scan:
            for entry in scan:
                found[os.path.relpath(entry.path, root)] = (os.lstat(entry.path).st_ino, entry.inode(),
                                                           os.lstat(entry.path).st_dev)
    return found


def test_readdir_inode_numbers_and_device_agree_with_stat(mounts, tmp_path, lowers):
    pair = Pair(mounts, tmp_path, lowers)
    for op in [("write", "f", b"+", "ab"), ("rename", "d", "moved"), ("write", "hl1", b"!", "ab"), ("mkdir", "nd"),
               ("write", "nd/x", b"x", "wb"), ("unlink", "o/new")]:
        apply(pair.ours, op)
    identity = served_identity(pair.ours)
    assert all(st_ino == d_ino for st_ino, d_ino, _ in identity.values()), identity
    assert {dev for _, _, dev in identity.values()} == {os.lstat(pair.ours).st_dev}
    assert identity["hl1"][0] == identity["hl2"][0]


@pytest.mark.xfail(strict=True, reason=DELIBERATE_DIFFERENCES["st_ino after a remount"])
def test_inode_numbers_survive_a_remount_with_the_same_upper(mounts, tmp_path, lowers):
    pair = Pair(mounts, tmp_path, lowers)
    before = {rel: ino for rel, (ino, _, _) in served_identity(pair.ours).items()}
    for op in [("write", "f", b"+", "ab"), ("rename", "d", "moved"), ("write", "hl1", b"!", "ab"), ("chmod", "big", 0o600)]:
        apply(pair.ours, op)
    during = {rel: ino for rel, (ino, _, _) in served_identity(pair.ours).items()}
    assert during["moved/f"] == before["d/f"] and during["f"] == before["f"] and during["hl2"] == before["hl2"]
    mounts.umount(pair.ours)
    again = mounts.mount("-o", "lowerdir=" + ":".join(map(str, lowers)) +
                         f",upperdir={tmp_path / 'ours-upper'},workdir={tmp_path / 'ours-work'}",
                         mountpoint=mounts.mountpoint("again"), store=False)
    after = {rel: ino for rel, (ino, _, _) in served_identity(again).items()}
    changed = {rel: (during[rel], after.get(rel)) for rel in during if after.get(rel) != during[rel]}
    assert not changed, changed


LONG_NAME = "n" * 256   # one byte over NAME_MAX


def long_name_outcomes(root: Path) -> dict[str, tuple]:
    """Every call that takes a name, given one longer than NAME_MAX."""
    long = root / "d" / LONG_NAME
    calls = {
        "stat": lambda: os.stat(long), "chmod": lambda: os.chmod(long, 0o600),
        "chown": lambda: os.chown(long, 1, 1), "lchown": lambda: os.chown(long, 1, 1, follow_symlinks=False),
        "truncate": lambda: os.truncate(long, 0), "unlink": lambda: os.unlink(long), "rmdir": lambda: os.rmdir(long),
        "link-from": lambda: os.link(long, root / "d/new-link"), "link-to": lambda: os.link(root / "f", long),
        "rename-from": lambda: os.rename(long, root / "d/new-name"),
        "rename-to": lambda: os.rename(root / "d/g", long), "create": lambda: os.close(os.open(long, os.O_CREAT)),
        "mkdir": lambda: os.mkdir(long), "symlink": lambda: os.symlink("t", long),
        "mkfifo": lambda: os.mkfifo(long), "getxattr": lambda: os.getxattr(long, "user.x"),
    }
    return {name: outcome(call) for name, call in calls.items()}


def test_names_longer_than_name_max_are_enametoolong_in_every_call(mounts, tmp_path, lowers):
    pair = Pair(mounts, tmp_path, lowers)
    with kernel_overlay(lowers, tmp_path / "kernel", upper=tmp_path / "kernel-upper",
                        options=KERNEL_FEATURES) as kernel_root:
        kernels = long_name_outcomes(kernel_root)
        ours = long_name_outcomes(pair.ours)
    assert set(kernels.values()) == {("err", "ENAMETOOLONG")}
    assert ours == kernels


def near_path_max_outcomes(root: Path) -> list[tuple]:
    """create, truncate, stat and unlink by a relative path of PATH_MAX - 1 bytes, from a directory of the mount
    (the path the daemon sees from the mount's root is longer than PATH_MAX)."""
    base = root / "d/sub"
    components, last = ["c" * 250] * 16, None
    relative = "/".join(components)
    last = "f" * (4095 - len(relative) - 1)
    relative += "/" + last
    assert len(relative) == 4095
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for component in components:   # one level at a time: each mkdir's own path stays short
            os.mkdir(component, dir_fd=fd)
            inner = os.open(component, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    old_cwd = os.getcwd()
    os.chdir(base)
    try:
        results = [outcome(lambda: os.close(os.open(relative, os.O_WRONLY | os.O_CREAT, 0o644))),
                   outcome(lambda: os.truncate(relative, 123)), outcome(lambda: os.stat(relative).st_size),
                   outcome(lambda: os.chmod(relative, 0o600)), outcome(lambda: os.unlink(relative))]
    finally:
        os.chdir(old_cwd)
    return results


def test_a_path_near_path_max_from_inside_the_mount_works(mounts, tmp_path, lowers):
    pair = Pair(mounts, tmp_path, lowers)
    with kernel_overlay(lowers, tmp_path / "kernel", upper=tmp_path / "kernel-upper",
                        options=KERNEL_FEATURES) as kernel_root:
        kernels = near_path_max_outcomes(kernel_root)
        ours = near_path_max_outcomes(pair.ours)
    assert kernels == [("ok", None), ("ok", None), ("ok", 123), ("ok", None), ("ok", None)]
    assert ours == kernels


@pytest.mark.parametrize("change", ["write", "fchmod"])
def test_a_change_through_a_deleted_name_of_a_hardlinked_lower_file_reaches_its_other_name(mounts, tmp_path, change):
    """open hl1 (hardlinked in the lower layer with hl2, which the kernel has not looked up),
    unlink hl1, then write or fchmod through the fd: the file still has the name hl2, so the
    change must show there, as in kernel overlayfs, not land on a private copy."""
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "hl1").write_bytes(b"linked\n")
    os.link(lower / "hl1", lower / "hl2")
    os.chmod(lower / "hl1", 0o666)
    pair = Pair(mounts, tmp_path, [lower])
    with kernel_overlay([lower], tmp_path / "kernel", upper=tmp_path / "kernel-upper", options=KERNEL_FEATURES) as kernel_root:
        seen = []
        for root in (pair.ours, kernel_root):
            fd = os.open(root / "hl1", os.O_RDWR if change == "write" else os.O_RDONLY)
            try:
                os.unlink(root / "hl1")
                if change == "write":
                    os.pwrite(fd, b"HL", 0)
                else:
                    os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
            st = os.stat(root / "hl2")
            seen.append(((root / "hl2").read_bytes(), oct(st.st_mode), st.st_nlink))
        assert seen[0] == seen[1], f"layermount {seen[0]}, kernel overlayfs {seen[1]}"
    assert (lower / "hl2").read_bytes() == b"linked\n" and os.stat(lower / "hl2").st_mode & 0o777 == 0o666

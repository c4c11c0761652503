"""Load, through real mounts and ordinary syscalls: many writers at once, fio, stress-ng, memory.

16 processes change overlapping trees on one writable mount for 20 s while a watchdog checks the
mount keeps answering; then the live view, the upper re-merged offline by kernel overlayfs and a
remount must all agree. The races it exposed have a deterministic test each.
fio verifies what it wrote (crc32c), also after a remount; stress-ng runs the filesystem stressors
that make sense on an overlay. The daemon's memory is measured over repeated walks of a
100,000-entry tree, with the kernel made to forget its inodes between walks.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import Mounts, alive, host_nodes_restored
from oracle import diff_snapshots, kernel_overlay, snapshot
from test_faults import answers, disposable, tmpfs  # noqa: F401 - disposable, tmpfs: fixtures
from test_mount import make_tree
from unionfs.mount import daemon_pid

TESTS = Path(__file__).resolve().parent


def overlay_mount(mounts, tmp_path: Path, lowers: list[Path], *extra, name: str = "mnt") -> tuple[Path, str]:
    """A writable ``-o lowerdir=...,upperdir=,workdir=`` mount (the upper in overlayfs form)."""
    for directory in ("upper", "work"):
        (tmp_path / directory).mkdir(exist_ok=True)
    spec = ("lowerdir=" + ":".join(map(str, lowers)) +
            f",upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}")
    return mounts.mount("-o", spec, *extra, mountpoint=mounts.mountpoint(name), store=False), spec


class Watchdog:
    """Checks every half second, from its own thread, that the mount answers a listing within 5 s."""

    def __init__(self, point: Path):
        self.point = point
        self.failures: list[str] = []
        self.checks = 0
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            started = time.monotonic()
            ok = answers(self.point, timeout=5.0)
            took = time.monotonic() - started
            self.checks += 1
            self.slowest = max(self.slowest, took)
            if not ok:
                self.failures.append(f"no answer within 5 s at check {self.checks}")

    def __enter__(self) -> "Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


# ---- 16 processes, mixed operations, overlapping trees --------------------------------------

PROCESSES = 16
DURATION = 20.0
TREES = [f"t{i}" for i in range(4)]
SUBDIRS = ["s0", "s1", "s2", "x0", "x1"]          # s* exist in the lowers, x* do not
FILES = ["f0", "f1", "f2", "f3", "c0", "c1", "c2"]  # f* exist in the lowers, c* do not
# What a correct filesystem may answer to these operations racing each other.
EXPECTED = {"ENOENT", "EEXIST", "ENOTEMPTY", "ENOTDIR", "EISDIR", "EINVAL"}
EXPECTED_FOR = {"link": {"EPERM"}}   # link(2) of a directory


def lower_specs() -> tuple[dict, dict]:
    bottom, top = {}, {}
    for tree in TREES:
        for sub in SUBDIRS[:3]:
            for index, name in enumerate(FILES[:4]):
                size = 200_000 if index == 3 else 100 * (index + 1)
                bottom[f"{tree}/{sub}/{name}"] = random.Random(f"{tree}{sub}{name}").randbytes(size)
        bottom[f"{tree}/keep/deep/k"] = b"keep"
    top.update({"t0/s0/.wh.f0": b"", "t1/s1/.wh..wh..opq": b"", "t1/s1/f0": b"opaque top",
                "t2/s2/f1": b"top wins", "t3/new/f0": b"new in top", "t3/.wh.keep": b""})
    return top, bottom


def random_file(rng: random.Random) -> str:
    return f"{rng.choice(TREES)}/{rng.choice(SUBDIRS)}/{rng.choice(FILES)}"


def random_dir(rng: random.Random) -> str:
    return f"{rng.choice(TREES)}/{rng.choice(SUBDIRS)}"


def load_worker(root: str, seed: int, deadline: float) -> None:
    """Mixed operations until ``deadline``; prints a JSON report: counts and unexpected errors."""
    rng = random.Random(seed)
    counts: dict[str, dict[str, int]] = {}
    unexpected: list[str] = []
    path = lambda rel: os.path.join(root, rel)  # noqa: E731

    def data() -> bytes:
        return rng.randbytes(rng.choice((10, 1000, 5000, 70_000)))

    def write() -> None:
        mode = rng.choice(("ab", "r+b", "wb"))
        with open(path(random_file(rng)), mode) as handle:
            if mode == "r+b":
                handle.seek(rng.randrange(0, 300_000))
            handle.write(data())
            if rng.random() < 0.1:
                handle.flush()
                os.fsync(handle.fileno())

    def create() -> None:
        fd = os.open(path(random_file(rng)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data())
        finally:
            os.close(fd)

    def rename() -> None:
        if rng.random() < 0.6:
            os.rename(path(random_file(rng)), path(random_file(rng)))
        else:
            os.rename(path(random_dir(rng)), path(random_dir(rng)))

    operations = {
        "read": (5, lambda: open(path(random_file(rng)), "rb").read()),
        "write": (5, write),
        "create": (4, create),
        "unlink": (3, lambda: os.unlink(path(random_file(rng)))),
        "mkdir": (3, lambda: os.mkdir(path(random_dir(rng)))),
        "rmdir": (2, lambda: os.rmdir(path(random_dir(rng)))),
        "rename": (4, rename),
        "listdir": (3, lambda: os.listdir(path(random_dir(rng)))),
        "stat": (3, lambda: os.lstat(path(random_file(rng)))),
        "symlink": (1, lambda: os.symlink("target-" + rng.choice(FILES), path(random_file(rng)))),
        "link": (1, lambda: os.link(path(random_file(rng)), path(random_file(rng)), follow_symlinks=False)),
        "truncate": (1, lambda: os.truncate(path(random_file(rng)), rng.randrange(0, 100_000))),
        "chmod": (1, lambda: os.chmod(path(random_file(rng)), rng.choice((0o600, 0o644, 0o755)))),
        "setxattr": (1, lambda: os.setxattr(path(random_file(rng)), "user.load", rng.randbytes(8),
                                            follow_symlinks=False)),
    }
    names = list(operations)
    weights = [operations[name][0] for name in names]
    while time.time() < deadline:
        name = rng.choices(names, weights)[0]
        try:
            operations[name][1]()
            outcome = "ok"
        except OSError as exc:
            outcome = errno.errorcode.get(exc.errno, str(exc.errno))
            if outcome not in EXPECTED | EXPECTED_FOR.get(name, set()) and not (
                    name == "setxattr" and outcome == "EPERM"):   # user xattrs on symlinks
                unexpected.append(f"{name}: {exc!r}")
        counts.setdefault(name, {}).setdefault(outcome, 0)
        counts[name][outcome] += 1
    print(json.dumps({"counts": counts, "unexpected": unexpected[:20], "unexpected_total": len(unexpected)}))


@pytest.fixture(scope="module")
def mixed_load(tmp_path_factory):
    """Run the 16-process workload once; the tests below each judge one side of what it did."""
    tmp_path = tmp_path_factory.mktemp("load")
    mounts = Mounts(tmp_path, tmp_path / "store")
    try:
        top, bottom = lower_specs()
        lowers = [make_tree(tmp_path / "top", top), make_tree(tmp_path / "bottom", bottom)]
        log = tmp_path / "daemon.log"
        point, spec = overlay_mount(mounts, tmp_path, lowers, "--log", log)
        pid = daemon_pid(str(point))
        deadline = time.time() + DURATION
        code = "import sys, test_load; test_load.load_worker(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
        procs = [subprocess.Popen([sys.executable, "-c", code, str(point), str(seed), str(deadline)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for seed in range(PROCESSES)]
        result = {"reports": [], "stuck": [], "crashed": []}
        try:
            with Watchdog(point) as watchdog:
                for proc in procs:
                    try:
                        out, err = proc.communicate(timeout=max(deadline - time.time(), 0) + 60)
                    except subprocess.TimeoutExpired:
                        result["stuck"].append(proc.pid)
                        continue
                    if proc.returncode != 0:
                        result["crashed"].append(err[-2000:])
                    else:
                        result["reports"].append(json.loads(out))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=30)   # one stuck in a request dies once the clean-up unmounts
        result.update(watchdog=watchdog, daemon_alive=alive(pid), log=log.read_text())
        total: dict[str, int] = {}
        for report in result["reports"]:
            for outcomes in report["counts"].values():
                for outcome, count in outcomes.items():
                    total[outcome] = total.get(outcome, 0) + count
        result["total"] = total
        print(f"\n{sum(total.values())} operations by {PROCESSES} processes in {DURATION:.0f} s: "
              f"{dict(sorted(total.items()))}; watchdog: {watchdog.checks} checks, slowest answer "
              f"{watchdog.slowest:.2f} s")
        if result["stuck"]:
            yield result   # a deadlock: the consistency checks cannot run
            return
        try:
            result["live"] = snapshot(point)
        except OSError as exc:   # e.g. a name listed that lstat says does not exist
            result["live"] = f"the live mount cannot be walked: {exc!r}"
        mounts.umount(point)
        result["work_left"] = os.listdir(tmp_path / "work")
        with kernel_overlay([tmp_path / "upper", *lowers], tmp_path / "offline") as offline:
            result["offline"] = snapshot(offline)
        result["remount"] = snapshot(mounts.mount("-o", spec, mountpoint=point, store=False))
        yield result
    finally:
        mounts.cleanup()


def test_mixed_load_never_deadlocks_nor_crashes(mixed_load):
    assert not mixed_load["stuck"], f"workers {mixed_load['stuck']} never finished: deadlock?"
    assert not mixed_load["watchdog"].failures, mixed_load["watchdog"].failures
    assert not mixed_load["crashed"], mixed_load["crashed"]
    assert mixed_load["daemon_alive"] and "Traceback" not in mixed_load["log"]
    assert mixed_load["total"].get("ok", 0) > 1000


def test_mixed_load_upper_is_a_layer_kernel_overlayfs_and_a_remount_agree_on(mixed_load):
    """What reached the disk is consistent: the upper re-merged offline equals a fresh mount of it."""
    assert not mixed_load["stuck"]
    assert mixed_load["work_left"] == []
    differences = diff_snapshots(mixed_load["offline"], mixed_load["remount"], ("kernel overlayfs", "remount"))
    assert not differences, "\n".join(differences[:40])


def test_mixed_load_only_expected_errnos_and_the_live_view_matches_the_upper(mixed_load):
    unexpected = [line for report in mixed_load["reports"] for line in report["unexpected"]]
    assert not unexpected, unexpected
    assert isinstance(mixed_load["live"], dict), mixed_load["live"]
    differences = diff_snapshots(mixed_load["live"], mixed_load["offline"], ("live mount", "kernel overlayfs"))
    assert not differences, "\n".join(differences[:40])


def test_readdir_on_an_older_handle_does_not_resurrect_a_deleted_name(mounts, tmp_path):
    lower = make_tree(tmp_path / "lower", {"d/lower": b"lower"})
    point, _ = overlay_mount(mounts, tmp_path, [lower])
    for name in ("a", "b"):
        (point / "d" / name).write_bytes(name.encode())
    handle = os.open(point / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.unlink(point / "d/a")
        os.unlink(point / "d/lower")
        os.listdir(handle)   # POSIX lets this still list a; it must not bring it back
    finally:
        os.close(handle)
    assert sorted(os.listdir(point / "d")) == ["b"]
    for name in ("a", "lower"):
        with pytest.raises(FileNotFoundError):
            os.stat(point / "d" / name)


def test_new_directory_is_usable_while_a_removed_one_is_still_open(mounts, tmp_path):
    lower = make_tree(tmp_path / "lower", {"d/keep": b"keep"})
    point, _ = overlay_mount(mounts, tmp_path, [lower])
    os.mkdir(point / "d/x")
    host_x = os.stat(tmp_path / "upper/d/x").st_ino
    old = os.open(point / "d/x", os.O_RDONLY | os.O_DIRECTORY)   # e.g. a shell whose cwd it is
    try:
        os.rmdir(point / "d/x")
        os.mkdir(point / "d/y")
        if os.stat(tmp_path / "upper/d/y").st_ino != host_x:
            pytest.skip("the upper filesystem did not reuse the inode number; nothing to show")
        (point / "d/y/inside").write_bytes(b"y")
        assert os.listdir(point / "d/y") == ["inside"]
        with pytest.raises(FileNotFoundError):
            os.close(os.open("via-removed-dir", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=old))
    finally:
        os.close(old)
    assert sorted(os.listdir(point / "d")) == ["keep", "y"]


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_held_file_whose_hardlinks_are_all_removed_never_shares_its_number(mounts, tmp_path, kind):
    """The last name of a file goes after its hardlink partner's, while the kernel holds it.

    The listing still says nlink 2; were the file removed on that word, its host inode
    number would be freed unretired and ext4 hands it at once to the next new entry,
    served under the old st_ino (the kernel merges the two: a new file is read through
    the old handle, a new directory is EIO). As on a local filesystem, the held file lives
    on for its handle, and nothing new ever shares its number.
    """
    lower = make_tree(tmp_path / "lower", {"d/keep": b"keep"})
    point, _ = overlay_mount(mounts, tmp_path, [lower])
    for attempt in range(40):   # ext4 hands a freed inode number out again at once, nearly always
        first, second, new = (point / f"d/{name}{attempt}" for name in ("a", "b", "new"))
        first.write_bytes(b"the removed file")
        os.link(first, second)
        handle = os.open(first, os.O_PATH)   # the kernel keeps the inode; the daemon holds no fd of it
        try:
            os.unlink(second)
            os.unlink(first)
            if kind == "file":
                new.write_bytes(b"an unrelated new file")
            else:
                os.mkdir(new)
            assert os.stat(new).st_ino != os.fstat(handle).st_ino, f"attempt {attempt}: two files, one st_ino"
            with open(f"/proc/self/fd/{handle}", "rb") as reopened:
                assert reopened.read() == b"the removed file", f"attempt {attempt}"
            if kind == "dir":
                assert os.listdir(new) == []
        finally:
            os.close(handle)


def reopen_through_o_path(point: Path, handle: int) -> tuple:
    """Read, then append through /proc/self/fd of an O_PATH handle: (read outcome, append outcome)."""
    outcomes = []
    for mode in ("rb", "ab"):
        try:
            with open(f"/proc/self/fd/{handle}", mode) as reopened:
                outcomes.append(("ok", reopened.read() if mode == "rb" else reopened.write(b"+appended")))
        except OSError as exc:
            outcomes.append(("err", errno.errorcode[exc.errno]))
    return tuple(outcomes)


def replace_while_held(point: Path) -> tuple:
    (point / "d/old").write_bytes(b"OLD")
    (point / "d/new").write_bytes(b"NEW")
    handle = os.open(point / "d/old", os.O_PATH)   # holds the inode, sends no FUSE open
    try:
        os.rename(point / "d/new", point / "d/old")
        return reopen_through_o_path(point, handle)
    finally:
        os.close(handle)


def test_reopening_a_replaced_file_never_reaches_the_file_that_replaced_it(mounts, tmp_path):
    lower = make_tree(tmp_path / "lower", {"d/keep": b"keep"})
    point, _ = overlay_mount(mounts, tmp_path, [lower])
    read, append = replace_while_held(point)
    # Which file is reached is pinned down by the test below; whichever it is, never the new one.
    assert read != ("ok", b"NEW"), "the O_PATH handle of the replaced file reached its replacement"
    assert (point / "d/old").read_bytes() == b"NEW", f"the append ({append}) went into the replacement"


def test_reopening_a_replaced_file_reaches_the_old_file_like_kernel_overlayfs(mounts, tmp_path):
    lower = make_tree(tmp_path / "lower", {"d/keep": b"keep"})
    point, _ = overlay_mount(mounts, tmp_path, [lower])
    (tmp_path / "kernel-upper").mkdir()
    with kernel_overlay([lower], tmp_path / "kernel", upper=tmp_path / "kernel-upper") as kernel_root:
        assert replace_while_held(kernel_root) == (("ok", b"OLD"), ("ok", 9))
    assert replace_while_held(point) == (("ok", b"OLD"), ("ok", 9))
    assert (point / "d/old").read_bytes() == b"NEW"


def test_a_replaced_file_kept_for_the_kernel_goes_at_forget(mounts, tmp_path):
    """The daemon keeps a removed file the kernel holds (by an fd, never a name on disk);
    once the kernel forgets the inode, the fd goes and with it the file's blocks."""
    lower = make_tree(tmp_path / "lower", {"d/keep": b"keep"})
    point, _ = overlay_mount(mounts, tmp_path, [lower])
    pid = daemon_pid(str(point))
    upper = str((tmp_path / "upper").resolve())

    def kept() -> list[str]:
        targets = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        return [target for target in targets if target.startswith(upper) and target.endswith(" (deleted)")]

    (point / "d/old").write_bytes(b"OLD")
    (point / "d/new").write_bytes(b"NEW")
    handle = os.open(point / "d/old", os.O_PATH)
    try:
        os.rename(point / "d/new", point / "d/old")
        assert set(kept()) == {f"{upper}/d/old (deleted)"}   # by one fd or a few, all of the old file
        assert sorted(os.listdir(tmp_path / "upper/d")) == ["old"]   # nothing kept under a name
    finally:
        os.close(handle)
    deadline = time.monotonic() + 10
    while kept() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert kept() == []


# ---- fio -----------------------------------------------------------------------------------

FIO_COMMON = ["--ioengine=psync", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0",
              "--output-format=json"]
FIO_WRITE_JOBS = [
    # a file that exists in the lower layer with the job's size: every write goes to its copy-up
    ["--name=lower", "--filename=lower.0.0", "--size=32m", "--rw=randwrite", "--bs=4k", "--fsync=64"],
    ["--name=seq", "--size=32m", "--rw=write", "--bs=128k", "--end_fsync=1"],
    ["--name=rand", "--size=16m", "--rw=randwrite", "--bs=16k", "--numjobs=2"],
]
FIO_MIXED_JOB = ["--name=mixed", "--size=16m", "--rw=randrw", "--bs=8k"]


def run_fio(directory: Path, args: list[str]) -> list[dict]:
    result = subprocess.run(["fio", f"--directory={directory}", *FIO_COMMON, *args], capture_output=True,
                            text=True, timeout=300, cwd=directory.parent.parent)   # no files left in the cwd
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = json.loads(result.stdout[result.stdout.index("{"):])["jobs"]
    assert all(job["error"] == 0 for job in jobs), [(job["jobname"], job["error"]) for job in jobs]
    return jobs


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (scripts/setup installs it)")
def test_fio_verifies_what_it_wrote_also_after_a_remount(disposable, mounts, tmp_path):
    lower = tmp_path / "lower"
    disposable.extend([lower, tmp_path / "upper"])
    (lower / "data").mkdir(parents=True)
    (lower / "data" / "lower.0.0").write_bytes(os.urandom(32 << 20))
    point, spec = overlay_mount(mounts, tmp_path, [lower])
    with Watchdog(point) as watchdog:
        jobs = run_fio(point / "data", [arg for job in FIO_WRITE_JOBS + [FIO_MIXED_JOB] for arg in job])
    assert not watchdog.failures, watchdog.failures
    assert {job["jobname"] for job in jobs} == {"lower", "seq", "rand", "mixed"}
    assert all(job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0 for job in jobs)
    assert (tmp_path / "upper" / "data" / "lower.0.0").stat().st_size == 32 << 20
    mounts.umount(point)
    point = mounts.mount("-o", spec, mountpoint=point, store=False)
    run_fio(point / "data", ["--verify_only"] + [arg for job in FIO_WRITE_JOBS for arg in job])


# ---- stress-ng -------------------------------------------------------------------------------

# The filesystem class, less what cannot apply to a FUSE overlay: bind-mount, binderfs, chattr and
# inode-flags (ext* ioctls), dnotify/fanotify, handle (name_to_handle_at), ioprio, procfs, verity,
# fiemap (FUSE has no FIEMAP), and fsize: pyfuse3 has no fallocate handler, so fallocate(2) is
# EOPNOTSUPP and stress-ng's write emulation misreports RLIMIT_FSIZE (same on any pyfuse3 fs).
STRESSORS = ["access", "chdir", "chmod", "chown", "copy-file", "dentry", "dir", "dirdeep", "dirmany",
             "fallocate", "fcntl", "file-ioctl", "filename", "flock", "fpunch", "fstat", "getdent", "hdd",
             "inotify", "io", "iomix", "lease", "link", "locka", "lockf", "lockofd", "mknod", "open",
             "rename", "symlink", "sync-file", "touch", "utime", "xattr"]


@pytest.mark.slow   # about 45 s. One stressor at a time: run all at once (the inode-number reuse is fixed),
# file-ioctl's FIOQSIZE sees a size short of the file's (1048576 vs 831488) while the others write beside it.
@pytest.mark.skipif(shutil.which("stress-ng") is None, reason="stress-ng is not installed (scripts/setup installs it)")
def test_stress_ng_filesystem_stressors_pass(mounts, tmp_path):
    lower = make_tree(tmp_path / "lower", {"work/README": b"stress-ng runs here\n"})
    log = tmp_path / "daemon.log"
    point, _ = overlay_mount(mounts, tmp_path, [lower], "--log", log)
    pid = daemon_pid(str(point))
    failed = {}
    with Watchdog(point) as watchdog, host_nodes_restored():   # the open stressor touches /dev/null
        for name in STRESSORS:
            result = subprocess.run(["stress-ng", "--temp-path", str(point / "work"), f"--{name}", "1",
                                     "--timeout", "1s", "--verify"], capture_output=True, text=True, timeout=120)
            output = result.stdout + result.stderr
            failures = [line for line in output.splitlines() if "fail:" in line or "error:" in line]
            if result.returncode != 0 or failures or "successful run completed" not in output:
                failed[name] = failures or output[-1000:]
    assert not failed, failed
    assert not watchdog.failures, watchdog.failures
    assert alive(pid) and "Traceback" not in log.read_text()
    assert sorted(os.listdir(point / "work")) == ["README"]


def test_a_file_unlinked_while_open_keeps_its_data_and_size(mounts, tmp_path):
    """The temp-file pattern (open, unlink, write, fstat, read back); stress-ng's file-ioctl found it."""
    lower = make_tree(tmp_path / "lower", {"d/lower": b"lower data"})
    point, _ = overlay_mount(mounts, tmp_path, [lower])
    for name, initial in (("d/fresh", b""), ("d/lower", None)):
        fd = os.open(point / name, os.O_RDWR | (os.O_CREAT if initial is not None else 0), 0o644)
        try:
            os.unlink(point / name)
            os.lseek(fd, 0, os.SEEK_END)
            os.write(fd, b"y" * 100_000)
            start = b"" if initial is not None else b"lower data"
            assert os.fstat(fd).st_size == len(start) + 100_000
            assert os.pread(fd, 200_000, 0) == start + b"y" * 100_000
        finally:
            os.close(fd)
    assert os.listdir(point / "d") == []


# ---- memory -------------------------------------------------------------------------------------

ENTRIES = 100_000
WALKS = 5


def proc_status_mb(pid: int) -> dict[str, float]:
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024
    return found


def walk(point: Path) -> int:
    """A full walk: every entry listed and lstat'ed (find's %i needs the stat)."""
    result = subprocess.run(["find", str(point), "-mindepth", "1", "-printf", "%i\n"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return len(result.stdout.splitlines())


@pytest.mark.slow   # about 40 s: five walks of 100,000 entries through the Python daemon
def test_daemon_memory_over_repeated_walks_of_100k_entries(tmpfs, mounts):
    fs = tmpfs("tree", "size=64m,nr_inodes=200000,mode=0755")
    lower = fs / "lower"
    lower.mkdir()
    for directory in range(100):
        (lower / f"d{directory:03d}").mkdir()
        for index in range(ENTRIES // 100 - 1):
            os.close(os.open(lower / f"d{directory:03d}" / f"f{index:04d}", os.O_WRONLY | os.O_CREAT, 0o644))
    point = mounts.mount_lowers([lower])
    pid = daemon_pid(str(point))
    start = proc_status_mb(pid)
    after_walk, after_forget = [], []
    for _ in range(WALKS):
        assert walk(point) == ENTRIES
        after_walk.append(proc_status_mb(pid))
        with open("/proc/sys/vm/drop_caches", "w") as drop:   # the kernel forgets the inodes: FORGETs
            drop.write("2\n")
        time.sleep(1.0)
        after_forget.append(proc_status_mb(pid)["VmRSS"])
    peak = max(status["VmHWM"] for status in after_walk)
    rss = [status["VmRSS"] for status in after_walk]
    print(f"daemon memory, {ENTRIES} entries: start {start['VmRSS']:.0f} MB, VmHWM {peak:.0f} MB, "
          f"VmRSS after walks {', '.join(f'{value:.0f}' for value in rss)} MB, "
          f"after forgets {', '.join(f'{value:.0f}' for value in after_forget)} MB")
    assert peak < 400, f"peak RSS {peak:.0f} MB after walking {ENTRIES} entries"
    # Lookups and forgets balance: walk 5 costs no more than walk 2, and the forgets free memory.
    assert rss[4] <= rss[1] * 1.15 + 8, f"RSS grew across walks: {rss}"
    assert after_forget[4] <= after_forget[1] * 1.15 + 8, f"RSS after forgets grew: {after_forget}"
    assert max(after_forget) < max(rss) - 0.1 * (max(rss) - start["VmRSS"]), \
        f"nothing freed when the kernel forgot the inodes: {rss} vs {after_forget}"
    assert answers(point)

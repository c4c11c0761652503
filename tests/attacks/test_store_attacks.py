"""Attacks on the store, the upper, commit and the mountpoint (issue 9: 1, 3, 4, 7, 15, 16, the mountpoint race).

Each case is what an unprivileged user on the same host (``nobody``, no
capabilities) or a hostile image tries, and what must hold. Host sentinels
(a root-only directory with a secret, a non-empty directory to mount over)
are planted and checked around the cases that aim at them.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from conftest import alive, run_layermount
from unionfs.fuse_ops import NO_OPEN
from unionfs.image.writer import Device, Dir, File, layer_tar, new_config, write_image
from unionfs.mount import FSTYPE, daemon_pid, is_mounted, mount_entries

NOBODY = 65534
SECRET = b"HOST-SECRET-9f3a"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("fusermount3"),
    reason="needs root to plant host sentinels and to act as nobody (setpriv), and fusermount3")


# ---- helpers ----------------------------------------------------------------------

NOBODY_PREFIX = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
                 "--bounding-set=-all", "/bin/sh", "-c", 'exec "$0" "$@"']
# setpriv itself still holds root's capabilities while it resolves the command it execs: the shell
# in between resolves it as a plain nobody.
NOBODY_PYTHON = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                 "--inh-caps=-all,+dac_read_search", "--ambient-caps=-all,+dac_read_search", sys.executable]
# This machine's Python lives under /root: a nobody running it keeps CAP_DAC_READ_SEARCH (as in
# test_rootless), which matters to none of the cases that use it (holding fds, a spoof daemon, a racer).


def as_nobody(*command, check=True, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    """Run as nobody:nogroup with no capabilities at all (an ordinary other user)."""
    full = [*NOBODY_PREFIX, *map(str, command)]
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "PYTHONPATH": str(Path(__file__).parents[2])}
    result = subprocess.run(full, capture_output=True, text=True, env=env, timeout=timeout, **kwargs)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def unmount_below(base: Path) -> None:
    for point, kind in reversed(mount_entries()):
        if point.startswith(str(base)) and kind.startswith("fuse"):
            pid = daemon_pid(point) if kind == FSTYPE else None
            subprocess.run(["fusermount3", "-uz", point], capture_output=True)
            deadline = time.monotonic() + 10
            while pid and alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)


@pytest.fixture(autouse=True)
def deep_trees_removed(tmp_path):
    """The deep trees these cases build would make pytest's own (recursive) clean-up fail: rm -rf is iterative."""
    yield
    for child in tmp_path.iterdir():
        subprocess.run(["rm", "-rf", "--one-file-system", str(child)], capture_output=True)


@pytest.fixture
def shared_dir():
    """A directory other users can traverse (0755, as a home or /srv is): pytest's tmp dirs are 0700."""
    path = Path(tempfile.mkdtemp(prefix="layermount-attack-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        unmount_below(path)
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], capture_output=True)


@pytest.fixture
def host_secret(tmp_path) -> Path:
    """A root-only host directory holding a secret (the sentinel the attacks aim at)."""
    secret = tmp_path / "root-only"
    secret.mkdir(mode=0o700)
    (secret / "zz").write_bytes(SECRET)
    (secret / "big").write_bytes(SECRET)
    return secret


@pytest.fixture
def user_fuse():
    """/dev/fuse as udev leaves it (0666) and user_allow_other as rootless podman set-ups have it.

    Yields a function that puts both back at once: fusermount3 reads fuse.conf only while
    mounting, and other tests on this host want it as it was.
    """
    mode = os.stat("/dev/fuse").st_mode & 0o777
    conf = Path("/etc/fuse.conf")
    before = conf.read_bytes() if conf.exists() else None
    restored = False

    def restore() -> None:
        nonlocal restored
        if not restored:
            restored = True
            os.chmod("/dev/fuse", mode)
            if before is None:
                conf.unlink()
            else:
                conf.write_bytes(before)

    os.chmod("/dev/fuse", 0o666)
    conf.write_bytes((before or b"") + b"\nuser_allow_other\n")
    try:
        yield restore
    finally:
        restore()


def image_with(out: Path, *layers, tag="attack:latest") -> Path:
    config = new_config([f"step {index}" for index in range(len(layers))])
    write_image(out, [layer_tar(layer) for layer in layers], config, repo_tag=tag)
    out.chmod(0o644)
    return out


def with_wrong_diff_id(image: Path, out: Path) -> Path:
    """The same docker archive, its config claiming another diff_id for layer 1."""
    members = {}
    with tarfile.open(image) as tar:
        for member in tar.getmembers():
            members[member.name] = (member, tar.extractfile(member).read() if member.isfile() else None)
    manifest = json.loads(members["manifest.json"][1])
    config = json.loads(members[manifest[0]["Config"]][1])
    config["rootfs"]["diff_ids"][0] = "sha256:" + "0" * 64
    data = json.dumps(config).encode()
    del members[manifest[0]["Config"]]
    manifest[0]["Config"] = hashlib.sha256(data).hexdigest() + ".json"
    with tarfile.open(out, "w") as tar:
        for name, (member, content) in members.items():
            if name == "manifest.json":
                content = json.dumps(manifest).encode()
                member.size = len(content)
            tar.addfile(member, io.BytesIO(content) if content is not None else None)
        info = tarfile.TarInfo(manifest[0]["Config"])
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out


def deep_dirs(depth: int) -> list:
    return [Dir("/".join(["d"] * level)) for level in range(1, depth + 1)] + \
        [File("/".join(["d"] * depth) + "/bottom", b"deep")]


def make_deep(root_fd: int, depth: int) -> None:
    """``depth`` nested directories below a directory fd (no path is ever that long)."""
    current = os.dup(root_fd)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=current)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=current)
            os.close(current)
            current = child
        os.close(os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=current))
    finally:
        os.close(current)


SETUID_IMAGE = [
    Dir("shared", mode=0o777),                     # a world-writable directory in the image (a /tmp without sticky)
    Dir("shared/tools"),
    File("shared/tools/su", Path("/usr/bin/id").read_bytes(), mode=0o4755),   # a setuid-root binary
    Device("shared/tools/zero", "char", 1, 5, mode=0o666),                   # a device node
    Dir("etc"), File("etc/hostname", b"image\n"),
]


# ---- 1: kept uppers reachable by everyone -------------------------------------------

def test_a_setuid_binary_copied_up_by_another_user_cannot_be_run_from_the_upper(shared_dir, mounts):
    """Attack: on an --allow-other mount, nobody renames an image directory holding a setuid-root
    binary and a device; the copy-up puts them, root-owned, into DIR/diff outside the nosuid,nodev
    mount, and nobody runs the binary from there on the host. Must hold: DIR is 0700, so nobody
    can neither run the binary (euid 0) nor open the device through DIR/diff."""
    image = image_with(shared_dir / "image.tar", SETUID_IMAGE)
    mountpoint, upper = shared_dir / "mnt", shared_dir / "upper"
    mountpoint.mkdir()
    mounts.mount(image, "--upper", upper, "--allow-other", "-q", mountpoint=mountpoint)
    as_nobody("mv", mountpoint / "shared/tools", mountpoint / "shared/moved")
    copied = upper / "diff/shared/moved/su"
    assert os.stat(copied).st_mode & 0o4000 and os.stat(copied).st_uid == 0     # the copy-up happened
    ran = as_nobody(copied, check=False)
    assert "euid=0" not in ran.stdout and ran.returncode != 0 and "Permission denied" in ran.stderr
    read = as_nobody("head", "-c", "4", upper / "diff/shared/moved/zero", check=False)
    assert read.returncode != 0 and "Permission denied" in read.stderr
    assert os.stat(upper).st_mode & 0o777 == 0o700 and os.stat(upper / "work").st_mode & 0o777 == 0o700
    # Through the mount itself nosuid still holds.
    assert "euid=0" not in as_nobody(mountpoint / "shared/moved/su").stdout


@pytest.mark.parametrize("case", ["upper 0755", "parent writable by others", "parent owned by nobody",
                                  "upper owned by nobody"])
def test_an_upper_other_users_can_reach_into_is_refused(shared_dir, mounts, case):
    """Attack: an --upper DIR that others can enter, or whose parent chain lets them swap DIR for
    a directory (or symlink) of their own before the next mount. Must hold: refused in one line,
    exit 4, nothing mounted and nothing created in it; --upper-shared accepts it on purpose."""
    image = image_with(shared_dir / "image.tar", SETUID_IMAGE)
    parent = shared_dir / "parent"
    parent.mkdir()
    upper = parent / "upper"
    if case == "upper 0755":
        upper.mkdir(mode=0o755)
        upper.chmod(0o755)
    elif case == "parent writable by others":
        parent.chmod(0o777)
    elif case == "parent owned by nobody":
        os.chown(parent, NOBODY, NOBODY)
    else:
        upper.mkdir(mode=0o700)
        os.chown(upper, NOBODY, NOBODY)
    result = mounts.mount(image, "--upper", upper, "-q", expect_ok=False)
    assert result.returncode == 4, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--upper-shared" in result.stderr
    assert not is_mounted(str(shared_dir / "mnt"))
    assert not (upper / "diff").exists()
    mounts.mount(image, "--upper", upper, "--upper-shared", "-q", mountpoint=mounts.mountpoint("mnt2"))


def test_the_store_is_private_and_an_old_open_store_is_closed(tmp_path, shared_dir):
    """Attack: the store holds layers unpacked as root (setuid binaries, devices); nobody runs
    store/layers/<diff_id>/diff/.../su. Must hold: the store root is 0700, also one an older
    layermount left 0755."""
    image = image_with(shared_dir / "image.tar", SETUID_IMAGE)
    store = shared_dir / "store"
    store.mkdir(mode=0o755)
    store.chmod(0o755)
    assert run_layermount("unpack", image, "--store", store, "-q").returncode == 0
    assert store.stat().st_mode & 0o777 == 0o700
    su = next(store.glob("layers/*/diff/shared/tools/su"))
    ran = as_nobody(su, check=False)
    assert "euid=0" not in ran.stdout and "Permission denied" in ran.stderr


# ---- 3: commit follows symlinks planted during the walk ------------------------------

class _SwapWhileTarring(io.RawIOBase):
    """The tar output; when the big file's data starts to arrive, the attack runs once."""

    def __init__(self, attack):
        self.data = bytearray()
        self.attack = attack
        self.fired = False

    def writable(self) -> bool:
        return True

    def write(self, chunk) -> int:
        if not self.fired and b"B" * 4096 in bytes(chunk):
            self.fired = True
            self.attack()
        self.data += chunk
        return len(chunk)


def test_commit_never_tars_a_host_file_through_a_directory_swapped_mid_walk(shared_dir, mounts, host_secret):
    """Attack: while commit tars a large file of an upper, a user of the --allow-other mount renames
    its directory away and puts a symlink to a root-only host directory in its place, so that the
    next names of that directory resolve on the host. Must hold: the layer written holds the
    upper's own files, never the host's secret (deterministic: the swap runs inside the write of
    the big file's data)."""
    from unionfs.tools.diff import write_layer_tar

    image = image_with(shared_dir / "image.tar", SETUID_IMAGE)
    mountpoint, upper = shared_dir / "mnt", shared_dir / "upper"
    mountpoint.mkdir()
    mounts.mount(image, "--upper", upper, "--allow-other", "-q", mountpoint=mountpoint)
    work = mountpoint / "shared/d"
    as_nobody("mkdir", work)
    as_nobody("sh", "-c", f"head -c 8388608 /dev/zero | tr '\\0' B > {work}/big && echo own > {work}/zz")

    def swap():
        as_nobody("sh", "-c", f"mv {work} {work}-moved && ln -s {host_secret} {work}")

    out = _SwapWhileTarring(swap)
    try:
        write_layer_tar(str(upper / "diff"), out)
    except Exception as exc:          # refusing is fine too; reading the host is not
        assert "layermount" in type(exc).__module__ or isinstance(exc, OSError), exc
    assert out.fired and os.path.islink(upper / "diff/shared/d")
    assert SECRET not in out.data
    if out.data:
        names = tarfile.open(fileobj=io.BytesIO(bytes(out.data))).getnames()
        assert "shared/d/zz" in names


def test_a_committed_image_is_no_wider_than_its_source(shared_dir, mounts, tmp_path):
    """Attack: the committed image holds the upper's files; written 0644 it lets every user read
    what only root could. Must hold: mode is the caller's umask and never wider than the source."""
    image = image_with(shared_dir / "image.tar", SETUID_IMAGE)
    image.chmod(0o600)
    upper = tmp_path / "upper"
    mounts.mount(image, "--upper", upper, "-q")
    out = shared_dir / "new.tar"
    result = run_layermount("commit", image, upper, "-o", out)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o777 == 0o600


# ---- 4: one bad image bricks the store ------------------------------------------------

def test_a_2000_level_layer_with_a_wrong_diff_id_leaves_the_store_working(tmp_path, store_dir, mounts):
    """Attack: a layer 2,000 directories deep whose diff_id is wrong; the clean-up of its unpack
    used to recurse (RecursionError) and leave tmp/ so that every later unpack, mount and gc failed.
    Must hold: a one-line exit 3, tmp/ empty, and the store keeps working for other images."""
    good = image_with(tmp_path / "good.tar", [Dir("etc"), File("etc/hostname", b"good\n")], tag="good:1")
    bad = with_wrong_diff_id(image_with(tmp_path / "deep.tar", deep_dirs(2000)), tmp_path / "bad.tar")
    result = run_layermount("unpack", bad, "--store", store_dir, "-q")
    assert result.returncode == 3 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "diff_id mismatch" in result.stderr
    assert os.listdir(store_dir / "tmp") == []
    for command in (["unpack", good, "-q"], ["store", "gc"], ["store", "ls"]):
        again = run_layermount(*command, "--store", store_dir)
        assert again.returncode == 0, again.stderr
    point = mounts.mount(good, "--read-only", "-q")
    assert (point / "etc/hostname").read_text() == "good\n"


def test_a_deep_leftover_in_tmp_is_cleared_by_the_next_command(tmp_path, store_dir):
    """Attack: a killed unpack of a 2,000-level layer leaves it in tmp/. Must hold: the next
    command clears it instead of failing on it."""
    good = image_with(tmp_path / "good.tar", [File("f", b"x")], tag="good:1")
    assert run_layermount("unpack", good, "--store", store_dir, "-q").returncode == 0
    leftover = store_dir / "tmp" / ("0" * 64 + ".killed")
    leftover.mkdir()
    fd = os.open(leftover, os.O_RDONLY | os.O_DIRECTORY)
    try:
        make_deep(fd, 2000)
    finally:
        os.close(fd)
    result = run_layermount("store", "gc", "--store", store_dir)
    assert result.returncode == 0, result.stderr
    assert os.listdir(store_dir / "tmp") == []


def test_a_throw_away_upper_1100_levels_deep_is_removed_at_unmount(tmp_path, store_dir, mounts):
    """Attack: a user builds 1,100 nested directories in a throw-away upper; the daemon's clean-up
    at unmount used to fail (silently) and leave it in the store. Must hold: gone after unmount."""
    image = image_with(tmp_path / "image.tar", [Dir("etc"), File("etc/hostname", b"x\n")])
    point = mounts.mount(image, "-q")
    fd = os.open(point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        make_deep(fd, 1100)
    finally:
        os.close(fd)
    assert [name for name in os.listdir(store_dir / "tmp") if name.startswith("mount-")]
    mounts.umount(point)
    assert [name for name in os.listdir(store_dir / "tmp") if name.startswith("mount-")] == []


def test_diff_of_an_upper_1100_levels_deep_works(tmp_path, store_dir, mounts):
    """Attack: a deep upper made `diff` die with RecursionError. Must hold: every level listed."""
    image = image_with(tmp_path / "image.tar", [Dir("etc"), File("etc/hostname", b"x\n")])
    upper = tmp_path / "upper"
    point = mounts.mount(image, "--upper", upper, "-q")
    mounts.umount(point)
    fd = os.open(upper / "diff", os.O_RDONLY | os.O_DIRECTORY)
    try:
        make_deep(fd, 1100)
    finally:
        os.close(fd)
    result = run_layermount("diff", upper, "--json")
    assert result.returncode == 0, result.stderr[-300:]
    paths = [change["path"] for change in json.loads(result.stdout)]
    assert len(paths) == 1101 and paths[-1].endswith("/d/bottom")


# ---- 7: fd starvation -----------------------------------------------------------------

HOLD_FILES = """
import os, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held, failure = [], ""
for _ in range(int(sys.argv[2])):
    try:
        held.append(os.open(sys.argv[1], os.O_RDONLY))
    except OSError as exc:
        failure = exc.errno
        break
print(len(held), failure, flush=True)
sys.stdin.read()
"""


def _limited(soft: int, hard: int):
    def apply():
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return apply


def test_a_user_holding_many_files_open_cannot_starve_roots_requests(shared_dir, mounts):
    """Attack: nobody holds 1,100 files of an --allow-other mount open, one daemon fd each, against
    the daemon's default soft limit of 1,024; root's `ls` then failed with EMFILE. Must hold: the
    daemon takes its hard limit, so root's ls works while the files are held."""
    image = image_with(shared_dir / "image.tar", SETUID_IMAGE)
    point = shared_dir / "mnt"
    point.mkdir()
    result = subprocess.run([sys.executable, "-m", "unionfs", image, point, "--allow-other", "--read-only",
                             "-q", "--store", mounts.store], capture_output=True, text=True,
                            preexec_fn=_limited(1024, 8192), timeout=120)
    assert result.returncode == 0, result.stderr
    mounts.points.append(point)
    mounts.pids.add(daemon_pid(str(point)))
    holder = subprocess.Popen([*NOBODY_PYTHON, "-c", HOLD_FILES, point / "etc/hostname", "1100"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              preexec_fn=_limited(4096, 4096))
    try:
        held = holder.stdout.readline().split()
        listing = subprocess.run(["ls", point / "shared/tools"], capture_output=True, text=True)
        assert listing.returncode == 0, listing.stderr
        assert "su" in listing.stdout.split()
        assert held[0] == "1100", held
    finally:
        holder.communicate("")


def test_running_out_of_fds_fails_only_the_request_that_needed_one(shared_dir, mounts):
    """Attack: nobody opens files until the daemon has no fd left. Must hold: those opens fail
    with EMFILE, the daemon keeps serving, and everything works again once they are closed."""
    image = image_with(shared_dir / "image.tar", SETUID_IMAGE)
    point = shared_dir / "mnt"
    point.mkdir()
    result = subprocess.run([sys.executable, "-m", "unionfs", image, point, "--allow-other", "--read-only",
                             "-q", "--store", mounts.store], capture_output=True, text=True,
                            preexec_fn=_limited(256, 256), timeout=120)
    assert result.returncode == 0, result.stderr
    pid = daemon_pid(str(point))
    mounts.points.append(point)
    mounts.pids.add(pid)
    holder = subprocess.Popen([*NOBODY_PYTHON, "-c", HOLD_FILES, point / "etc/hostname", "1000"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        held = holder.stdout.readline().split()
        if NO_OPEN:      # a read-only mount is not asked at open: holding files costs the daemon nothing
            assert held == ["1000"], held
        else:
            count, failure = held
            assert int(count) < 256 and int(failure) in (errno.EMFILE, errno.ENFILE)
        assert os.listdir(point / "etc") == ["hostname"]          # answered from the kernel's cache or fresh
        assert alive(pid)
    finally:
        holder.communicate("")
    assert (point / "etc/hostname").read_text() == "image\n"
    assert alive(pid)


def test_reading_more_files_than_the_daemon_has_fds_for_works(tmp_path, mounts):
    """Attack: on a read-only mount served by inode (no OPEN), read more distinct files than the
    daemon may hold fds. Must hold: every read works; the daemon closes what it keeps open by
    inode instead of failing the read."""
    lower = tmp_path / "lower"
    lower.mkdir()
    for index in range(400):
        (lower / f"f{index}").write_bytes(b"%d\n" % index)
    point = tmp_path / "mnt"
    point.mkdir()
    result = subprocess.run([sys.executable, "-m", "unionfs", "-o", f"lowerdir={lower}", point],
                            capture_output=True, text=True, preexec_fn=_limited(128, 128), timeout=120)
    assert result.returncode == 0, result.stderr
    pid = daemon_pid(str(point))
    mounts.points.append(point)
    mounts.pids.add(pid)
    for index in range(400):
        assert (point / f"f{index}").read_bytes() == b"%d\n" % index
    assert alive(pid)


# ---- 15: spoofed mounts ---------------------------------------------------------------

SPOOF = """
import json, os, stat, sys, pyfuse3, trio
secret = sys.argv[2]
class Spoof(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        attr = pyfuse3.EntryAttributes()
        attr.st_ino, attr.st_mode, attr.st_nlink = inode, stat.S_IFDIR | 0o755, 2
        attr.st_uid, attr.st_gid = os.getuid(), os.getgid()
        return attr
    async def getxattr(self, inode, name, ctx=None):
        if name == b"user.layermount.stack":
            return json.dumps([{"name": "upper", "path": secret}, {"name": "sha256:" + "1" * 64, "path": "/etc"}]).encode()
        if name == b"user.layermount.pid":
            return str(os.getpid()).encode()
        raise pyfuse3.FUSEError(61)
    async def opendir(self, inode, ctx):
        return inode
    async def readdir(self, fh, off, token):
        return
pyfuse3.init(Spoof(), sys.argv[1], {"fsname=layermount", "subtype=layermount", "allow_other"})
print("ready", flush=True)
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close()
"""


def test_diff_and_commit_refuse_a_mount_made_by_another_user(shared_dir, tmp_path, host_secret, user_fuse):
    """Attack: nobody runs a 40-line FUSE daemon calling itself layermount whose stack names a
    root-only host directory as its upper; root runs diff/commit/which on it. Must hold: refused
    (one line, exit 5), no image written, the secret nowhere in the output."""
    image = image_with(shared_dir / "image.tar", SETUID_IMAGE)
    point = shared_dir / "spoof"
    point.mkdir()
    os.chown(point, NOBODY, NOBODY)
    script = shared_dir / "spoof.py"
    script.write_text(SPOOF)
    spoof = subprocess.Popen([*NOBODY_PYTHON, script, point, host_secret],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={"PATH": os.environ["PATH"]})
    try:
        assert spoof.stdout.readline().strip() == "ready", spoof.stderr.read()
        user_fuse()
        assert is_mounted(str(point), FSTYPE)
        out = tmp_path / "stolen.tar"
        results = [run_layermount("commit", image, point, "-o", out),
                   run_layermount("diff", point), run_layermount("which", point / "zz")]
        for result in results:
            assert result.returncode == 5, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1 and "uid 65534" in result.stderr
            assert SECRET.decode() not in result.stdout + result.stderr
        assert not out.exists()
    finally:
        unmount_below(point)
        spoof.kill()
        spoof.wait()


# ---- 16: store rm of a too-short reference ----------------------------------------------

@pytest.mark.parametrize("reference", ["sha256", "sha256:", "short id", "shared tag"])
def test_store_rm_refuses_a_reference_matching_several_images_or_too_short(tmp_path, store_dir, reference):
    """Attack (or typo): `store rm sha256` matched every image and the next gc deleted all layers.
    Must hold: an ambiguous name (a prefix of every id, a tag two images share) or an id shorter
    than 12 digits is refused in one line before anything is forgotten; gc then removes nothing."""
    for index in range(2):
        image = image_with(tmp_path / f"image{index}.tar", [File("f", b"%d" % index)], tag="shared:tag")
        assert run_layermount("unpack", image, "--store", store_dir, "-q").returncode == 0
    before = sorted(os.listdir(store_dir / "images"))
    name = {"short id": before[0][:5], "shared tag": "shared:tag"}.get(reference, reference)
    result = run_layermount("store", "rm", name, "--store", store_dir)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(os.listdir(store_dir / "images")) == before
    gc = run_layermount("store", "gc", "--store", store_dir)
    assert gc.returncode == 0 and gc.stdout.startswith("removed 0 layers"), gc.stdout
    exact = run_layermount("store", "rm", before[0][:12], "--store", store_dir)
    assert exact.returncode == 0 and sorted(os.listdir(store_dir / "images")) == before[1:]


# ---- also: the mountpoint swapped between the check and mount(2) --------------------------

RACER = """
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
os.chdir(sys.argv[1])
watch = libc.inotify_init1(os.O_NONBLOCK)
libc.inotify_add_watch(watch, b"mnt", 0x20)              # IN_OPEN of the mountpoint directory itself
print("watching", flush=True)
opened = 0
while opened < int(sys.argv[2]):
    try:
        data = os.read(watch, 4096)       # busy: the window after the last check is a few ms
    except BlockingIOError:
        continue
    while data:
        _, mask, _, length = struct.unpack_from("iIII", data)
        opened += bool(mask & 0x20)
        data = data[16 + length:]
libc.renameat2(-100, b"mnt", -100, b"link", 2)            # RENAME_EXCHANGE: now mnt is the symlink
print("swapped", flush=True)
"""


def test_a_mountpoint_swapped_for_a_symlink_before_mount_never_covers_the_target(shared_dir, tmp_path):
    """Attack: nobody owns the mountpoint's parent; right after root's last check of the (empty)
    mountpoint (seen by inotify as its second open: the CLI's early check, then the mount's), it
    swaps the mountpoint with a symlink to a non-empty host directory, so that mount(2), resolving
    the path again, lands on /etc-like contents. Must hold: the victim is never mounted over."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "sentinel").write_text("host file")
    image = image_with(tmp_path / "image.tar", [Dir("etc"), File("etc/hostname", b"image\n")])
    store = tmp_path / "store"
    assert run_layermount("unpack", image, "--store", store, "-q").returncode == 0
    attacker = shared_dir / "attacker"
    attacker.mkdir()
    os.chown(attacker, NOBODY, NOBODY)
    covered = []
    try:
        for attempt in range(5):
            for name in ("mnt", "link"):
                if os.path.islink(attacker / name):
                    (attacker / name).unlink()
                elif (attacker / name).exists():
                    (attacker / name).rmdir()
            (attacker / "mnt").mkdir()
            os.chown(attacker / "mnt", NOBODY, NOBODY)
            (attacker / "link").symlink_to(victim)
            racer = subprocess.Popen([*NOBODY_PYTHON, "-c", RACER, attacker, "2"], stdout=subprocess.PIPE, text=True)
            try:
                assert racer.stdout.readline().strip() == "watching"
                run_layermount(image, attacker / "mnt", "--read-only", "-q", "--store", store)
                covered.append(is_mounted(str(victim)))
            finally:
                racer.kill()
                racer.wait()
                unmount_below(attacker)
                unmount_below(victim)
    finally:
        unmount_below(attacker)
        unmount_below(victim)
    assert not any(covered)
    assert (victim / "sentinel").read_text() == "host file"


def test_the_mount_of_run_is_out_of_other_users_reach(tmp_path, store_dir):
    """Attack: while `layermount run` serves an image, another user walks into its mountpoint
    under /tmp (the mount's root is 0755) and reads or writes the container's files. Must hold:
    the mountpoint sits in a 0700 directory, so nobody cannot even stat it."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        pytest.skip("needs a static busybox (Debian busybox-static)")
    from test_run import build_busybox

    image = build_busybox(tmp_path / "busybox.tar")
    before = {point for point, kind in mount_entries() if kind == FSTYPE}
    runner = subprocess.Popen([sys.executable, "-m", "unionfs", "run", "--store", store_dir, "-q", image,
                               "/bin/sh", "-c", "echo ready; read line"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert runner.stdout.readline().strip() == "ready"
        points = [point for point, kind in mount_entries() if kind == FSTYPE and point not in before
                  and "layermount-run-" in point]
        assert len(points) == 1
        parent = os.path.dirname(points[0])
        assert os.stat(parent).st_mode & 0o777 == 0o700
        looked = as_nobody("ls", points[0] + "/etc", check=False)
        assert looked.returncode != 0 and "Permission denied" in looked.stderr
    finally:
        runner.communicate("go\n", timeout=60)
    assert runner.returncode == 0


def test_a_volume_filled_1100_levels_deep_by_the_container_is_removed(tmp_path, store_dir):
    """Attack: the command in `layermount run` builds 1,100 nested directories in a fresh volume;
    the recursive clean-up after it died with RecursionError. Must hold: exit code of the command,
    no traceback, no volume left on the host."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        pytest.skip("needs a static busybox (Debian busybox-static)")
    from test_run import build_busybox

    image = build_busybox(tmp_path / "busybox.tar")
    before = set(Path(tempfile.gettempdir()).glob("layermount-volumes-*"))
    script = "cd /data; i=0; while [ $i -lt 1100 ]; do mkdir d; cd d; i=$((i+1)); done; echo deep"
    result = run_layermount("run", "--store", store_dir, "-q", image, "/bin/sh", "-c", script)
    assert result.returncode == 0 and result.stdout.strip() == "deep", result.stderr[-500:]
    assert "Traceback" not in result.stderr
    assert set(Path(tempfile.gettempdir()).glob("layermount-volumes-*")) == before

"""podman and buildah with layermount as containers/storage's mount_program, beside fuse-overlayfs.

Every step runs twice, once per mount program, against the same expected results: what
works with fuse-overlayfs must work, and look the same, with layermount. Each program gets a
private storage root (nothing touches the host's /var/lib/containers), and a test
containers.conf makes podman run on this machine: runc (crun refuses the hybrid cgroup
layout), cgroupfs, file events, and explicit ulimits (podman cannot apply its nproc default).
The image is built here: busybox-static over three layers, with a setuid-root helper
compiled with gcc -static. Teardown removes every container and build container, unmounts
what is left and deletes the storage, also when a step failed.
"""

from __future__ import annotations

import contextlib
import json
import re
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from unionfs.image.writer import Dir, File, Symlink, layer_tar, new_config, write_image
from unionfs.mount import mount_entries

REPO = Path(__file__).resolve().parents[1]
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
IMAGE = "localhost/lmtest:latest"
TOOLS = ("podman", "buildah", "runc", "fuse-overlayfs", "gcc")
missing = [tool for tool in TOOLS if not shutil.which(tool)]
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or bool(missing) or not os.path.exists(BUSYBOX),
                                reason=f"needs root (podman's rootful storage) and {', '.join(missing) or 'busybox'}")

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
# Kept inside the test's directory too, so nothing of the host's podman is read or changed.
PRIVATE_DIRS = """
tmp_dir = "{base}/tmp"

[network]
network_config_dir = "{base}/networks"
"""
BLOB_INFO_CACHE = Path("/var/lib/containers/cache")   # containers/image's, whatever --root says

SETUID_HELPER = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("euid=%d uid=%d\n", (int)geteuid(), (int)getuid()); return 0; }
"""

PASSWD = b"root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/sh\n" \
         b"app:x:1000:1000::/home/app:/bin/sh\n"
APPLETS = ("sh", "ls", "cat", "echo", "id", "touch", "mkdir", "rm", "stat", "true")


def build_image(path: Path, helper: Path) -> Path:
    """Three layers: busybox and users; /srv with files of several owners; the helper and an override."""
    base = [Dir("bin"), File("bin/busybox", Path(BUSYBOX).read_bytes(), mode=0o755)]
    base += [Symlink(f"bin/{name}", "busybox") for name in APPLETS]
    base += [Dir("etc"), File("etc/passwd", PASSWD), File("etc/group", b"root:x:0:\nwww-data:x:33:\napp:x:1000:\n"),
             Dir("tmp", mode=0o1777), Dir("root", mode=0o700)]
    content = [Dir("srv"), File("srv/hello.txt", b"hello from layer 2\n"), File("srv/secret", b"root only\n", mode=0o600),
               Dir("srv/www", uid=33, gid=33), File("srv/www/index", b"www\n", uid=33, gid=33)]
    top = [Dir("usr"), Dir("usr/bin"), File("usr/bin/whoami-suid", helper.read_bytes(), mode=0o4755),
           File("srv/hello.txt", b"hello from layer 3\n")]
    config = new_config(["ADD busybox", "ADD srv", "ADD helper"])
    config["config"] = {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]}
    write_image(path, [layer_tar(layer) for layer in (base, content, top)], config, repo_tag=IMAGE)
    return path


class Client:
    """podman and buildah on one private storage root with one mount_program."""

    def __init__(self, base: Path, program: str, storage_conf: Path | None = None, storage_opts: tuple = ()):
        """Storage named on every command line, or by ``storage_conf`` (CONTAINERS_STORAGE_CONF)."""
        self.base = base
        self.program = program
        self.storage = [] if storage_conf else [
            "--root", str(base / "root"), "--runroot", str(base / "runroot"),
            "--storage-driver", "overlay", "--storage-opt", f"overlay.mount_program={program}",
            *[arg for opt in storage_opts for arg in ("--storage-opt", opt)]]
        conf = base / "containers.conf"
        conf.write_text(CONTAINERS_CONF + PRIVATE_DIRS.format(base=base))
        self.env = dict(os.environ, CONTAINERS_CONF=str(conf))
        if storage_conf:
            self.env["CONTAINERS_STORAGE_CONF"] = str(storage_conf)

    def run(self, tool: str, *args, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        extra = ["--cgroup-manager", "cgroupfs", "--events-backend", "file"] if tool == "podman" else []
        result = subprocess.run([tool, *self.storage, *extra, *map(str, args)], capture_output=True, text=True,
                                env=self.env, timeout=timeout)
        if check:
            assert result.returncode == 0, f"{tool} {' '.join(map(str, args))}: {result.stderr.strip()}"
        return result

    def podman(self, *args, **kwargs) -> subprocess.CompletedProcess:
        return self.run("podman", *args, **kwargs)

    def buildah(self, *args, **kwargs) -> subprocess.CompletedProcess:
        return self.run("buildah", *args, **kwargs)

    def mounts_below(self) -> list[str]:
        return [point for point, _ in mount_entries() if point.startswith(f"{self.base}/")]

    def close(self) -> None:
        """Everything goes, whatever state a failed step left: containers, mounts, storage."""
        self.podman("rm", "-af", "-t", "0", check=False)
        self.buildah("rm", "-a", check=False)
        self.podman("image", "unmount", "-a", "-f", check=False)
        self.podman("rmi", "-af", check=False)
        for point in sorted(self.mounts_below(), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)


def layermount_wrapper(directory: Path) -> Path:
    """An executable mount_program running this worktree's layermount with this Python."""
    wrapper = directory / "layermount"
    # -P: this worktree's unionfs even if the caller's cwd holds another one
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -P -m unionfs \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


@pytest.fixture(scope="module", autouse=True)
def no_host_cache_left():
    """podman load writes a blob-info cache under /var/lib/containers whatever the storage root;
    one this module created goes with it."""
    existed = BLOB_INFO_CACHE.exists()
    yield
    if not existed:
        shutil.rmtree(BLOB_INFO_CACHE, ignore_errors=True)
        with contextlib.suppress(OSError):
            BLOB_INFO_CACHE.parent.rmdir()


@pytest.fixture(scope="module")
def image_tar(tmp_path_factory) -> Path:
    scratch = tmp_path_factory.mktemp("podman-image")
    (scratch / "helper.c").write_text(SETUID_HELPER)
    subprocess.run(["gcc", "-static", "-O2", "-o", scratch / "helper", scratch / "helper.c"], check=True)
    return build_image(scratch / "image.tar", scratch / "helper")


@contextlib.contextmanager
def loaded_client(base: Path, program: str, image_tar: Path, storage_conf: Path | None = None,
                  storage_opts: tuple = ()):
    """A client whose storage holds the test image; everything removed at the end, failure or not."""
    client = Client(base, program, storage_conf, storage_opts)
    try:
        loaded = client.podman("load", "-i", image_tar)
        assert f"Loaded image: {IMAGE}" in loaded.stdout
        yield client
    finally:
        client.close()
        left = client.mounts_below()
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"mounts left behind: {left}"


def short_temp_dir(name: str) -> Path:
    """podman wants a runroot of <= 50 characters; a container in a user namespace (--uidmap) must
    be able to pass through to its root, as through /var/lib/containers."""
    path = Path(tempfile.mkdtemp(prefix=f"lm-{name[:5]}-"))
    path.chmod(0o711)
    return path


@pytest.fixture(scope="module", params=["layermount", "fuse-overlayfs"])
def client(request, image_tar):
    base = short_temp_dir(request.param)
    program = str(layermount_wrapper(base)) if request.param == "layermount" else shutil.which("fuse-overlayfs")
    with loaded_client(base, program, image_tar) as client:
        yield client


def root_fstype(client: Client, *run_args) -> str:
    """The filesystem type of the container's / as the container sees it."""
    lines = run_in(client, *run_args, IMAGE, "cat", "/proc/self/mountinfo").stdout.splitlines()
    fields = next(line.split() for line in lines if line.split()[4] == "/")
    return fields[fields.index("-") + 1]


def fstype_of(program: str) -> str:
    return "fuse.layermount" if Path(program).name == "layermount" else "fuse.fuse-overlayfs"


def run_in(client: Client, *args, check: bool = True) -> subprocess.CompletedProcess:
    return client.podman("run", "--rm", "--network", "none", *args, check=check)


def test_the_root_is_served_by_the_mount_program(client):
    assert root_fstype(client) == fstype_of(client.program)


def test_load_keeps_the_layer_history(client):
    layers = client.podman("image", "inspect", "--format", "{{len .RootFS.Layers}}", IMAGE).stdout.strip()
    history = client.podman("history", "--format", "{{.CreatedBy}}", IMAGE).stdout.split("\n")[:3]
    assert layers == "3" and history == ["ADD helper", "ADD srv", "ADD busybox"]


def test_run_rm_prints_and_writes_and_leaves_nothing(client):
    result = run_in(client, IMAGE, "sh", "-c", "cat /srv/hello.txt; echo new > /srv/new; cat /srv/new; id -u")
    assert result.stdout == "hello from layer 3\nnew\n0\n"
    assert client.podman("ps", "-aq").stdout == ""
    assert not [point for point in client.mounts_below() if point.endswith("/merged")]


CHECK_ACCESS = ("id; cat /srv/www/index; echo mine > /srv/www/mine && cat /srv/www/mine; "
                "cat /srv/secret || echo no-secret; touch /srv/denied || echo no-write; cat /srv/hello.txt")


@pytest.mark.parametrize("user", ["33:33", "www-data"])
def test_non_root_user_reads_and_writes_where_it_may(client, user):
    result = run_in(client, "--user", user, IMAGE, "sh", "-c", CHECK_ACCESS, check=False)
    assert result.stdout.splitlines() == ["uid=33(www-data) gid=33(www-data) groups=33(www-data)", "www", "mine",
                                          "no-secret", "no-write", "hello from layer 3"]
    assert "Permission denied" in result.stderr


def test_setuid_root_binary_runs_as_root_for_a_non_root_user(client):
    result = run_in(client, "--user", "1000:1000", IMAGE, "/usr/bin/whoami-suid")
    assert result.stdout == "euid=0 uid=1000\n"


def test_read_only_root(client):
    result = run_in(client, "--read-only", IMAGE, "sh", "-c",
                    "cat /srv/hello.txt; touch /srv/x || echo refused; touch /tmp/ok && echo tmp-ok", check=False)
    assert result.stdout == "hello from layer 3\nrefused\ntmp-ok\n"
    assert "Read-only file system" in result.stderr


def test_volumes(client, tmp_path):
    (tmp_path / "vol").mkdir()
    (tmp_path / "vol" / "from-host").write_text("host\n")
    result = run_in(client, "-v", f"{tmp_path / 'vol'}:/data", IMAGE, "sh", "-c",
                    "cat /data/from-host; echo container > /data/from-container; cat /srv/hello.txt")
    assert result.stdout == "host\nhello from layer 3\n"
    assert (tmp_path / "vol" / "from-container").read_text() == "container\n"


CHANGES = "echo changed > /srv/hello.txt; rm /srv/secret; mkdir /new; echo n > /new/f"


def test_create_start_diff_commit_and_run_the_commit(client):
    name = f"changes-{Path(client.program).name}"
    client.podman("create", "--name", name, "--network", "none", IMAGE, "sh", "-c", CHANGES)
    client.podman("start", "-a", name)
    lines = set(client.podman("diff", name).stdout.splitlines())
    assert {"A /new", "A /new/f", "C /srv", "C /srv/hello.txt", "D /srv/secret"} <= lines
    assert lines - {"A /new", "A /new/f", "C /srv", "C /srv/hello.txt", "D /srv/secret"} <= {"C /etc"}
    as_json = json.loads(client.podman("diff", "--format", "json", name).stdout)
    assert sorted(as_json["added"]) == ["/new", "/new/f"] and as_json["deleted"] == ["/srv/secret"]
    assert {"/srv", "/srv/hello.txt"} <= set(as_json["changed"])
    client.podman("commit", "-q", name, "localhost/committed:latest")
    client.podman("rm", name)
    result = run_in(client, "localhost/committed:latest", "sh", "-c",
                    "cat /srv/hello.txt /new/f; ls /srv/secret 2>/dev/null || echo gone")
    assert result.stdout == "changed\nn\ngone\n"


def test_image_mount_and_container_mount(client):
    image_root = Path(client.podman("image", "mount", IMAGE).stdout.strip())
    try:
        assert (image_root / "srv" / "hello.txt").read_text() == "hello from layer 3\n"
        assert stat.S_IMODE(os.stat(image_root / "usr" / "bin" / "whoami-suid").st_mode) == 0o4755
    finally:
        client.podman("image", "unmount", IMAGE)
    name = f"mounted-{Path(client.program).name}"
    client.podman("create", "--name", name, "--network", "none", IMAGE, "true")
    try:
        root = Path(client.podman("mount", name).stdout.strip())
        (root / "srv" / "from-host").write_text("written on the host\n")
        client.podman("unmount", name)
        result = client.podman("start", "-a", name)
        assert result.stdout == ""
        root = Path(client.podman("mount", name).stdout.strip())
        assert (root / "srv" / "from-host").read_text() == "written on the host\n"
        client.podman("unmount", name)
    finally:
        client.podman("rm", "-f", name, check=False)


def test_buildah_from_run_commit_then_podman_run(client):
    container = client.buildah("from", "--pull-never", IMAGE).stdout.strip().splitlines()[-1]
    try:
        client.buildah("run", "--network", "none", container, "--", "sh", "-c", "echo built > /built")
        assert client.buildah("run", container, "--", "cat", "/built").stdout == "built\n"
        client.buildah("commit", "-q", container, "localhost/from-buildah:latest")
    finally:
        client.buildah("rm", container, check=False)
    assert run_in(client, "localhost/from-buildah:latest", "cat", "/built", "/srv/hello.txt").stdout == \
        "built\nhello from layer 3\n"


def test_buildah_bud_of_a_three_step_containerfile_then_podman_run(client, tmp_path):
    (tmp_path / "copied").write_text("copied in\n")
    (tmp_path / "Containerfile").write_text(
        f"FROM {IMAGE}\nRUN echo one > /one && rm /srv/secret\nCOPY copied /copied\nRUN cat /one /copied > /both\n")
    client.buildah("bud", "--pull-never", "--network", "none", "-q", "-t", "localhost/bud:latest",
                   "-f", tmp_path / "Containerfile", tmp_path)
    result = run_in(client, "localhost/bud:latest", "sh", "-c", "cat /both; ls /srv/secret 2>/dev/null || echo gone")
    assert result.stdout == "one\ncopied in\ngone\n"
    history = client.podman("history", "--format", "{{.CreatedBy}}", "localhost/bud:latest").stdout.splitlines()
    assert history[0] == "/bin/sh -c cat /one /copied > /both" and "COPY" in history[1]
    assert history[2:] == ["/bin/sh -c echo one > /one && rm /srv/secret", "ADD helper", "ADD srv", "ADD busybox"]


def test_readme_storage_conf_as_written(image_tar):
    """The README's storage.conf block, with only the path and a private root filled in."""
    section = (REPO / "README.md").read_text().split("## Use with podman and buildah", 1)[1]
    block = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    base = short_temp_dir("readme")
    wrapper = layermount_wrapper(base)
    conf = re.sub(r'mount_program = "[^"]*"', f'mount_program = "{wrapper}"', block, count=1)
    assert conf != block and conf.startswith("[storage]\n")
    conf = conf.replace("[storage]\n", f'[storage]\ngraphroot = "{base}/root"\nrunroot = "{base}/runroot"\n', 1)
    (base / "storage.conf").write_text(conf)
    with loaded_client(base, str(wrapper), image_tar, storage_conf=base / "storage.conf") as client:
        assert root_fstype(client) == "fuse.layermount"
        assert run_in(client, IMAGE, "cat", "/srv/hello.txt").stdout == "hello from layer 3\n"



UIDMAP = ("--uidmap", "0:100000:65536", "--gidmap", "0:100000:65536")
NO_IDMAPPED_LOWERS = "idmapped-lower-dir-false"


@pytest.fixture(scope="module", params=["layermount", "fuse-overlayfs"])
def mapped_client(request, image_tar):
    """A client whose containers/storage shifts ids through the mount program alone.

    containers/storage 1.43 (Debian 12's podman 4.3), on a kernel with idmapped mounts, hands the
    mount program idmapped copies of the lower layers *and* uidmapping=: every id is shifted
    twice, the image's files show as nobody inside and runc cannot make /etc/hosts, with
    fuse-overlayfs exactly as with layermount. Its feature cache in the run root, written
    before the first mount, tells it to leave the shifting to the mount program's
    uidmapping=/gidmapping=, which is what this test is about.
    """
    base = short_temp_dir(f"m{request.param}")
    (base / "runroot" / "overlay").mkdir(parents=True)
    (base / "runroot" / "overlay" / NO_IDMAPPED_LOWERS).write_text("left to the mount program\n")
    program = str(layermount_wrapper(base)) if request.param == "layermount" else shutil.which("fuse-overlayfs")
    with loaded_client(base, program, image_tar) as client:
        yield client


OWNERS = "stat -c '%u:%g %n' /srv/hello.txt /srv/www/index /srv/secret /etc"


def test_run_with_a_uid_map_shows_the_images_owners_inside(mapped_client):
    """--uidmap 0:100000:65536: root's files are root's inside and www-data's are www-data's; root inside
    writes and reads where root may. The host sees the mount with host ids (root inside is 100000);
    the upper keeps the container's own ids, like the image layers, so a commit needs no shifting."""
    client = mapped_client
    name = f"mapped-{Path(client.program).name}"
    client.podman("create", "--name", name, "--network", "none", *UIDMAP, IMAGE, "sh", "-c",
                  OWNERS + "; echo new > /srv/new; stat -c '%u:%g %n' /srv/new; cat /srv/secret; id -u; "
                  "grep -w 0 /proc/self/uid_map | tr -s ' '")
    try:
        result = client.podman("start", "-a", name)
        assert result.stdout.splitlines() == ["0:0 /srv/hello.txt", "33:33 /srv/www/index", "0:0 /srv/secret",
                                              "0:0 /etc", "0:0 /srv/new", "root only", "0", " 0 100000 65536"]
        upper = Path(client.podman("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", name).stdout.strip())
        assert (os.lstat(upper / "srv" / "new").st_uid, os.lstat(upper / "srv" / "new").st_gid) == (0, 0)
        root = Path(client.podman("mount", name).stdout.strip())
        try:
            assert [os.lstat(root / path).st_uid for path in ("srv/new", "srv/www/index")] == [100000, 100033]
        finally:
            client.podman("unmount", name)
    finally:
        client.podman("rm", "-f", name, check=False)
    assert run_in(client, *UIDMAP, IMAGE, "stat", "-c", "%u", "/srv/www").stdout == "33\n"
    assert not [point for point in client.mounts_below() if point.endswith("/merged")]


def test_force_mask_keeps_owners_and_modes_in_xattrs(image_tar):
    """overlay.force_mask=shared: containers/storage unpacks every layer 0755 with the real owner and
    mode in user.containers.override_stat and mounts with xattr_permissions=2. Inside, owners and
    modes are the image's (a 0600 file stays closed to a non-root user); what the container
    creates is 0755 on disk, its real mode in the upper's user.fuseoverlayfs.override_stat.

    fuse-overlayfs 1.10 cannot run this: every stat of an entry without the xattr (the upper's
    directories podman makes) fails with ENODATA, so this test is layermount's alone.
    (containers/storage 1.43 records only the 0777 bits there, so /tmp is 777 and the setuid helper
    0755: neither is the mount's doing, and the helper is not tried.)
    """
    base = short_temp_dir("mask")
    wrapper = layermount_wrapper(base)
    with loaded_client(base, str(wrapper), image_tar, storage_opts=("overlay.force_mask=shared",)) as client:
        shown = run_in(client, "--user", "1000:1000", IMAGE, "sh", "-c",
                       "stat -c '%u:%g %a %n' /srv/hello.txt /srv/www/index /srv/secret /tmp; "
                       "cat /srv/secret || echo closed", check=False)
        assert shown.stdout.splitlines() == ["0:0 644 /srv/hello.txt", "33:33 644 /srv/www/index",
                                             "0:0 600 /srv/secret", "0:0 777 /tmp", "closed"]
        name = "masked"
        client.podman("run", "--name", name, "--network", "none", IMAGE, "sh", "-c",
                      "echo x > /srv/new; chmod 600 /srv/new; mkdir -m 700 /srv/d; chown 33:33 /srv/d; "
                      "stat -c '%u:%g %a %n' /srv/new /srv/d")
        try:
            assert client.podman("start", "-a", name).stdout.splitlines() == ["0:0 600 /srv/new", "33:33 700 /srv/d"]
            upper = Path(client.podman("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", name).stdout.strip())
            for path, record in (("srv/new", b"0:0:0100600"), ("srv/d", b"33:33:040700")):
                st = os.lstat(upper / path)
                assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
                assert os.getxattr(upper / path, "user.fuseoverlayfs.override_stat") == record
        finally:
            client.podman("rm", "-f", name, check=False)


# ---- rootless podman ------------------------------------------------------------------------

ROOTLESS_USER = "lmrootless"


def python_for_others() -> list[str] | None:
    """(Python, site-packages) with this venv's packages that any user may run, or None.

    The venv's own interpreter may live where only root can go (here: pyenv under /root); the
    system Python of the same version takes the venv's site-packages then.
    """
    import sysconfig
    packages = sysconfig.get_paths()["purelib"]
    for python in (sys.executable, f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"):
        if os.path.exists(python) and reachable_by_others(Path(os.path.realpath(python))) \
                and reachable_by_others(Path(packages)) and reachable_by_others(REPO):
            return [python, packages]
    return None


def reachable_by_others(path: Path) -> bool:
    """Every directory on the way searchable, and the end readable, by a user with no privilege
    (a rootless container's user namespace has none over root's files)."""
    if not path.exists():
        return False
    if not all(os.stat(parent).st_mode & 0o001 for parent in path.parents):
        return False
    return os.stat(path).st_mode & 0o005 == 0o005


@pytest.fixture(scope="module")
def rootless_user(image_tar):
    """A user made for the test with /etc/subuid and /etc/subgid ranges (useradd gives them), a home
    and a runtime dir; /dev/fuse usable by others. All of it goes afterwards, with the user's
    processes (podman's pause process) and storage."""
    reason = python_for_others()
    if reason is None:
        pytest.skip("no Python with pyfuse3 and trio that an unprivileged user may run")
    if not all(os.stat(f"/usr/bin/{tool}").st_mode & stat.S_ISUID for tool in ("newuidmap", "newgidmap")):
        pytest.skip("rootless podman needs setuid newuidmap/newgidmap (Debian package uidmap)")
    if subprocess.run(["id", ROOTLESS_USER], capture_output=True).returncode == 0:
        pytest.skip(f"a user {ROOTLESS_USER} exists already; it is not this test's to use")
    python, packages = reason
    share = Path(tempfile.mkdtemp(prefix="lm-rl-"))
    share.chmod(0o755)
    home = share / "home"
    fuse_mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    subprocess.run(["useradd", "--create-home", "--home-dir", home, "--shell", "/bin/sh", ROOTLESS_USER], check=True)
    try:
        uid = int(subprocess.run(["id", "-u", ROOTLESS_USER], capture_output=True, text=True, check=True).stdout)
        if ROOTLESS_USER + ":" not in Path("/etc/subuid").read_text():
            pytest.skip("useradd gave the user no /etc/subuid range (SUB_UID_COUNT in /etc/login.defs)")
        runtime = Path(f"/run/user/{uid}")
        runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chown(runtime, uid, uid)
        os.chmod("/dev/fuse", 0o666)
        wrapper = share / "layermount"
        wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO}:{packages} exec {python} -P -m unionfs \"$@\"\n")
        wrapper.chmod(0o755)
        shutil.copy(image_tar, share / "image.tar")
        (share / "image.tar").chmod(0o644)
        (share / "containers.conf").write_text(CONTAINERS_CONF)
        (share / "containers.conf").chmod(0o644)
        yield {"uid": uid, "home": home, "runtime": runtime, "share": share, "layermount": str(wrapper)}
    finally:
        os.chmod("/dev/fuse", fuse_mode)
        for proc in Path("/proc").iterdir():       # the user's own processes only: podman's pause process
            with contextlib.suppress(OSError, ValueError):
                if proc.name.isdigit() and proc.stat().st_uid == uid:
                    os.kill(int(proc.name), 9)
        subprocess.run(["userdel", "--remove", ROOTLESS_USER], capture_output=True)
        for point in sorted((p for p, _ in mount_entries() if p.startswith(f"{share}/")), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(share, ignore_errors=True)
        shutil.rmtree(f"/run/user/{uid}", ignore_errors=True)


def as_rootless(user: dict, program: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    """podman as the test user, with a storage of its own per mount program."""
    home, name = user["home"], Path(program).name
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "XDG_RUNTIME_DIR": str(user["runtime"]),
           "CONTAINERS_CONF": str(user["share"] / "containers.conf")}
    command = ["setpriv", f"--reuid={user['uid']}", f"--regid={user['uid']}", "--init-groups", "podman",
               "--root", home / f"root-{name}", "--runroot", user["runtime"] / f"run-{name}",
               "--storage-driver", "overlay", "--storage-opt", f"overlay.mount_program={program}",
               "--cgroup-manager", "cgroupfs", "--events-backend", "file", *args]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env, cwd=home, timeout=180)
    if check:
        assert result.returncode == 0, f"podman {' '.join(map(str, args))}: {result.stderr.strip()}"
    return result


@pytest.mark.parametrize("program", ["layermount", "fuse-overlayfs"])
def test_rootless_podman_run_rm_and_a_non_root_user(rootless_user, program):
    """Rootless podman runs the mount program inside its user namespace: load, run --rm printing
    and writing, --user 33:33 reading and writing where www-data may, and nothing left behind."""
    program = rootless_user["layermount"] if program == "layermount" else shutil.which("fuse-overlayfs")
    assert f"Loaded image: {IMAGE}" in as_rootless(rootless_user, program, "load", "-i",
                                                   rootless_user["share"] / "image.tar").stdout
    result = as_rootless(rootless_user, program, "run", "--rm", "--network", "none", IMAGE, "sh", "-c",
                         "cat /srv/hello.txt; echo new > /srv/new; cat /srv/new; id -u; cat /proc/self/mountinfo")
    lines = result.stdout.splitlines()
    assert lines[:3] == ["hello from layer 3", "new", "0"]
    root = next(line.split() for line in lines[3:] if line.split()[4] == "/")
    assert root[root.index("-") + 1] == fstype_of(program)
    access = as_rootless(rootless_user, program, "run", "--rm", "--network", "none", "--user", "33:33", IMAGE,
                         "sh", "-c", CHECK_ACCESS, check=False)
    assert access.stdout.splitlines() == ["uid=33(www-data) gid=33(www-data) groups=33(www-data)", "www", "mine",
                                          "no-secret", "no-write", "hello from layer 3"]
    assert as_rootless(rootless_user, program, "ps", "-aq").stdout == ""
    assert not [point for point, _ in mount_entries() if point.startswith(f"{rootless_user['home']}/")]

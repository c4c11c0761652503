"""Attacks on ``layermount run``: a hostile image trying to reach the host, another user trying to
reach the container. Each case plants host sentinels where relevant and checks them afterwards.

The image is busybox-static plus, where the shell cannot do it, a small static C program built
here (``escape``): the calls an attacker would make, one per sub-command.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import LAYERMOUNT, host_nodes_restored, run_layermount
from unionfs.image.writer import Dir, File, Symlink, layer_tar, new_config, write_image
from unionfs.mount import FSTYPE, mount_entries

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
pytestmark = pytest.mark.skipif(not os.path.exists(BUSYBOX) or os.geteuid() != 0,
                                reason="needs root (namespaces) and a static busybox (Debian busybox-static)")
APPLETS = ("sh", "cat", "echo", "ls", "mkdir", "mknod", "head", "wc", "grep", "sleep", "test", "nc", "timeout",
           "chmod", "chown", "touch")

ESCAPE_C = r"""
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

static int list(int fd) {              /* print the names in a directory fd: proof of what we reached */
    DIR *dir = fdopendir(fd);
    struct dirent *entry;
    if (!dir) return 1;
    while ((entry = readdir(dir))) printf("%s\n", entry->d_name);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "chroot")) {        /* chroot x, climb .., chroot . */
        mkdir("x", 0755);
        if (chroot("x")) { printf("chroot refused: %s\n", strerror(errno)); return 0; }
        for (int i = 0; i < 256; i++) chdir("..");
        chroot(".");
        int fd = open(argv[2], O_RDONLY);
        if (fd < 0) { printf("CONTAINED %s\n", strerror(errno)); return 0; }
        char buf[256] = {0};
        read(fd, buf, sizeof buf - 1);
        printf("ESCAPED read %s\n", buf);
        int out = open(argv[3], O_WRONLY | O_CREAT, 0644);
        if (out >= 0 && write(out, "pwned", 5) == 5) printf("ESCAPED wrote\n");
        return 0;
    }
    if (argc >= 3 && !strcmp(argv[1], "shocker")) {       /* open_by_handle_at the root inode of a host fs */
        int mount_fd = open(argv[2], O_RDONLY | O_DIRECTORY);
        struct { struct file_handle handle; unsigned int ino[2]; } root = {{8, 1}, {2, 0}};
        int fd = open_by_handle_at(mount_fd, &root.handle, O_RDONLY | O_DIRECTORY);
        if (fd < 0) { printf("CONTAINED %s\n", strerror(errno)); return 0; }
        printf("ESCAPED\n");
        return list(fd);
    }
    if (argc >= 3 && !strcmp(argv[1], "tiocsti")) {       /* type a command into the terminal's input */
        for (char *c = argv[2]; *c; c++)
            if (ioctl(0, TIOCSTI, c)) { printf("CONTAINED %s\n", strerror(errno)); return 0; }
        printf("ESCAPED typed\n");
        return 0;
    }
    fprintf(stderr, "usage: escape chroot|shocker|tiocsti ARGS\n");
    return 2;
}
"""


@pytest.fixture(scope="module")
def escape_binary(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc and libc6-dev (static libc) to build the attack program")
    work = tmp_path_factory.mktemp("escape")
    (work / "escape.c").write_text(ESCAPE_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", work / "escape", work / "escape.c"], check=True)
    return (work / "escape").read_bytes()


def hostile_image(path: Path, escape: bytes = b"", *, extra=(), user="", volumes=(), workdir="/"):
    layer = [Dir("bin"), File("bin/busybox", open(BUSYBOX, "rb").read(), mode=0o755)]
    layer += [Symlink(f"bin/{name}", "busybox") for name in APPLETS]
    if escape:
        layer.append(File("bin/escape", escape, mode=0o755))
    layer += [Dir("etc"), File("etc/os-release", b"NAME=hostile\n"),
              File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"),
              File("etc/group", b"root:x:0:\napp:x:1000:\n"), Dir("tmp", mode=0o1777), *extra]
    config = new_config(["ADD hostile"])
    config["config"] = {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "User": user, "WorkingDir": workdir,
                        "Volumes": {volume: {} for volume in volumes}}
    write_image(path, [layer_tar(layer)], config, repo_tag="hostile:test")
    return path


@pytest.fixture
def sentinel(tmp_path):
    """A host file with unique content; the test checks it is unread and unchanged, and nothing was added."""
    directory = tmp_path / "host-sentinel"
    directory.mkdir()
    path = directory / "secret"
    content = f"host-secret-{uuid.uuid4()}"
    path.write_text(content)
    yield path, content
    assert path.read_text() == content, "HOST PATH WAS CHANGED"
    assert sorted(os.listdir(directory)) == ["secret"], "HOST PATH WAS CHANGED"


def run_in(image, store, *argv, **kwargs):
    return run_layermount("run", "--store", store, "-q", image, *argv, **kwargs)


def test_chroot_escape_binary_does_not_reach_the_host(tmp_path, store_dir, escape_binary, sentinel):
    """Attack: the classic chroot escape (chroot into a subdir, chdir .. past the root, chroot .), then
    read and write host files by absolute path. Must hold: the host file is not readable from inside and
    no file appears beside it; the command is contained (run pivots into the mount, no host root left)."""
    path, content = sentinel
    image = hostile_image(tmp_path / "img.tar", escape_binary)
    result = run_in(image, store_dir, "/bin/escape", "chroot", path, path.parent / "pwned")
    assert result.returncode == 0, result.stderr
    assert content not in result.stdout and "ESCAPED" not in result.stdout
    assert "CONTAINED" in result.stdout or "chroot refused" in result.stdout


def test_open_by_handle_from_a_volume_does_not_reach_the_host_fs(tmp_path, store_dir, escape_binary):
    """Attack ("shocker"): a volume is a bind of a host directory, so an fd in it lets
    open_by_handle_at(2) open any inode of that host filesystem, its root first. Must hold: refused
    (CAP_DAC_READ_SEARCH is not in the container's capabilities)."""
    image = hostile_image(tmp_path / "img.tar", escape_binary, volumes=["/data"])
    result = run_in(image, store_dir, "/bin/escape", "shocker", "/data")
    assert result.returncode == 0, result.stderr
    assert "CONTAINED" in result.stdout and "ESCAPED" not in result.stdout


def test_capabilities_are_docker_defaults_without_sys_admin(tmp_path, store_dir):
    """Attack: any capability outside Docker's defaults (CAP_SYS_ADMIN to mount, CAP_SYS_MODULE to
    load a module, CAP_SYS_PTRACE, CAP_NET_ADMIN...). Must hold: none of them is in CapEff, CapPrm,
    CapInh, CapBnd or CapAmb of the container's root."""
    image = hostile_image(tmp_path / "img.tar")
    result = run_in(image, store_dir, "/bin/sh", "-c", "grep ^Cap /proc/self/status")
    sets = {line.split(":")[0]: int(line.split()[1], 16) for line in result.stdout.splitlines()}
    assert set(sets) == {"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"}, result.stderr
    forbidden = {"SYS_ADMIN": 21, "SYS_MODULE": 16, "SYS_PTRACE": 19, "SYS_RAWIO": 17, "DAC_READ_SEARCH": 2,
                 "NET_ADMIN": 12, "SYS_TIME": 25, "SYS_BOOT": 22, "SYSLOG": 34, "BPF": 39}
    for name, value in sets.items():
        assert not [cap for cap, bit in forbidden.items() if value & (1 << bit)], (name, hex(value))
    assert sets["CapEff"] & (1 << 0), "root in the container keeps CAP_CHOWN (Docker's default)"
    assert sets["CapInh"] == sets["CapAmb"] == 0


def test_no_raw_sockets_on_the_host_network(tmp_path, store_dir):
    """Attack: with --network host, CAP_NET_RAW (in Docker's set, harmless in a network namespace of
    its own) would let the container sniff and spoof the host's traffic. Must hold: it is in no set."""
    image = hostile_image(tmp_path / "img.tar")
    result = run_layermount("run", "--network", "host", "--store", store_dir, "-q", image,
                            "/bin/sh", "-c", "grep ^Cap /proc/self/status")
    sets = [int(line.split()[1], 16) for line in result.stdout.splitlines()]
    assert len(sets) == 5 and not [value for value in sets if value & (1 << 13)], result.stdout + result.stderr


def test_host_loopback_services_are_out_of_reach(tmp_path, store_dir):
    """Attack: connect to a service the host binds to 127.0.0.1 only (trusting local clients: a
    registry, a database, a debugger port). Must hold: by default the container has a network
    namespace of its own, so the connection fails and the listener sees no client."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0)
    port = listener.getsockname()[1]
    image = hostile_image(tmp_path / "img.tar")
    try:
        result = run_in(image, store_dir, "/bin/sh", "-c",
                        f"echo probe | timeout 3 nc 127.0.0.1 {port} && echo CONNECTED; cat /sys/class/net/lo/flags")
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert "CONNECTED" not in result.stdout and "Connection refused" in result.stderr, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "0x9", "loopback is up inside (IFF_UP|IFF_LOOPBACK)"


def test_non_root_user_gets_no_capabilities_and_no_new_privs(tmp_path, store_dir):
    """Attack: a setuid-root file or file capabilities in the image lifting a non-root User back to root.
    Must hold: the User's effective, permitted and ambient sets are empty and no_new_privs is set."""
    image = hostile_image(tmp_path / "img.tar", user="app")
    result = run_in(image, store_dir, "/bin/sh", "-c", "grep -E '^(Cap(Eff|Prm|Amb)|NoNewPrivs)' /proc/self/status")
    values = {line.split(":")[0]: line.split()[1] for line in result.stdout.splitlines()}
    assert values == {"CapPrm": "0000000000000000", "CapEff": "0000000000000000",
                      "CapAmb": "0000000000000000", "NoNewPrivs": "1"}, result.stderr


def test_host_wide_kernel_knobs_are_read_only(tmp_path, store_dir):
    """Attack: write /proc/sys/kernel/core_pattern (host-wide: a `|program` there runs as host root on
    the next crash) and /sys. The value written is the one already there, so the host is unchanged
    even where the write goes through. Must hold: both writes fail and the host value is unchanged."""
    before = Path("/proc/sys/kernel/core_pattern").read_text()
    image = hostile_image(tmp_path / "img.tar")
    script = ("cat /proc/sys/kernel/core_pattern > /tmp/value; "
              "cat /tmp/value > /proc/sys/kernel/core_pattern && echo core_pattern WRITTEN; "
              "echo 0 > /sys/kernel/profiling && echo sys WRITTEN; echo done")
    result = run_in(image, store_dir, "/bin/sh", "-c", script)
    assert result.stdout.splitlines() == ["done"], result.stdout + result.stderr
    assert Path("/proc/sys/kernel/core_pattern").read_text() == before


def test_the_hosts_device_nodes_cannot_be_changed_from_inside(tmp_path, store_dir):
    """Attack: /dev/null and its kin inside the container are the host's own device nodes, bound
    in (and /dev/null also masks /proc/kcore and the other leaky files): root inside chmods,
    chowns and touches them, which would change the host's nodes for every host process
    (a 0600 /dev/null breaks every non-root program on the host). Must hold: each change fails,
    the host's nodes keep mode, owner and times, and the devices still work inside."""
    image = hostile_image(tmp_path / "img.tar")
    with host_nodes_restored() as before:        # a failure must not leave the host broken
        targets = " ".join([*before, "/proc/kcore", "/proc/keys"])
        script = (f"for node in {targets}; do chmod 600 $node && echo chmod $node; chown 1000:1000 $node && "
                  f"echo chown $node; touch -d 2001-01-01 $node && echo touch $node; done 2>/dev/null; "
                  "echo x > /dev/null && head -c 4 /dev/zero | wc -c")
        result = run_in(image, store_dir, "/bin/sh", "-c", script)
        after = {path: os.stat(path) for path in before}
    changed = [path for path in before if (after[path].st_mode, after[path].st_uid, after[path].st_gid,
                                           after[path].st_mtime_ns) != (before[path].st_mode, before[path].st_uid,
                                                                        before[path].st_gid, before[path].st_mtime_ns)]
    assert changed == [], f"the host's device nodes changed from inside: {changed}"
    assert result.stdout.split() == ["4"], result.stdout + result.stderr


def test_leaky_proc_files_are_masked(tmp_path, store_dir):
    """Attack: read host-wide leaks in /proc (/proc/keys lists key serials of every keyring the uid may
    see, /proc/timer_list and /proc/interrupts describe the host) and /sys/firmware (ACPI tables,
    raw firmware). Must hold: each that the kernel has reads as empty."""
    present = [path for path in ("/proc/keys", "/proc/timer_list", "/proc/interrupts", "/proc/sched_debug",
                                 "/proc/kcore") if os.path.exists(path)]
    image = hostile_image(tmp_path / "img.tar")
    script = "".join(f"echo {path} $(cat {path} | wc -c); " for path in present)
    script += "echo firmware $(ls /sys/firmware | wc -l)"
    result = run_in(image, store_dir, "/bin/sh", "-c", script)
    assert result.stdout.split() == [word for path in present for word in (path, "0")] + ["firmware", "0"], \
        result.stdout + result.stderr


def test_device_node_in_a_volume_cannot_read_the_host_disk(tmp_path, store_dir):
    """Attack: CAP_MKNOD (in Docker's set) makes a block device node for the host's root disk in a
    volume (a bind of a host directory), in /dev or in /tmp, and reads it. Must hold: every writable
    mount the container has is nodev (the device files bound into /dev excepted), so the read fails.
    (A device cgroup on the host may refuse the read anyway: the mount flags are checked too.)"""
    host_disk = os.stat("/").st_dev
    major, minor = os.major(host_disk), os.minor(host_disk)
    image = hostile_image(tmp_path / "img.tar", volumes=["/data"])
    script = "".join(f"mknod {where}/disk b {major} {minor}; head -c 512 {where}/disk | wc -c; "
                     for where in ("/data", "/tmp", "/dev", "/dev/shm"))
    result = run_in(image, store_dir, "/bin/sh", "-c", script + "cat /proc/self/mountinfo")
    lines = result.stdout.splitlines()
    assert lines[:4] == ["0"] * 4, result.stdout + result.stderr
    # The host's device files bound in (/dev/null, and /dev/null over masked /proc files) are not writable mounts.
    bound_devices = {f"/{name}" for name in ("null", "zero", "random", "urandom", "full", "tty")}
    writable = [(fields[4], fields[5]) for fields in map(str.split, lines[4:])
                if "rw" in fields[5].split(",") and fields[3] not in bound_devices]
    assert writable and all("nodev" in options.split(",") for _, options in writable), writable


@pytest.mark.parametrize("volume", ["../../../../../../tmp/{name}", "/link/{name}"])
def test_hostile_volume_path_creates_nothing_on_the_host(tmp_path, store_dir, volume):
    """Attack: a Volumes entry climbing out with `..`, or through the image's absolute symlink
    /link -> /tmp, so that the runtime's mkdir (as root) creates /tmp/NAME on the host. Must hold:
    nothing appears on the host; the volume lands at /tmp/NAME inside the image."""
    name = f"layermount-evil-{uuid.uuid4().hex}"
    image = hostile_image(tmp_path / "img.tar", extra=[Symlink("link", "/tmp")], volumes=[volume.format(name=name)])
    result = run_in(image, store_dir, "/bin/sh", "-c", f"test -d /tmp/{name} && echo inside")
    assert not os.path.lexists(f"/tmp/{name}"), "HOST PATH WAS CHANGED"
    assert result.stdout == "inside\n", result.stderr


def test_terminal_injection_does_not_reach_the_host_shell(tmp_path, store_dir, escape_binary):
    """Attack: TIOCSTI on the terminal the command inherited pushes "id > /tmp/x\\n" into its input
    queue; the host's shell (root) reads and runs it once the container exits. Must hold: the ioctl
    is refused (the container has its own session, without a controlling terminal) and nothing is
    queued on the terminal."""
    skip_without_tiocsti()
    image = hostile_image(tmp_path / "img.tar", escape_binary)
    result, queued = typed_into_the_terminal(image, store_dir)
    assert "CONTAINED" in result.stdout and "ESCAPED" not in result.stdout, result.stdout + result.stderr
    assert b"INJECTED" not in queued


def skip_without_tiocsti() -> None:
    legacy = Path("/proc/sys/dev/tty/legacy_tiocsti")
    if legacy.exists() and legacy.read_text().strip() == "0":
        pytest.skip("kernel refuses TIOCSTI to everyone (dev.tty.legacy_tiocsti=0)")


def typed_into_the_terminal(image: Path, store: Path, *flags: str, env=None) -> tuple[subprocess.CompletedProcess, bytes]:
    """``/bin/escape tiocsti "echo INJECTED"`` run with a pty as layermount's controlling terminal
    (setsid -c, as a login shell's would be); the run, and what was left queued on that terminal."""
    master, slave = os.openpty()
    try:
        result = subprocess.run(["setsid", "-w", "-c", *LAYERMOUNT, "run", "--store", str(store), "-q", *flags,
                                 str(image), "/bin/escape", "tiocsti", "echo INJECTED\n"],
                                stdin=slave, capture_output=True, text=True, timeout=120, env=env)
        os.set_blocking(slave, False)
        queued = os.read(slave, 1024) if select.select([slave], [], [], 0.2)[0] else b""
        return result, queued
    finally:
        os.close(master)
        os.close(slave)


def test_other_users_cannot_reach_a_non_root_containers_mount(tmp_path, store_dir):
    """Attack: while a container runs as User app (uid 1000), the host's `nobody` lists and reads its
    root through the mountpoint (mounted allow_other so that uid 1000 can use it), or through
    /proc/PID/root of its processes. Must hold: both are refused."""
    image = hostile_image(tmp_path / "img.tar", user="app", extra=[File("etc/app-secret", b"app-only\n")])
    before = {point for point, kind in mount_entries() if kind == FSTYPE}
    process = subprocess.Popen([*LAYERMOUNT, "run", "--store", str(store_dir), "-q", str(image), "/bin/sh", "-c",
                                "echo ready; read line; echo bye"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "ready\n", process.stderr.read()
        points = [point for point, kind in mount_entries()
                  if kind == FSTYPE and point not in before and "layermount-run-" in point]
        assert len(points) == 1, points
        inner = [pid for pid in _pids_of_uid(1000) if os.readlink(f"/proc/{pid}/exe").endswith("busybox")]
        assert inner, "the container's shell runs as uid 1000"
        probe = (f"cat {points[0]}/etc/app-secret; ls {points[0]}; "
                 + "".join(f"cat /proc/{pid}/root/etc/app-secret; " for pid in inner))
        seen = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                               "sh", "-c", probe], capture_output=True, text=True, timeout=30)
        assert "app-only" not in seen.stdout and "bin" not in seen.stdout.split(), seen.stdout
        assert "Permission denied" in seen.stderr
    finally:
        try:
            process.communicate("go\n", timeout=60)  # the container ends on its own, so run unmounts
        except subprocess.TimeoutExpired:
            process.terminate()
            process.communicate(timeout=60)
    assert process.returncode == 0


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except FileNotFoundError:
                continue
    return pids

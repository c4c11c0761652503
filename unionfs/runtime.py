"""A toy container runtime on top of a mount: ``layermount run IMAGE [CMD ...]``.

The mount is the root; the command runs in new mount, PID, UTS, IPC and cgroup
namespaces (unshare(1) makes them, so PID 1 inside is a process we control).
What the command must never get is the host: so the child pivots into the
mount and detaches the old root (a chroot can be climbed out of), masks and
write-protects the parts of /proc and /sys that act on the whole machine, as
runc does, and drops to Docker's default capabilities before it execs. Every
path the image names (Volumes, WorkingDir, /dev, /proc) is resolved beneath
the mount, never through the host.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import platform
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import termios
from dataclasses import dataclass, field

from . import safepath
from .errors import ImageError, LayermountError, UsageError
from .textsafe import shown

DEVICES = ("null", "zero", "random", "urandom", "full", "tty")
HOSTNAME = "layermount"
MAX_VOLUMES = 256            # each is a host directory and a mount; a config may not ask for millions
MAX_ACCOUNT_FILE = 1 << 20   # the image's /etc/passwd and /etc/group, read as root before the drop

# Docker's default capability set (moby's oci/caps defaults); every other capability leaves
# all five sets. CAP_NET_RAW only in a network namespace of its own: on the host's network,
# raw sockets would let the container sniff and spoof the host's traffic.
KEPT_CAPABILITIES = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6, "SETUID": 7,
    "SETPCAP": 8, "NET_BIND_SERVICE": 10, "SYS_CHROOT": 18, "MKNOD": 27, "AUDIT_WRITE": 29, "SETFCAP": 31,
}
CAP_NET_RAW = 13
NETWORKS = ("none", "host")
# runc's defaults: kernel knobs for the whole machine are read-only, leaks are hidden.
READ_ONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
MASKED_PATHS = ("/proc/acpi", "/proc/asound", "/proc/interrupts", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
                "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap")

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 24, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "loongarch64": 41, "ppc64le": 203,
                   "s390x": 217, "armv7l": 218, "armv8l": 218}

MACHINE = platform.machine()
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


@dataclass
class Container:
    """What runs where: everything the namespaced child needs, passed to it as JSON."""

    root: str
    argv: list[str]
    env: list[str] = field(default_factory=list)
    workdir: str = "/"
    user: str = ""
    hostname: str = HOSTNAME
    volumes: dict[str, str] = field(default_factory=dict)   # path in the container -> host dir
    network: str = "none"                                   # "none": own namespace, loopback only
    binds: list[tuple[str, str, bool]] = field(default_factory=list)   # -v HOST:CTR[:ro]: (host, inside, ro)
    tty: bool = False                   # stdio is a pty of our own: make it the controlling terminal


def container_for(config: dict, root: str, command: list[str]) -> Container:
    """Docker's rules: CMD replaces Cmd; Entrypoint stays in front. Every field's type is checked."""
    runtime = config.get("config") or {}
    if not isinstance(runtime, dict):
        raise ImageError("image config: 'config' is not an object")
    entrypoint = _strings(runtime, "Entrypoint")
    argv = entrypoint + (command or _strings(runtime, "Cmd"))
    if not argv:
        raise UsageError("the image has no Entrypoint or Cmd: give a command after the image")
    env = _strings(runtime, "Env")
    if not any(item.startswith("PATH=") for item in env):
        env.append("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return Container(root=root, argv=argv, env=env, workdir=_string(runtime, "WorkingDir") or "/",
                     user=_string(runtime, "User"))


def image_volumes(config: dict) -> list[str]:
    """The image's declared Volumes (paths inside the container, resolved later beneath the root)."""
    volumes = (config.get("config") or {}).get("Volumes") or {}
    if not isinstance(volumes, dict) or not all(isinstance(path, str) and path for path in volumes):
        raise ImageError("image config: 'Volumes' is not an object of paths")
    if len(volumes) > MAX_VOLUMES:
        raise ImageError(f"image config: {len(volumes)} Volumes (more than {MAX_VOLUMES})")
    if any("\0" in path for path in volumes):
        raise ImageError("image config: a volume path holds a NUL byte")
    return sorted(volumes)


def _strings(runtime: dict, key: str) -> list[str]:
    value = runtime.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) and "\0" not in item for item in value):
        raise ImageError(f"image config: {key!r} is not a list of strings")
    return list(value)


def _string(runtime: dict, key: str) -> str:
    value = runtime.get(key) or ""
    if not isinstance(value, str) or "\0" in value:
        raise ImageError(f"image config: {key!r} is not a string")
    return value


def check_runnable(container: Container) -> None:
    """What ``run`` needs from this host and these arguments: asked before anything is unpacked."""
    if os.geteuid() != 0:
        raise LayermountError("layermount run needs root (it makes mount and PID namespaces)")
    if shutil.which("unshare") is None:
        raise LayermountError("layermount run needs unshare(1) from util-linux")
    if MACHINE not in _SYS_PIVOT_ROOT:
        raise LayermountError(f"layermount run does not know pivot_root(2) on {MACHINE}")
    if container.network not in NETWORKS:
        raise UsageError(f"--network: {container.network!r} is not one of {', '.join(NETWORKS)}")


def run(container: Container, *, interactive: bool = True) -> int:
    """Run the container's command to its end; its exit code is returned.

    With ``container.tty`` the command gets a new pty; ``interactive`` relays our stdin into it.
    """
    check_runnable(container)
    spec = json.dumps(container.__dict__)
    if container.tty:
        from .ptyrelay import run_on_pty
    namespaces = ["--mount", "--pid", "--uts", "--ipc", "--cgroup"]
    if container.network == "none":
        namespaces.append("--net")
    command = ["unshare", *namespaces, "--fork", "--propagation", "private",
               sys.executable, "-m", "unionfs.runtime", spec]
    # SIGTERM ends the run as Ctrl-C does: subprocess.run kills unshare(1), the command dies
    # with it (its parent-death signal), and the caller unmounts.
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        if container.tty:
            return run_on_pty(lambda pty: subprocess.Popen(command, preexec_fn=_die_with_parent, stdin=pty,
                                                           stdout=pty, stderr=pty), forward_input=interactive)
        return subprocess.run(command, preexec_fn=_die_with_parent).returncode
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def _die_with_parent() -> None:
    """unshare(1) and so the command (whose parent it is) die with us, even when we are SIGKILLed."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _enter(container: Container) -> None:
    """In the new namespaces (we become PID 1): build the root, pivot into it, drop privileges, exec."""
    root_fd = os.open(container.root, os.O_RDONLY | os.O_DIRECTORY)
    # The host's files are reachable only until the pivot: bind what comes from there first.
    _bind_volumes(root_fd, container.volumes)
    _bind_host_dirs(root_fd, container.binds)
    _make_dev(root_fd, console=container.tty)
    for name in ("proc", "sys"):
        os.close(_runtime_mountpoint(root_fd, name))
    _pivot_into(root_fd)
    _mount_proc_and_sys()
    _libc.sethostname(container.hostname.encode(), len(container.hostname))
    if container.network == "none":
        _loopback_up()
    _enter_workdir(container.workdir)
    uid, gid, groups = _resolve_user(container.user)
    env = dict(item.split("=", 1) for item in container.env if "=" in item)
    env.setdefault("HOSTNAME", container.hostname)
    env.setdefault("HOME", "/root" if uid == 0 else "/")
    _drop_privileges(uid, gid, groups, net_raw=container.network == "none", terminal=container.tty)
    try:
        os.execvpe(container.argv[0], container.argv, env)
    except FileNotFoundError:
        print(f"layermount: {shown(container.argv[0])}: not found in the image", file=sys.stderr)
        raise SystemExit(127)
    except PermissionError:
        print(f"layermount: {shown(container.argv[0])}: permission denied", file=sys.stderr)
        raise SystemExit(126)


def _bind_volumes(root_fd: int, volumes: dict[str, str]) -> None:
    """Each host directory bound (nosuid, nodev) where the image's path leads, resolved beneath the root."""
    root = os.fstat(root_fd)
    for inside, host in volumes.items():
        target = make_dirs_in_root(root_fd, inside)
        info = os.fstat(target)
        if (info.st_dev, info.st_ino) == (root.st_dev, root.st_ino):
            raise ImageError(f"volume {shown(inside)} is the container's root")
        # As Docker's anonymous volumes: the fresh directory takes the image directory's owner and mode.
        os.chown(host, info.st_uid, info.st_gid)
        os.chmod(host, info.st_mode & 0o7777)
        _mount(host, safepath.fd_path(target), None, MS_BIND | MS_REC)
        os.close(target)
        # An fd's magic link names the directory under the new mount: look the path up again.
        target = safepath.open_in_root(root_fd, inside.encode("utf-8", "surrogateescape"), os.O_PATH)
        _mount("", safepath.fd_path(target), None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
        os.close(target)


def _bind_host_dirs(root_fd: int, binds: list[tuple[str, str, bool]]) -> None:
    """``-v HOST:CTR[:ro]``: the user's host directory bound (nosuid, nodev) beneath the root, never chowned."""
    for host, inside, read_only in binds:
        source = os.open(host, os.O_PATH | os.O_DIRECTORY)
        target = make_dirs_in_root(root_fd, inside)
        _mount(os.fsdecode(safepath.fd_path(source)), safepath.fd_path(target), None, MS_BIND | MS_REC)
        os.close(source)
        os.close(target)
        target = safepath.open_in_root(root_fd, inside.encode("utf-8", "surrogateescape"), os.O_PATH)
        _mount("", safepath.fd_path(target), None,
               MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0))
        os.close(target)


def make_dirs_in_root(root_fd: int, path: str) -> int:
    """A directory fd on ``path`` resolved as if ``root_fd`` were /, creating missing directories there.

    ``..`` stops at the root and absolute symlinks start from it (RESOLVE_IN_ROOT), so an
    image's ``../../tmp/evil`` or ``/vol -> /etc`` lands inside the mount, never on the host.
    """
    parts = [part for part in path.encode("utf-8", "surrogateescape").split(b"/") if part not in (b"", b".")]
    parent = os.dup(root_fd)
    try:
        for depth in range(len(parts)):
            prefix = b"/".join(parts[:depth + 1])
            try:
                child = safepath.open_in_root(root_fd, prefix, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                try:
                    os.mkdir(parts[depth], 0o755, dir_fd=parent)
                except FileExistsError:
                    raise ImageError(f"{shown(path)}: {shown('/' + os.fsdecode(prefix))} is a dangling "
                                     "symlink") from None
                child = safepath.open_in_root(root_fd, prefix, os.O_RDONLY | os.O_DIRECTORY)
            except NotADirectoryError:
                raise ImageError(f"{shown(path)}: {shown('/' + os.fsdecode(prefix))} is not a directory") from None
            os.close(parent)
            parent = child
        return parent
    except BaseException:
        os.close(parent)
        raise


def _make_dev(root_fd: int, *, console: bool = False) -> None:
    """A fresh nodev tmpfs /dev with the host's harmless devices bound in, and /dev/shm.

    ``console``: the run's own pty (our stdin) bound at /dev/console, as runc does, so
    that ttyname() finds it once the host's /dev/pts is gone.
    """
    dev = _runtime_mountpoint(root_fd, "dev")
    _mount("tmpfs", safepath.fd_path(dev), "tmpfs", MS_NOSUID | MS_NOEXEC | MS_NODEV, "mode=755,size=64k")
    os.close(dev)
    dev = _runtime_mountpoint(root_fd, "dev")   # now the tmpfs
    try:
        for name in DEVICES:
            if os.path.exists(f"/dev/{name}"):
                os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666, dir_fd=dev))
                _bind_node(f"/dev/{name}", safepath.fd_path(dev, name.encode()))
        if console:
            os.close(os.open("console", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600, dir_fd=dev))
            _bind_node(os.ttyname(0), safepath.fd_path(dev, b"console"))
        for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                             ("stderr", "/proc/self/fd/2")):
            os.symlink(target, link, dir_fd=dev)
        os.mkdir("shm", 0o1777, dir_fd=dev)
        _mount("shm", safepath.fd_path(dev, b"shm"), "tmpfs", MS_NOSUID | MS_NOEXEC | MS_NODEV,
               "mode=1777,size=64m")
    finally:
        os.close(dev)


def _bind_node(node: str, target) -> None:
    """Bind one of the host's own device nodes, read-only: a device still opens for writing on a
    read-only mount, but its inode takes no chmod, chown or utime (root inside would otherwise
    change the host's /dev/null for every host process)."""
    _mount(node, target, None, MS_BIND)
    _mount("", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)


def _runtime_mountpoint(root_fd: int, name: str) -> int:
    """The image's /dev, /proc or /sys as a real directory (made if missing), never through a symlink.

    Following ``/proc -> /dev`` would put the runtime's mounts where the image chose, and its
    checks of /proc/sys on something else (runc refuses these too).
    """
    for attempt in range(2):
        try:
            return safepath.open_beneath(root_fd, name.encode(), os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            if attempt == 0:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=root_fd)
        except OSError as error:
            if error.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            break
    raise ImageError(f"the image's /{name} is not a directory (a symlink?): the runtime mounts its own there")


def _pivot_into(root_fd: int) -> None:
    """pivot_root(".", ".") then detach the old root under it: no host path is left in the namespace."""
    os.fchdir(root_fd)
    if _libc.syscall(_SYS_PIVOT_ROOT[MACHINE], b".", b".") != 0:
        _raise_errno("pivot_root into the mount")
    if _libc.umount2(b".", MNT_DETACH) != 0:
        _raise_errno("detach the host's root")
    os.chdir("/")
    os.close(root_fd)
    # Until exec we are host root in the image's tree: an import now would run the image's files.
    sys.path.clear()
    sys.path_importer_cache.clear()


def _mount_proc_and_sys() -> None:
    """A /proc of our PID namespace and a read-only /sys, both with the host-wide parts locked away."""
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NOEXEC | MS_NODEV)
    _mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NOEXEC | MS_NODEV)
    for path in READ_ONLY_PATHS:
        if os.path.exists(path):
            _mount(path, path, None, MS_BIND | MS_REC)
            _mount("", path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for path in MASKED_PATHS:
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        elif os.path.exists(path):
            _bind_node("/dev/null", path)


def _enter_workdir(workdir: str) -> None:
    """Inside the pivoted root, so `..` and symlinks in WorkingDir resolve within the image; made if missing."""
    path = workdir if workdir.startswith("/") else "/" + workdir
    try:
        os.makedirs(path, exist_ok=True)
        os.chdir(path)
    except OSError as error:
        raise SystemExit(f"layermount: WorkingDir {shown(workdir)}: {error.strerror}")


def _loopback_up() -> None:
    """A new network namespace starts with lo down: up it, so localhost works inside."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH22x", b"lo", flags | iff_up))


def _drop_privileges(uid: int, gid: int, groups: list[int], *, net_raw: bool, terminal: bool = False) -> None:
    """Docker's default capabilities in the bounding set, none inheritable or ambient; then the user.

    A non-root user loses its effective and permitted sets at setuid (the kernel does that)
    and gets no_new_privs, so no setuid file in the image can give them back. The new session
    takes the controlling terminal away: without it, TIOCSTI cannot type into the host's shell.
    With ``terminal`` (``run -t``) stdin is a pty of the run's own, made the new controlling one.
    """
    kept = sum(1 << number for number in KEPT_CAPABILITIES.values()) | (1 << CAP_NET_RAW if net_raw else 0)
    with open("/proc/sys/kernel/cap_last_cap") as handle:
        last = int(handle.read())
    for number in range(last + 1):
        if not kept & (1 << number) and _libc.prctl(PR_CAPBSET_DROP, number, 0, 0, 0) != 0:
            _raise_errno(f"drop capability {number}")
    if _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        _raise_errno("clear the ambient capabilities")
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)(kept & 0xFFFFFFFF, kept & 0xFFFFFFFF, 0, kept >> 32, kept >> 32, 0)
    if _libc.capset(header, data) != 0:
        _raise_errno("set the capabilities")
    os.setsid()
    if terminal:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    if uid != 0 and _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _raise_errno("set no_new_privs")
    # The kernel forgets the parent-death signal at setuid: set it after, so the command dies with unshare(1).
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _mount(source: str, target: str | bytes, fstype: str | None, flags: int, data: str | None = None) -> None:
    """mount(2); a target of /proc/self/fd/N is the fd's own directory, never re-resolved by name."""
    if _libc.mount(source.encode(), os.fsencode(target), fstype.encode() if fstype else None, flags,
                   data.encode() if data else None) != 0:
        _raise_errno(f"mount {os.fsdecode(target)}")


def _raise_errno(what: str) -> None:
    error = ctypes.get_errno()
    raise OSError(error, f"{what}: {os.strerror(error)}")


def _resolve_user(user: str) -> tuple[int, int, list[int]]:
    """``User`` as Docker reads it: name or uid, optional :group, looked up in the image's files."""
    if not user:
        return 0, 0, []
    name, _, group = user.partition(":")
    passwd = _table("/etc/passwd")
    entry = next((row for row in passwd if row[0] == name or row[2] == name), None)
    try:
        if entry is not None:
            uid, gid = int(entry[2]), int(entry[3])
        elif name.isdigit():
            uid, gid = int(name), int(name)
        else:
            raise SystemExit(f"layermount: user {shown(name)} is not in the image's /etc/passwd")
        if group:
            row = next((row for row in _table("/etc/group") if row[0] == group or row[2] == group), None)
            gid = int(row[2]) if row else int(group) if group.isdigit() else gid
    except ValueError:
        raise SystemExit(f"layermount: user {shown(user)}: the image's /etc/passwd or /etc/group is malformed")
    return uid, gid, [gid]


def _table(path: str) -> list[list[str]]:
    """A regular file's colon rows: a FIFO would hang us, /dev/zero would fill memory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []
        text = handle.read(MAX_ACCOUNT_FILE).decode("utf-8", "replace")
    return [line.split(":") for line in text.splitlines() if line.count(":") >= 3]


def fresh_volumes(config: dict) -> tuple[dict[str, str], str | None]:
    """A temporary host dir for each declared volume, as Docker's anonymous volumes (0700 parent)."""
    volumes = image_volumes(config)
    if not volumes:
        return {}, None
    base = tempfile.mkdtemp(prefix="layermount-volumes-")
    made = {}
    for index, path in enumerate(volumes):
        host = os.path.join(base, str(index))
        os.mkdir(host)
        made[path] = host
    return made, base


if __name__ == "__main__":
    try:
        _enter(Container(**json.loads(sys.argv[1])))
    except (OSError, LayermountError) as error:
        print(f"layermount: run: {error}", file=sys.stderr)
        raise SystemExit(125)

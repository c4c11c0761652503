"""A mount's life seen from outside the daemon: checks, the fork, the ready handshake, unmount.

``mount`` returns only once the kernel has sent the daemon a request and got
an answer (the daemon stats its own mountpoint and reports through a pipe),
so a caller that lists the mountpoint right after finds it ready.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from . import textsafe
from .errors import MountError
from .layerform import PID_XATTR

if TYPE_CHECKING:
    from .overlay import MergedView

FSTYPE = "fuse.layermount"


@dataclass
class MountOptions:
    mountpoint: str
    foreground: bool = False
    debug: bool = False
    allow_other: bool = False
    suid: bool = False
    dev: bool = False
    read_only: bool = False
    log_file: str | None = None
    layers_dir: bool = True          # /.layers/N: the image after each build step
    extra_options: list[str] = field(default_factory=list)


def check_mountpoint(path: str) -> str:
    """The mountpoint must be an existing, empty directory that is not already mounted on."""
    fd, real = open_mountpoint(path)
    os.close(fd)
    return real


def open_mountpoint(path: str) -> tuple[int, str]:
    """Open and check the mountpoint; (its fd, its real path).

    Every check is made on the fd, and root mounts through /proc/self/fd/N:
    a user who owns a parent of the mountpoint and swaps it for a symlink (to
    /etc, say) between the check and mount(2) cannot move the mount.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MountError(f"mountpoint {path}: does not exist") from None
    except NotADirectoryError:
        raise MountError(f"mountpoint {path}: not a directory") from None
    except PermissionError:
        raise MountError(f"mountpoint {path}: permission denied") from None
    except OSError as exc:
        raise MountError(f"mountpoint {path}: {exc.strerror}") from None
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
        if is_mounted(real):
            raise MountError(f"mountpoint {path}: something is already mounted there")
        try:
            if os.listdir(fd):
                raise MountError(f"mountpoint {path}: not empty")
        except PermissionError:
            raise MountError(f"mountpoint {path}: permission denied") from None
        if not os.path.exists("/dev/fuse"):
            raise MountError("/dev/fuse: missing (FUSE is needed to mount)")
        if not os.access("/dev/fuse", os.R_OK | os.W_OK):
            raise MountError("/dev/fuse: permission denied (unprivileged FUSE needs it mode 0666, as udev "
                             "normally sets it, and fusermount3)")
    except BaseException:
        os.close(fd)
        raise
    return fd, real


def mount_entries() -> list[tuple[str, str]]:
    """(mountpoint, fstype) for every mount this process can see."""
    return [(point, kind) for point, kind, _ in _mountinfo()]


def mount_owner(mountpoint: str) -> int | None:
    """The uid a FUSE mount belongs to (its ``user_id=``: fusermount3 sets it to whoever mounted it)."""
    real = os.path.realpath(mountpoint)
    owner = None
    for point, kind, options in _mountinfo():
        if point == real:    # the last one listed is the one on top
            owner = None
            for option in options.split(","):
                if option.startswith("user_id=") and kind.startswith("fuse"):
                    owner = int(option[len("user_id="):])
    return owner


def _mountinfo() -> list[tuple[str, str, str]]:
    """(mountpoint, fstype, super options) of every mount this process can see."""
    entries = []
    with open("/proc/self/mountinfo", "rb") as info:
        for line in info:
            fields = line.split()
            separator = fields.index(b"-")
            point = fields[4].decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")
            options = fields[separator + 3].decode(errors="replace") if len(fields) > separator + 3 else ""
            entries.append((point, fields[separator + 1].decode(), options))
    return entries


def is_mounted(path: str, fstype: str | None = None) -> bool:
    real = os.path.realpath(path)
    return any(point == real and (fstype is None or kind == fstype) for point, kind in mount_entries())


def mount(view_factory: Callable[[], MergedView], options: MountOptions,
          cleanup: Callable[[], None] | None = None) -> int:
    """Mount and serve; in the background unless ``options.foreground``.

    Returns the daemon's pid once the mount answers (foreground: after unmount).
    ``cleanup`` runs in the daemon after the mount is gone (e.g. to delete a
    throw-away upper directory).
    """
    from .daemon import serve  # pyfuse3 and trio: loaded only when something is mounted

    mountpoint_fd, options.mountpoint = open_mountpoint(options.mountpoint)
    try:
        view = view_factory()
    except BaseException:
        os.close(mountpoint_fd)
        raise
    if options.foreground:
        if serve(view, options, mountpoint_fd, ready_fd=None, cleanup=cleanup) != 0:
            raise MountError(f"mount {options.mountpoint}: the FUSE loop failed (see the messages above)")
        return os.getpid()
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(ready_read)
        code = 1
        try:
            os.setsid()
            _detach_stdio(options.log_file)
            code = serve(view, options, mountpoint_fd, ready_fd=ready_write, cleanup=cleanup)
        finally:
            os._exit(code)
    os.close(ready_write)
    os.close(mountpoint_fd)
    view.close()
    with os.fdopen(ready_read, "rb") as ready:
        message = ready.read().decode(errors="replace").strip()
    if message == "ready":
        return pid
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    raise MountError(f"mount {options.mountpoint}: "
                     f"{textsafe.shown(message) if message else 'the daemon exited before the mount was ready'}")


def _detach_stdio(log_file: str | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if log_file else null
    os.dup2(out, 1)
    os.dup2(out, 2)


def daemon_pid(mountpoint: str) -> int | None:
    try:
        return int(os.getxattr(mountpoint, PID_XATTR.decode()))
    except (OSError, ValueError):
        return None


def unmount(mountpoint: str, *, lazy: bool = False, timeout: float = 30.0) -> None:
    """Unmount and wait for the daemon to exit; a dead daemon's mount (ENOTCONN) is cleared lazily."""
    real = os.path.realpath(mountpoint)
    if not is_mounted(real):
        raise MountError(f"{mountpoint}: not mounted")
    pid = daemon_pid(real)
    dead = False
    try:
        os.stat(real)
    except OSError as exc:
        dead = exc.errno == errno.ENOTCONN
    command = ["fusermount3", "-u"] + (["-z"] if lazy or dead else []) + [real]
    if not any(point == real and kind.startswith("fuse") for point, kind in mount_entries()):
        command = ["umount"] + (["-l"] if lazy else []) + [real]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        raise MountError(f"{mountpoint}: cannot unmount: {detail}")
    if pid is not None:
        _wait_for_exit(pid, timeout)


def _wait_for_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as proc_stat:
                if proc_stat.read().split(b")")[-1].split()[0] == b"Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.02)
    raise MountError(f"daemon {pid} did not exit within {timeout:.0f}s after unmount")

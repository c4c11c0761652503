"""A mount's life: checks, the daemon, the ready handshake, signals, unmount.

``mount`` returns only once the kernel has sent the daemon a request and got
an answer (the daemon stats its own mountpoint and reports through a pipe),
so a caller that lists the mountpoint right after finds it ready.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import pyfuse3
import trio

from . import textsafe
from .errors import MountError
from .fuse_ops import LayerOperations
from .layerform import PID_XATTR
from .mountopts import shown
from .overlay import MergedView

FSTYPE = "fuse.layermount"
log = logging.getLogger("layermount")


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

    def fuse_options(self) -> set[str]:
        """Safe by default: nosuid, nodev and kernel permission checks unless asked otherwise."""
        options = set(pyfuse3.default_options) | {"fsname=layermount", "subtype=layermount", "default_permissions"}
        options.add("suid" if self.suid else "nosuid")
        options.add("dev" if self.dev else "nodev")
        if self.read_only:
            options.add("ro")
        if self.allow_other:
            options.add("allow_other")
        if self.debug:
            options.add("debug")
        options.update(self.extra_options)
        return options


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
    mountpoint_fd, options.mountpoint = open_mountpoint(options.mountpoint)
    try:
        view = view_factory()
    except BaseException:
        os.close(mountpoint_fd)
        raise
    if options.foreground:
        if _serve(view, options, mountpoint_fd, ready_fd=None, cleanup=cleanup) != 0:
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
            code = _serve(view, options, mountpoint_fd, ready_fd=ready_write, cleanup=cleanup)
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


def _serve(view: MergedView, options: MountOptions, mountpoint_fd: int, ready_fd: int | None,
           cleanup: Callable[[], None] | None) -> int:
    """Run the FUSE loop until unmounted or signalled; 0 on a clean exit, 1 when the loop failed."""
    logging.basicConfig(level=logging.DEBUG if options.debug else logging.WARNING,
                        format="layermount[%(process)d] %(levelname)s %(message)s", stream=sys.stderr)
    _raise_fd_limit()
    _tune_gc()
    operations = LayerOperations(view, layers_dir=options.layers_dir)
    # Root's libfuse calls mount(2) itself: give it the checked directory, not a path to resolve again.
    # An unprivileged mount goes through fusermount3, which makes the same checks race-free itself.
    target = f"/proc/self/fd/{mountpoint_fd}" if os.geteuid() == 0 else options.mountpoint
    try:
        _fuse_init(operations, options, target)
    except MountError as exc:
        view.close()
        os.close(mountpoint_fd)
        if ready_fd is None:
            raise MountError(f"mount {options.mountpoint}: {exc}") from None
        _report(ready_fd, str(exc))
        return 1
    unmounted_by_us = False
    failed = False
    try:
        unmounted_by_us = trio.run(_main, options.mountpoint, ready_fd)
    except Exception:
        log.exception("FUSE loop failed")
        failed = True
    finally:
        pyfuse3.close(unmount=unmounted_by_us)   # through the same fd path: it stays open until here
        os.close(mountpoint_fd)
        operations.close()
        view.close()
        if cleanup is not None:
            try:
                cleanup()
            except Exception:
                log.exception("cleanup after unmount failed")
    return 1 if failed else 0


def _fuse_init(operations: LayerOperations, options: MountOptions, target: str) -> None:
    """pyfuse3.init, with libfuse's and fusermount3's own reason in the error.

    Both print the reason on stderr (fd 2) and pyfuse3 raises only "fuse_session_new() failed",
    so fd 2 goes to a memory file for the call; what was printed is then passed on to the real
    stderr (the log) and its last line names the failure.
    """
    captured = os.memfd_create("layermount-fuse-init")
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(captured, 2)
    try:
        pyfuse3.init(operations, target, options.fuse_options())
    except Exception as exc:  # pyfuse3 reports mount failures as RuntimeError
        failure = exc
    else:
        failure = None
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        printed = os.pread(captured, 1 << 16, 0).decode(errors="replace")
        os.close(captured)
    if printed and not (failure is not None and options.foreground):   # else the error line says it
        sys.stderr.write(printed)
        sys.stderr.flush()
    if failure is not None:
        lines = [line.strip() for line in printed.splitlines() if line.strip()]
        reason = lines[-1].removeprefix("fuse: ") if lines else str(failure)
        raise MountError(f"cannot mount: {shown(reason)}")


def _tune_gc() -> None:
    """A merged listing is thousands of small objects that live as long as the kernel holds the
    directory; with the default thresholds the cyclic collector walks them again and again (a
    third of a cold 20,000-entry listing). What is loaded by now (modules, the view) is frozen
    out of its sight, and it runs every 50,000 allocations rather than every 700."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _raise_fd_limit() -> None:
    """One fd per open file of every user of the mount: take all the fds we may (as fuse-overlayfs does).

    Running out still fails only the request that needed the fd (EMFILE), at the FUSE boundary.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _main(mountpoint: str, ready_fd: int | None) -> bool:
    """Serve; returns True when a signal ended it (so we must unmount ourselves)."""
    signalled = False

    async def announce_ready() -> None:
        await trio.to_thread.run_sync(os.stat, mountpoint)
        _report(ready_fd, "ready")

    async def watch_signals() -> None:
        nonlocal signalled
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for _ in signals:
                signalled = True
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals)
        nursery.start_soon(announce_ready)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    return signalled


def _report(ready_fd: int | None, message: str) -> None:
    if ready_fd is None:
        if message != "ready":
            print(f"layermount: {textsafe.shown(message)}", file=sys.stderr)
        return
    with contextlib.suppress(OSError):
        os.write(ready_fd, message.encode() + b"\n")
        os.close(ready_fd)


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

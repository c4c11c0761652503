"""The daemon: the FUSE loop that serves a merged view, from pyfuse3.init to unmount.

Its own module so that only mounting loads pyfuse3 and trio: unpack and the
verbs that read images never pay for importing them.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import resource
import signal
import sys
from typing import TYPE_CHECKING, Callable

import pyfuse3
import trio

from . import textsafe
from .errors import MountError
from .fuse_ops import LayerOperations
from .mountopts import shown

if TYPE_CHECKING:
    from .mount import MountOptions
    from .overlay import MergedView

log = logging.getLogger("layermount")


def serve(view: MergedView, options: MountOptions, mountpoint_fd: int, ready_fd: int | None,
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


def _fuse_options(options: MountOptions) -> set[str]:
    """Safe by default: nosuid, nodev and kernel permission checks unless asked otherwise."""
    fuse = set(pyfuse3.default_options) | {"fsname=layermount", "subtype=layermount", "default_permissions"}
    fuse.add("suid" if options.suid else "nosuid")
    fuse.add("dev" if options.dev else "nodev")
    if options.read_only:
        fuse.add("ro")
    if options.allow_other:
        fuse.add("allow_other")
    if options.debug:
        fuse.add("debug")
    fuse.update(options.extra_options)
    return fuse


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
        pyfuse3.init(operations, target, _fuse_options(options))
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

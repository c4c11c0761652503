"""``run -t``: the command gets a pty of its own, and we copy bytes between it and our terminal.

As docker's client does: our terminal goes raw while the command runs (its
line discipline is the pty's), window size changes are passed on, and the
command's TIOCSTI can only type into its own pty, never into the shell
that started the run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import subprocess
import sys
import termios
import tty
from typing import Callable


def run_on_pty(start: Callable[[int], subprocess.Popen], *, forward_input: bool) -> int:
    """Start the command on a new pty's slave (``start(slave_fd)``), relay until it exits; its exit code."""
    master, slave = os.openpty()
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    _copy_window_size(stdout if os.isatty(stdout) else stdin, master)
    try:
        process = start(slave)
    finally:
        os.close(slave)
    saved = None
    if forward_input and os.isatty(stdin):
        saved = termios.tcgetattr(stdin)
        tty.setraw(stdin, termios.TCSANOW)     # keep what was typed ahead
    previous = signal.signal(signal.SIGWINCH, lambda *_: _copy_window_size(stdout, master))
    try:
        _relay(master, stdin if forward_input else None, stdout)
        return process.wait()
    finally:
        signal.signal(signal.SIGWINCH, previous)
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        os.close(master)


def _relay(master: int, stdin: int | None, stdout: int) -> None:
    """Until the pty's other side is closed by everyone (EIO on Linux)."""
    sources = [master] + ([stdin] if stdin is not None else [])
    while True:
        try:
            ready, _, _ = select.select(sources, [], [])
        except InterruptedError:
            continue
        if master in ready:
            try:
                data = os.read(master, 65536)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return
                raise
            if not data:
                return
            _write_all(stdout, data)
        if stdin is not None and stdin in ready:
            data = os.read(stdin, 65536)
            if data:
                _write_all(master, data)
            else:          # our stdin ended: the command sees end of file (^D), as docker -i does
                sources.remove(stdin)
                with contextlib.suppress(OSError):
                    _write_all(master, bytes([termios.tcgetattr(master)[6][termios.VEOF][0]]))


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _copy_window_size(source: int, target: int) -> None:
    with contextlib.suppress(OSError):
        size = fcntl.ioctl(source, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(target, termios.TIOCSWINSZ, size)

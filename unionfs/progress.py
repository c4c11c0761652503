"""Per-layer pull progress in the spirit of ``docker pull``: live bars on a terminal, plain lines otherwise.

On a terminal every line is cut to its width (a wrapped line breaks the
cursor-up redraw and leaves stale lines behind) and the block is redrawn when
the window is resized (SIGWINCH).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from typing import TextIO

from .textsafe import shown

PRESENT = "Already exists"
METERED = ("Downloading", "Extracting")      # the statuses with a bar, a rate and time left


def human_size(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.1f}{unit}" if unit != "B" else f"{int(size)}B"
        size /= 1000
    return f"{size:.1f}TB"


def human_duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class PullProgress:
    """Called from the unpacking threads as ``progress(short_id, status, done, total)``.

    ``quiet_when_present``: say nothing about layers the store already has (``run``
    on an image unpacked before prints no line at all).
    """

    BAR_WIDTH = 40
    MIN_BAR = 10

    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False, live: bool | None = None,
                 quiet_when_present: bool = False, clock=time.monotonic):
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.quiet_when_present = quiet_when_present
        self.live = self.stream.isatty() if live is None else live
        self._clock = clock
        self._lock = threading.Lock()
        self._lines: dict[str, tuple[str, int, int | None]] = {}   # short -> (status, done, total)
        self._started: dict[str, tuple[str, float]] = {}
        self._last_status: dict[str, str] = {}
        self._drawn: list[int] = []          # length of each line on screen, top first
        self._width = self._terminal_width()
        self._resized = False
        if self.live and not quiet and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGWINCH, self._on_resize)

    def __call__(self, short: str, status: str, done: int, total: int | None) -> None:
        if self.quiet or (self.quiet_when_present and status == PRESENT):
            return
        with self._lock:
            if status in METERED and self._started.get(short, ("", 0.0))[0] != status:
                self._started[short] = (status, self._clock() - 1e-3)   # a rate per phase
            if self.live:
                self._lines[short] = (status, done, total)
                self._redraw()
            elif self._last_status.get(short) != status:
                self._last_status[short] = status
                self.stream.write(self._format(short, status, done, total, width=None) + "\n")
                self.stream.flush()

    def _on_resize(self, signum, frame) -> None:
        self._resized = True
        # The main thread may be inside __call__ holding the lock: then the next update redraws.
        if self._lock.acquire(blocking=False):
            try:
                self._redraw()
            finally:
                self._lock.release()

    def _terminal_width(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            return 80

    def _format(self, short: str, status: str, done: int, total: int | None, width: int | None) -> str:
        """One layer's line, at most ``width - 1`` columns (the last column would wrap on some terminals)."""
        head = f"{shown(short)}: {status}"
        if status not in METERED:
            return _cut(head, width)
        if width is None:
            return f"{head} {human_size(total)}" if total else head
        amount = f"{human_size(done)}/{human_size(total)}" if total else human_size(done)
        elapsed = self._clock() - self._started.get(short, ("", self._clock()))[1]
        rate = done / elapsed if elapsed > 0 else 0
        tail = f" {amount}"
        if rate > 0:
            tail += f" {human_size(rate)}/s"
            if total and total > done:
                tail += f" {human_duration((total - done) / rate)} left"
        room = width - 1 - len(head) - len(tail) - 4      # " [" "] " around the bar
        if total and room >= self.MIN_BAR:
            bar = min(self.BAR_WIDTH, room)
            filled = min(bar, int(bar * done / total))
            meter = f"{'=' * max(filled - 1, 0)}{'>' if filled else ''}{' ' * (bar - filled)}"
            return _cut(f"{head} [{meter}]{tail}", width)
        return _cut(head + tail, width)

    def _redraw(self) -> None:
        out = self.stream
        if self._resized:
            self._resized = False
            self._width = self._terminal_width()
        # Rows the block takes now: a terminal that reflows on a resize (tmux, VTE) wraps
        # each line cut for a wider window over several rows.
        rows = sum(max(1, math.ceil(length / self._width)) for length in self._drawn)
        if rows:
            out.write(f"\r\x1b[{rows}A")
        out.write("\x1b[J")                      # everything below: old wrapped rows included
        drawn = []
        for short, (status, done, total) in self._lines.items():
            line = self._format(short, status, done, total, self._width)
            out.write(line + "\n")
            drawn.append(len(line))
        self._drawn = drawn
        out.flush()


def _cut(line: str, width: int | None) -> str:
    if width is None or len(line) < width:
        return line
    return line[: max(width - 2, 0)] + "…"

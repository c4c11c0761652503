"""Per-layer pull progress in the spirit of ``docker pull``: live bars on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from .textsafe import shown


def human_size(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.1f}{unit}" if unit != "B" else f"{int(size)}B"
        size /= 1000
    return f"{size:.1f}TB"


class PullProgress:
    """Called from the unpacking threads as ``progress(short_id, status, done, total)``."""

    BAR_WIDTH = 40

    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False, live: bool | None = None):
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.live = self.stream.isatty() if live is None else live
        self._lock = threading.Lock()
        self._lines: dict[str, str] = {}
        self._last_status: dict[str, str] = {}
        self._drawn = 0

    def __call__(self, short: str, status: str, done: int, total: int | None) -> None:
        if self.quiet:
            return
        with self._lock:
            if self.live:
                self._lines[short] = self._format(short, status, done, total)
                self._redraw()
            elif self._last_status.get(short) != status:
                self._last_status[short] = status
                self.stream.write(self._format(short, status, done, total, bar=False) + "\n")
                self.stream.flush()

    def _format(self, short: str, status: str, done: int, total: int | None, bar: bool = True) -> str:
        short = shown(short)
        if status not in ("Extracting", "Downloading"):
            return f"{short}: {status}"
        if not bar:
            return f"{short}: {status} {human_size(total)}" if total else f"{short}: {status}"
        if total:
            filled = min(self.BAR_WIDTH, int(self.BAR_WIDTH * done / total))
            meter = f"[{'=' * max(filled - 1, 0)}{'>' if filled else ''}{' ' * (self.BAR_WIDTH - filled)}] "
            return f"{short}: {status} {meter}{human_size(done)}/{human_size(total)}"
        return f"{short}: {status} {human_size(done)}"

    def _redraw(self) -> None:
        out = self.stream
        if self._drawn:
            out.write(f"\x1b[{self._drawn}A")
        for line in self._lines.values():
            out.write("\x1b[2K" + line + "\n")
        self._drawn = len(self._lines)
        out.flush()

"""Files open through the mount, by inode: what a deleted file still is, and readers that follow a copy-up.

A reader that opened a lower file before it was copied up must see the writes
made after, as on one filesystem: its fd is repointed at the copy (dup2) the
moment the copy-up completes. A deleted file that is still open is known only
by its fds. Without OPEN (patches/pyfuse3-noopen.patch) the kernel names files
by inode alone, and InodeFds keeps the fd each inode is served by.
"""

from __future__ import annotations

import errno
import os
import resource
import time
from collections import OrderedDict
from typing import Callable

from .nodes import Node


class OpenFiles:
    """Every fd the kernel holds as a file handle, by inode."""

    def __init__(self):
        self._inode_of: dict[int, int] = {}
        self._by_inode: dict[int, dict[int, bool]] = {}     # inode -> {fd: opened on a lower file}
        # Caches of fds that may be let go at any time (InodeFds): what the daemon gives up
        # first when it runs out of fds.
        self.spare_holders: list[Callable[[], None]] = []

    def add(self, fd: int, node: Node, *, lower: bool = False) -> None:
        self._inode_of[fd] = node.ino
        self._by_inode.setdefault(node.ino, {})[fd] = lower

    def __contains__(self, fd: int | None) -> bool:
        return fd in self._inode_of

    def any_fd(self, node: Node) -> int | None:
        return next(iter(self._by_inode.get(node.ino, ())), None)

    def reopen(self, node: Node, flags: int, *, keep: bool = True) -> int:
        """A deleted file has no path (its old name may be another file now): only the fd that
        keeps it for the kernel, or what is still open of it, can be opened again (``keep``:
        the new fd joins them)."""
        fd = node.kept_fd
        if fd is None:
            fd = self.any_fd(node)
        if fd is None:
            raise OSError(errno.ENOENT, "deleted")
        again = os.open(f"/proc/self/fd/{fd}", flags & ~os.O_TRUNC | os.O_CLOEXEC)
        if keep:
            self.add(again, node)
        return again

    def free_spare(self) -> bool:
        """Out of fds: close the cached ones (they are opened again when needed). True if any went."""
        before = len(self._inode_of)
        for close in self.spare_holders:
            close()
        return len(self._inode_of) < before

    def follow_copy_up(self, node: Node, open_copy: Callable[[], int]) -> None:
        """The node now lives in the upper: its readers of the lower file read the copy instead."""
        fds = self._by_inode.get(node.ino)
        for fd, lower in (fds or {}).items():
            if lower:
                copy = open_copy()
                os.dup2(copy, fd, inheritable=False)
                os.close(copy)
                fds[fd] = False

    def release(self, fd: int) -> None:
        ino = self._inode_of.pop(fd, None)
        fds = self._by_inode.get(ino)
        if fds is not None:
            fds.pop(fd, None)
            if not fds:
                del self._by_inode[ino]
        os.close(fd)


class InodeFds:
    """Without OPEN the kernel names files by inode alone: one fd per inode, read-only until a
    write needs more, registered in OpenFiles (so a copy-up repoints it and a deleted file is
    still found by it). The least recently used go beyond a quarter of the fd limit (at most
    1,024), and all of them when the process runs out of fds."""

    def __init__(self, files: OpenFiles, opener: Callable[[int, bool], int]):
        self._files = files
        self._opener = opener                     # (inode, writable) -> an fd added to ``files``
        self._fds: OrderedDict[int, tuple[int, bool]] = OrderedDict()
        self._written: dict[int, float] = {}         # inode -> when its writable fd was last asked for
        self.limit = max(16, min(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4))
        files.spare_holders.append(self.close)

    def fd(self, ino: int, *, writable: bool) -> int:
        cached = self._fds.get(ino)
        if cached is not None:
            if cached[1] or not writable:
                self._fds.move_to_end(ino)
                if writable:
                    self._written[ino] = time.monotonic()
                return cached[0]
            self.forget(ino)
        try:
            fd = self._opener(ino, writable)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not self._fds:
                raise
            self.close()
            fd = self._opener(ino, writable)
        self.adopt(ino, fd, writable=writable)
        return fd

    def adopt(self, ino: int, fd: int, *, writable: bool) -> None:
        """``fd``, already in OpenFiles, is now the one this inode is served by."""
        self.forget(ino)
        self._fds[ino] = (fd, writable)
        if writable:
            self._written[ino] = time.monotonic()
        if len(self._fds) > self.limit:
            self._files.release(self._fds.popitem(last=False)[1][0])

    def forget(self, ino: int) -> None:
        self._written.pop(ino, None)
        cached = self._fds.pop(ino, None)
        if cached is not None:
            self._files.release(cached[0])

    @property
    def writing(self) -> bool:
        return bool(self._written)

    def close_writers_idle_since(self, moment: float) -> None:
        """Without RELEASE nothing says a writer is done: an fd open for writing is let go once no
        write asked for it for a while, or it would keep the upper's filesystem from being
        remounted read-only (EBUSY) for as long as the kernel keeps the inode."""
        for ino in [ino for ino, last in self._written.items() if last < moment]:
            self.forget(ino)

    def close(self) -> None:
        self._written.clear()
        while self._fds:
            self._files.release(self._fds.popitem()[1][0])

"""Attribute changes: size, owner, mode, times and xattrs, made on the upper copy (or an open fd).

What the kernel asks in one SETATTR arrives as one AttrChange; the entry is
copied up first, so the lower layers never change.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from .. import safepath
from ..layerform import HIDDEN_XATTR_PREFIXES
from .content import open_file
from .copyup import CopyUp
from .idmap import change_owner
from .nodes import Node
from .tree import Tree


@dataclass(frozen=True)
class AttrChange:
    """The fields a SETATTR changes; None leaves a field as it is."""

    size: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None

    @property
    def empty(self) -> bool:
        return all(value is None for value in (self.size, self.mode, self.uid, self.gid,
                                               self.atime_ns, self.mtime_ns))

    @property
    def owner(self) -> tuple[int, int] | None:
        """(uid, gid) for chown, -1 for the one left alone; None when neither changes."""
        if self.uid is None and self.gid is None:
            return None
        return (-1 if self.uid is None else self.uid, -1 if self.gid is None else self.gid)

    @property
    def times(self) -> bool:
        return self.atime_ns is not None or self.mtime_ns is not None

    def new_times(self, current: os.stat_result) -> tuple[int, int]:
        return (current.st_atime_ns if self.atime_ns is None else self.atime_ns,
                current.st_mtime_ns if self.mtime_ns is None else self.mtime_ns)


class AttributeChanges:
    """Changes to an entry's attributes in one writable view."""

    def __init__(self, tree: Tree, copyup: CopyUp):
        self.tree = tree
        self.copyup = copyup

    def set(self, node: Node, change: AttrChange, open_fd: int | None = None) -> None:
        """Apply ``change`` to the node's upper copy; ``open_fd``, open for writing on that copy,
        takes the truncation (an O_WRONLY file may be one the caller cannot open again)."""
        if change.size is not None:
            if open_fd is not None:
                os.ftruncate(open_fd, change.size)
            else:
                self.copyup.copy_up(node, with_data=change.size > 0)
                fd = open_file(self.tree.layers[node.winner], node, os.O_WRONLY)
                try:
                    os.ftruncate(fd, change.size)
                finally:
                    os.close(fd)
        dir_fd, name = self.copyup.upper_path_of(node)
        try:
            if change.owner is not None or change.mode is not None:
                change_owner(dir_fd, name, change.owner, change.mode, self.copyup.upper.override_xattr)
            if change.times:
                current = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                os.utime(name, ns=change.new_times(current), dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.close(dir_fd)

    def set_xattr(self, node: Node, name: bytes, value: bytes) -> None:
        if name.startswith(HIDDEN_XATTR_PREFIXES):
            raise OSError(errno.EPERM, "a reserved attribute")
        dir_fd, entry = self.copyup.upper_path_of(node)
        try:
            os.setxattr(safepath.fd_path(dir_fd, entry), os.fsdecode(name), value, follow_symlinks=False)
        finally:
            os.close(dir_fd)

    def remove_xattr(self, node: Node, name: bytes) -> None:
        if name.startswith(HIDDEN_XATTR_PREFIXES):
            raise OSError(errno.ENODATA, "no such attribute")
        dir_fd, entry = self.copyup.upper_path_of(node)
        try:
            os.removexattr(safepath.fd_path(dir_fd, entry), os.fsdecode(name), follow_symlinks=False)
        finally:
            os.close(dir_fd)


def change_open_file(fd: int, change: AttrChange) -> None:
    """A deleted file has no path left; what is open of it still takes changes."""
    if change.size is not None:
        os.ftruncate(fd, change.size)
    if change.owner is not None:
        os.fchown(fd, *change.owner)
    if change.mode is not None:
        os.fchmod(fd, stat.S_IMODE(change.mode))
    if change.times:
        os.utime(fd, ns=change.new_times(os.fstat(fd)))

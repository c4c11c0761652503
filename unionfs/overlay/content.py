"""Reading an entry where its winning layer holds it: file data, symlink targets, xattrs.

Every path is opened beneath the layer root, never following a symlink, and
a layer file that is no longer a regular file (changed behind the mount) is
refused rather than blocking the daemon.
"""

from __future__ import annotations

import errno
import os

from .. import safepath
from ..layerform import HIDDEN_XATTR_PREFIXES
from .layers import Layer, ParentFd, regular_file
from .nodes import Node


def open_file(layer: Layer, node: Node, flags: int) -> int:
    """Open a node's file. O_NONBLOCK: a layer changed behind our back (a FIFO where a file
    was) must not block the daemon's one thread; anything but a regular file is refused."""
    fd = safepath.open_beneath(layer.root_fd, node.relpath, flags | os.O_NOFOLLOW | os.O_NONBLOCK)
    return regular_file(fd)


def readlink(layer: Layer, node: Node) -> bytes:
    with ParentFd(layer, node.relpath) as (fd, name):
        return os.readlink(name, dir_fd=fd)


def xattr_names(layer: Layer, node: Node) -> list[bytes]:
    with ParentFd(layer, node.relpath) as (fd, name):
        names = os.listxattr(safepath.fd_path(fd, name), follow_symlinks=False)
    return [encoded for encoded in map(os.fsencode, names) if not encoded.startswith(HIDDEN_XATTR_PREFIXES)]


def xattr(layer: Layer, node: Node, name: bytes) -> bytes:
    if name.startswith(HIDDEN_XATTR_PREFIXES):
        raise OSError(errno.ENODATA, "no such attribute")
    with ParentFd(layer, node.relpath) as (fd, entry):
        return os.getxattr(safepath.fd_path(fd, entry), os.fsdecode(name), follow_symlinks=False)

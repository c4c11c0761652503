"""Inode numbers and the table of inodes the kernel holds: st_ino policy, retirement, lookup counts.

The whole number space is laid out here. The top byte says which view an
inode belongs to: 0 the live view, N the ``/.layers/N`` cut, 0xFF the virtual
``/.layers`` directory and its aliases. Below it, host inode numbers are
reused as st_ino (stable, hardlinks agree for free); what does not fit below
2^48, or lives on another device, or was freed and may be reused by the host,
is numbered by the table.
"""

from __future__ import annotations

import errno
import os

from .nodes import Attr, Child, Node

TAG_SHIFT = 56
TAG_BASE = 1 << TAG_SHIFT
VIRTUAL_TAG = 0xFF
LAYERS_DIR_INO = (VIRTUAL_TAG << TAG_SHIFT) | 1
_ROOT = 1
_DIRECT_INO_LIMIT = 1 << 48


def view_tag(number: int) -> int:
    """The bits that mark the inodes of view ``number`` (0: the live view)."""
    return number << TAG_SHIFT


def view_number(inode: int) -> int:
    return inode >> TAG_SHIFT


def alias_ino(number: int) -> int:
    """The inode of ``/.layers/<short digest>``, the alias of cut ``number``."""
    return view_tag(VIRTUAL_TAG) | (1 + number)


def alias_number(inode: int) -> int:
    return (inode & (TAG_BASE - 1)) - 1


class InodeTable:
    """The inodes of one view: numbers from host inodes, and the nodes the kernel holds."""

    def __init__(self, direct_dev: int, number: int = 0):
        self.tag = view_tag(number)
        self._direct_dev = direct_dev
        self._ino_of_host: dict[tuple[int, int], int] = {}
        self._retired: set[tuple[int, int]] = set()
        self._next_ino = self.tag | _DIRECT_INO_LIMIT
        self.nodes: dict[int, Node] = {}

    def make_root(self, child: Child) -> Node:
        root = Node(self.tag | _ROOT, None, child)
        root.lookups = 1        # the kernel never forgets the root
        self.nodes[root.ino] = root
        return root

    # ---- numbers -------------------------------------------------------------
    def ino_for(self, attr: Attr) -> int:
        """st_ino from the host's: stable for the mount's life, shared by hardlinks.

        A host inode number freed in the upper may be reused by the host for a new
        file while the kernel still holds the old one; such numbers are retired
        and the new file gets one of ours.
        """
        host_ino = attr.host_ino
        if (not self._ino_of_host and not self._retired and attr.host_dev == self._direct_dev
                and 1 < host_ino < _DIRECT_INO_LIMIT):
            return self.tag | host_ino if self.tag else host_ino   # nothing renumbered yet: the usual case
        key = (attr.host_dev, host_ino)
        ino = self._ino_of_host.get(key)
        if ino is not None:
            return ino
        if attr.host_dev == self._direct_dev and 1 < host_ino < _DIRECT_INO_LIMIT and key not in self._retired:
            return self.tag | host_ino if self.tag else host_ino   # the live view shares the int
        ino = self._ino_of_host[key] = self._next_ino
        self._next_ino += 1
        return ino

    def keep(self, old: Attr, new: Attr) -> None:
        """After a copy-up the host inode changes; the served st_ino must not."""
        self._ino_of_host[(new.host_dev, new.host_ino)] = self.ino_for(old)

    def retire(self, attr: Attr) -> None:
        """The host inode is gone; the host may hand its number to a new file."""
        key = (attr.host_dev, attr.host_ino)
        self._ino_of_host.pop(key, None)
        self._retired.add(key)

    # ---- the nodes the kernel holds ---------------------------------------------
    def node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise OSError(errno.ENOENT, "stale inode") from None

    def known(self, attr: Attr) -> Node | None:
        """The node the kernel holds for an entry, if any."""
        return self.nodes.get(self.ino_for(attr))

    def node_of(self, parent: Node, child: Child) -> Node:
        """The node for a child, registered or not; counts no reference."""
        ino = self.ino_for(child.attr)
        node = self.nodes.get(ino)
        if node is None:
            return Node(ino, parent, child)
        node.attach(parent, child)
        return node

    def remember(self, parent: Node, child: Child) -> Node:
        """The kernel now holds one more reference to the node of ``child`` in ``parent``."""
        ino = self.ino_for(child.attr)
        node = self.nodes.get(ino)
        if node is None:
            node = self.nodes[ino] = Node(ino, parent, child)
        else:
            node.attach(parent, child)
        node.lookups += 1
        return node

    def forget(self, ino: int, count: int) -> bool:
        """Whether the kernel now holds the inode no more (what is kept for it may go)."""
        if ino == self.tag | _ROOT:
            return False
        node = self.nodes.get(ino)
        if node is None:
            return True
        node.lookups -= count
        if node.lookups > 0:
            return False
        del self.nodes[ino]
        if node.kept_fd is not None:
            # The kernel let go of a removed file: now it may really go, and its number with it.
            os.close(node.kept_fd)
            node.kept_fd = None
            self.retire(node.attr)
        return True

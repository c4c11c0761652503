"""What the merged view is made of: an entry's attributes, a visible name (Child), a known inode (Node).

A Child lives in its directory's cached listing; a Node exists while the
kernel holds the inode, and finds its path through its parents, so a rename
can never leave a stale path behind.
"""

from __future__ import annotations

import os
import stat

from ..layerform import Override

UPPER = 0      # the layer index of the upper; lower layers are 1 … n, top first
_NO_NAMES: frozenset[bytes] = frozenset()
# Modes, small ids and devices repeat across a tree: one int object each, not one per entry.
# Bounded by what is shared: a mode is 16 bits, ids only below SHARED_ID_LIMIT (an image may
# give every file an id of its own), devices are the host's.
SHARED_ID_LIMIT = 1 << 16
SHARED_VALUES: dict[int, int] = {}
_shared = SHARED_VALUES.setdefault


class Attr:
    """The attributes served for an entry: the layer's lstat, corrected by any override xattr."""

    __slots__ = ("mode", "uid", "gid", "size", "nlink", "rdev", "atime_ns", "mtime_ns", "ctime_ns",
                 "blocks", "host_dev", "host_ino")

    def __init__(self, st: os.stat_result, override: Override | None = None):
        uid, gid = st.st_uid, st.st_gid
        self.mode = _shared(st.st_mode, st.st_mode)
        self.uid = _shared(uid, uid) if uid < SHARED_ID_LIMIT else uid
        self.gid = _shared(gid, gid) if gid < SHARED_ID_LIMIT else gid
        self.size, self.nlink, self.rdev = st.st_size, st.st_nlink, st.st_rdev
        # An unpacked file's atime is its mtime (often its ctime too): equal times share one int.
        mtime, atime, ctime = st.st_mtime_ns, st.st_atime_ns, st.st_ctime_ns
        self.mtime_ns = mtime
        self.atime_ns = mtime if atime == mtime else atime
        self.ctime_ns = mtime if ctime == mtime else ctime
        self.blocks = st.st_blocks
        self.host_dev, self.host_ino = _shared(st.st_dev, st.st_dev), st.st_ino
        if override is not None:
            self._apply(override)

    def _apply(self, override: Override) -> None:
        self.uid, self.gid = override.uid, override.gid
        file_type = stat.S_IFMT(override.mode) or stat.S_IFMT(self.mode)
        self.mode = file_type | stat.S_IMODE(override.mode)
        if stat.S_ISCHR(file_type) or stat.S_ISBLK(file_type):
            if override.device is not None:
                self.rdev = os.makedev(*override.device)
            self.size = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class Child:
    """One visible name in a merged directory: the layers behind it and its attributes."""

    __slots__ = ("name", "sources", "attr")

    def __init__(self, name: bytes, sources: tuple[int, ...], attr: Attr):
        self.name = name
        self.sources = sources   # layer indexes, top first; several only for a merged directory
        self.attr = attr

    @property
    def in_upper(self) -> bool:
        return self.sources[0] == UPPER

    @property
    def is_merged_dir(self) -> bool:
        return self.attr.is_dir and len(self.sources) > 1


class Node:
    """An inode the kernel knows: where it sits in the tree; its Child says what it is."""

    __slots__ = ("ino", "parent", "child", "others", "lookups", "listing", "lower_names", "unlinked")

    def __init__(self, ino: int, parent: "Node | None", child: Child):
        self.ino = ino
        self.parent = parent
        self.child = child
        self.lookups = 0
        self.listing: dict[bytes, Child] | None = None
        # Names the lower layers show here; removing one of them needs a whiteout.
        # Replaced, never changed in place, so most nodes share the one empty set.
        self.lower_names: set[bytes] | frozenset[bytes] = _NO_NAMES
        self.unlinked = False
        # A hardlinked file is one node under several names; the others wait here
        # so the node still has a path when its first name goes (a list once there are any).
        self.others: list[tuple[Node, Child]] | tuple = ()

    def attach(self, parent: "Node", child: Child) -> None:
        """Record that the kernel reached this node as ``child`` in ``parent``."""
        if self.child is child or self.unlinked:
            self.parent, self.child, self.unlinked = parent, child, False
            return
        for index, (_, other) in enumerate(self.others):
            if other is child:
                self.others[index] = (parent, child)
                return
        self.others = [*self.others, (parent, child)]

    def detach(self, child: Child) -> None:
        """One of the node's names is gone."""
        if self.child is child:
            if self.others:
                self.parent, self.child = self.others.pop()
            else:
                self.unlinked = True
        else:
            self.others = [(parent, other) for parent, other in self.others if other is not child]

    @property
    def name(self) -> bytes:
        return self.child.name

    @property
    def sources(self) -> tuple[int, ...]:
        return self.child.sources

    @property
    def attr(self) -> Attr:
        return self.child.attr

    @property
    def relpath(self) -> bytes:
        """The path below each layer root; computed, so a rename can never leave it stale."""
        parts = []
        node = self
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return b"/".join(reversed(parts))

    @property
    def winner(self) -> int:
        return self.sources[0]

    @property
    def in_upper(self) -> bool:
        return self.child.in_upper

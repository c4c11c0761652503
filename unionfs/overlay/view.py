"""The merged view of a layer stack: the facade over tree, inodes, copy-up and changes.

Whoever serves or inspects a merged view (fuse_ops, diff, provenance) asks
this class, and this class only; the rooms behind it can change freely.
"""

from __future__ import annotations

import errno
import json
import os

from ..layerform import OVERRIDE_XATTR, PID_XATTR, PROVENANCE_XATTR, STACK_XATTR, XATTR_PERMISSIONS
from ..mountopts import ViewOptions
from . import content
from .attributes import AttrChange, AttributeChanges, change_open_file
from .changes import RENAME_EXCHANGE, Changes
from .copyup import CopyUp
from .idmap import Ownership
from .inodes import InodeTable
from .layers import Layer
from .links import LinkCounts
from .merge import DirListing
from .nodes import Attr, Child, Node
from .openfiles import OpenFiles
from .tree import Tree
from .upper import UpperLayer


class MergedView:
    """The layer stack seen as one tree.

    Layer indexes are fixed for the mount's life: 0 is the upper (None on a
    read-only mount), 1 … n the lower layers, top first. ``number`` tags the
    view's inodes (0: the live view, N: the ``/.layers/N`` cut).
    """

    def __init__(self, lowers: list[Layer], upper: UpperLayer | None = None, *, number: int = 0,
                 options: ViewOptions | None = None):
        if not lowers:
            raise ValueError("a merged view needs at least one lower layer")
        self.options = options or ViewOptions()
        self.ownership = Ownership(self.options)
        self.upper = upper
        upper_layer = None
        if upper is not None:
            upper.fsync_copies = not self.options.volatile
            upper.override_xattr = XATTR_PERMISSIONS.get(self.options.xattr_permissions)
            upper_layer = Layer("upper", upper.path, upper.root_fd, upper.override_xattr is not None, True,
                                upper.override_xattr or OVERRIDE_XATTR)
        self.layers: list[Layer | None] = [upper_layer] + list(lowers)
        self.inodes = InodeTable(os.fstat(lowers[-1].root_fd).st_dev, number)
        self.tree = Tree(self.layers, self.inodes)
        self.root = self.tree.root
        self.files = OpenFiles()
        self._copyup = CopyUp(self.tree, upper, self._copied_up)
        self._changes = Changes(self.tree, self._copyup, self.files.free_spare)
        self._attributes = AttributeChanges(self.tree, self._copyup)
        self._links = LinkCounts(self.tree)

    def _copied_up(self, node: Node) -> None:
        if node.attr.is_dir:
            return
        if node.unlinked:     # a deleted file's copy has no name: the fd keeping it reaches it
            self.files.follow_copy_up(node, lambda: self.files.reopen(node, os.O_RDONLY, keep=False))
        else:
            self.files.follow_copy_up(node, lambda: self.open_file(node, os.O_RDONLY))

    @property
    def writable(self) -> bool:
        return self.upper is not None

    def close(self) -> None:
        for layer in self.layers[1:]:
            layer.close()
        if self.upper is not None:
            self.upper.close()

    def stack(self) -> list[Layer]:
        """The layers present, top first."""
        return [layer for layer in self.layers if layer is not None]

    # ---- the kernel's references ---------------------------------------------------
    def node(self, ino: int) -> Node:
        return self.inodes.node(ino)

    def lookup(self, parent: Node, name: bytes) -> Node | None:
        return self.tree.lookup(parent, name)

    def remember(self, parent: Node, child: Child) -> Node:
        return self.tree.remember(parent, child)

    def hold_root(self) -> Node:
        """The kernel reached the root by a name of its own (``/.layers/N``): one more reference."""
        self.root.lookups += 1
        return self.root

    def forget(self, ino: int, count: int) -> bool:
        return self.inodes.forget(ino, count)

    # ---- entries and attributes ---------------------------------------------------------
    def listing(self, node: Node) -> dict[bytes, Child]:
        return self.tree.listing(node)

    def attr(self, node: Node) -> Attr:
        """A node's attributes; a deleted file's live on in what is still open of it."""
        if node.unlinked:
            fd = self.files.any_fd(node)
            if fd is None:
                fd = node.kept_fd
            return Attr(os.fstat(fd)) if fd is not None else node.attr
        return self.tree.attr(node)

    def link_count(self, node: Node, attr: Attr) -> int:
        """st_nlink of a non-directory: the names the merged view has for it (0 once none is left)."""
        if node.unlinked and node.in_upper and self.files.any_fd(node) is None:
            return 0
        return self._links.count(attr, node.winner, unlinked=node.unlinked)

    def child_link_count(self, child: Child) -> int:
        return self._links.count(child.attr, child.sources[0])

    def child_ino(self, parent: Node, child: Child) -> int:
        """A listed child's st_ino, its attributes read afresh first if it lives in the upper."""
        self.tree.refresh(child, parent)
        return self.inodes.ino_for(child.attr)

    # ---- reads --------------------------------------------------------------------------
    def open_file(self, node: Node, flags: int) -> int:
        return content.open_file(self.layers[node.winner], node, flags)

    def readlink(self, node: Node) -> bytes:
        return content.readlink(self.layers[node.winner], node)

    def xattr_names(self, node: Node) -> list[bytes]:
        return content.xattr_names(self.layers[node.winner], node)

    def xattr(self, node: Node, name: bytes) -> bytes:
        """An entry's xattr; three of our own answer questions about the mount."""
        if name == PROVENANCE_XATTR:
            return self.layers[node.winner].name.encode()
        if node is self.root and name == STACK_XATTR:
            return json.dumps([layer.describe() for layer in self.stack()]).encode()
        if node is self.root and name == PID_XATTR:
            return str(os.getpid()).encode()
        return content.xattr(self.layers[node.winner], node, name)

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.stack()[0].path)

    def sync(self) -> None:
        """fsync of a directory: what the upper holds reaches the disk."""
        if self.upper is not None:
            os.fsync(self.upper.root_fd)

    # ---- changes ----------------------------------------------------------------------------
    @property
    def change_lock(self):
        """Held by every change (the FUSE handlers take it); a copy-up's data copy lets go of it."""
        return self._copyup.lock

    async def copy_up(self, node: Node, *, with_data: bool = True) -> None:
        """Bring an entry into the upper before it changes, its data copied in a worker thread.

        Every change that copies up goes through here first, so what it then
        does on the calling thread finds the entry in the upper already.
        """
        await self._copyup.copy_up_in_thread(node, with_data=with_data)
        self._links.names_changed()     # after: a count may be asked while the data is copied

    def create(self, parent: Node, name: bytes, mode: int, flags: int, uid: int, gid: int) -> tuple[Node, int]:
        self._links.names_changed()
        return self._changes.create(parent, name, mode, flags, uid, gid)

    def mkdir(self, parent: Node, name: bytes, mode: int, uid: int, gid: int) -> Node:
        return self._changes.mkdir(parent, name, mode, uid, gid)

    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Node:
        return self._changes.mknod(parent, name, mode, rdev, uid, gid)

    def symlink(self, parent: Node, name: bytes, target: bytes, uid: int, gid: int) -> Node:
        return self._changes.symlink(parent, name, target, uid, gid)

    def link(self, node: Node, new_parent: Node, new_name: bytes) -> Node:
        self._links.names_changed()
        return self._changes.link(node, new_parent, new_name)

    def unlink(self, parent: Node, name: bytes) -> None:
        self._links.names_changed()
        self._changes.unlink(parent, name)

    def rmdir(self, parent: Node, name: bytes) -> None:
        self._changes.rmdir(parent, name)

    async def rename(self, parent: Node, name: bytes, new_parent: Node, new_name: bytes, flags: int) -> None:
        """rename(2) with its flags (RENAME_NOREPLACE, RENAME_EXCHANGE).

        What it moves is first brought wholly into the upper (trees too), the data in worker threads.
        """
        moved = [(parent, name)]
        if flags & RENAME_EXCHANGE:
            moved.append((new_parent, new_name))
        for owner, entry in moved:
            child = self.tree.listing(owner).get(entry)
            if child is not None:
                await self._copyup.copy_up_whole(self.tree.node_of(owner, child))
        self._links.names_changed()
        self._changes.rename(parent, name, new_parent, new_name, flags)

    def set_attributes(self, node: Node, change: AttrChange, open_fd: int | None = None) -> None:
        self._links.names_changed()     # a copy-up moves the file's names into the upper
        self._attributes.set(node, change, open_fd)

    @staticmethod
    def change_open_file(fd: int, change: AttrChange) -> None:
        change_open_file(fd, change)

    def set_xattr(self, node: Node, name: bytes, value: bytes) -> None:
        _named(node)
        self._links.names_changed()
        self._attributes.set_xattr(node, name, value)

    def remove_xattr(self, node: Node, name: bytes) -> None:
        _named(node)
        self._links.names_changed()
        self._attributes.remove_xattr(node, name)

    # ---- for diff and provenance ------------------------------------------------------
    def resolve(self, relpath: bytes) -> tuple[Node | None, Child | None]:
        return self.tree.resolve(relpath)

    def node_of(self, parent: Node, child: Child) -> Node:
        return self.tree.node_of(parent, child)

    def layer_listing(self, index: int, relpath: bytes) -> DirListing | None:
        """One layer's copy of a directory, classified by the very code the merge uses; None where
        it has none (a symlink there too: a layer's symlink is never followed)."""
        try:
            return self.layers[index].listing_of(relpath)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return None
            raise

    def layer_lstat(self, index: int, relpath: bytes) -> os.stat_result | None:
        """lstat of a path in one layer (beneath its root), or None where it has nothing."""
        return self.layers[index].lstat(relpath)


def _named(node: Node) -> None:
    """xattrs are changed by path: a deleted file has none (its old name may be another file now)."""
    if node.unlinked:
        raise OSError(errno.ENOENT, "deleted")

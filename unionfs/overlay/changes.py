"""Namespace changes: create, mkdir, mknod, symlink, link, unlink, rmdir, rename and exchange.

Each goes to the upper first (copying up what it touches), then updates the
cached listings and the nodes, so the merged view never shows what the upper
does not hold. Deleting a name the lower layers show leaves a whiteout.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import Callable

from .. import safepath
from ..layerform import is_marker_name
from .copyup import CopyUp
from .idmap import record_owner
from .nodes import UPPER, Attr, Child, Node
from .tree import Tree, check_name_length
from ..fstree import remove_tree_at
from .upper import times_kept

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class Changes:
    """The namespace changes of one writable view."""

    def __init__(self, tree: Tree, copyup: CopyUp, free_spare_fds: Callable[[], bool]):
        self.tree = tree
        self.copyup = copyup
        self._free_spare_fds = free_spare_fds

    @property
    def upper(self):
        return self.copyup.writable()

    # ---- new entries --------------------------------------------------------------
    def create(self, parent: Node, name: bytes, mode: int, flags: int, uid: int, gid: int) -> tuple[Node, int]:
        with self._new_entry(parent, name) as fd:
            file_fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                              stat.S_IMODE(mode), dir_fd=fd)
            record_owner(file_fd, uid, _new_gid(parent, gid), stat.S_IFREG | stat.S_IMODE(mode),
                         self.upper.override_xattr)
            return self._added(parent, name, fd), file_fd

    def mkdir(self, parent: Node, name: bytes, mode: int, uid: int, gid: int) -> Node:
        with self._new_entry(parent, name) as fd:
            upper = self.upper
            temp = upper.temp_name()
            os.mkdir(temp, 0o700, dir_fd=upper.work_fd)
            with _closing(os.open(temp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=upper.work_fd)) as new_fd:
                if name in parent.lower_names:
                    upper.make_opaque(new_fd)   # a new directory shows nothing of an old one below
                setgid = stat.S_ISGID if parent.attr.mode & stat.S_ISGID else 0
                record_owner(new_fd, uid, _new_gid(parent, gid), stat.S_IFDIR | stat.S_IMODE(mode) | setgid,
                             upper.override_xattr)
            os.rename(temp, name, src_dir_fd=upper.work_fd, dst_dir_fd=fd)
            node = self._added(parent, name, fd)
            node.listing, node.lower_names = {}, set()
            return node

    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Node:
        with self._new_entry(parent, name) as fd:
            os.mknod(name, mode, rdev, dir_fd=fd)
            os.chown(name, uid, _new_gid(parent, gid), dir_fd=fd, follow_symlinks=False)
            return self._added(parent, name, fd)

    def symlink(self, parent: Node, name: bytes, target: bytes, uid: int, gid: int) -> Node:
        with self._new_entry(parent, name) as fd:
            os.symlink(target, name, dir_fd=fd)
            os.chown(name, uid, _new_gid(parent, gid), dir_fd=fd, follow_symlinks=False)
            return self._added(parent, name, fd)

    def link(self, node: Node, new_parent: Node, new_name: bytes) -> Node:
        self.copyup.copy_up(node)
        with self._new_entry(new_parent, new_name) as fd:
            with _closing(self.copyup.upper_dir_fd(node.parent)) as source_fd:
                os.link(node.name, new_name, src_dir_fd=source_fd, dst_dir_fd=fd, follow_symlinks=False)
            return self._added(new_parent, new_name, fd)

    @contextlib.contextmanager
    def _new_entry(self, parent: Node, name: bytes):
        """The parent's upper dir fd, ready for a new ``name`` (no whiteout left in the way)."""
        _check_name(name)
        if name in self.tree.listing(parent):
            raise OSError(errno.EEXIST, "exists")
        with _closing(self.copyup.upper_dir_fd(parent)) as fd:
            self.upper.remove_whiteout(fd, name)
            yield fd

    def _added(self, parent: Node, name: bytes, dir_fd: int) -> Node:
        child = Child(name, (UPPER,), Attr(os.stat(name, dir_fd=dir_fd, follow_symlinks=False)))
        self.tree.listing(parent)[name] = child
        return self.tree.remember(parent, child)

    # ---- removals -------------------------------------------------------------------
    def unlink(self, parent: Node, name: bytes) -> None:
        child = self._existing(parent, name)
        if child.attr.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        self._remove(parent, child)

    def rmdir(self, parent: Node, name: bytes) -> None:
        child = self._existing(parent, name)
        if not child.attr.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if self.tree.listing(self.tree.node_of(parent, child)):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
        self._remove(parent, child)

    def _existing(self, parent: Node, name: bytes) -> Child:
        check_name_length(name)
        child = self.tree.listing(parent).get(name)
        if child is None:
            raise OSError(errno.ENOENT, "no such entry")
        return child

    def _remove(self, parent: Node, child: Child) -> None:
        """Drop an entry: its upper copy goes, and a whiteout hides any lower one."""
        self.tree.refresh(child, parent)   # its link count now says whether this is its last name
        with _closing(self.copyup.upper_dir_fd(parent)) as fd:
            if child.in_upper:
                self._keep_if_held(fd, child)
                remove_tree_at(fd, child.name)
            if child.name in parent.lower_names:
                self.upper.make_whiteout(fd, child.name)
        del self.tree.listing(parent)[child.name]
        self._orphan(child)

    def _keep_if_held(self, dir_fd: int, child: Child) -> None:
        """Before an upper entry loses a name: read its link count afresh (a hardlink partner
        may have gone since the listing was built), and if this is a file's last name while
        the kernel still holds its inode, keep the file alive by an fd until FORGET, as a
        local filesystem keeps an unlinked inode (a /proc/self/fd reopen reaches it).
        The fd also keeps the host from handing its inode number to a new file. Out of fds,
        the file goes at once (its number retired) rather than the removal failing."""
        st = os.stat(child.name, dir_fd=dir_fd, follow_symlinks=False)
        child.attr = Attr(st, self.tree.layers[UPPER].override(dir_fd, child.name, st))
        node = self.tree.inodes.known(child.attr)
        if (node is not None and node.lookups > 0 and node.kept_fd is None
                and stat.S_ISREG(child.attr.mode) and child.attr.nlink <= 1):
            for last_try in (False, True):
                try:
                    node.kept_fd = os.open(child.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                    break
                except OSError as exc:
                    # Cached fds go first: without OPEN this fd may be all that reaches the file.
                    if exc.errno not in (errno.EMFILE, errno.ENFILE):
                        raise
                    if last_try or not self._free_spare_fds():
                        break

    def _orphan(self, child: Child) -> None:
        """A name is gone: its node loses it, and a host inode gone with its last name is retired."""
        inodes = self.tree.inodes
        node = inodes.known(child.attr)
        if node is not None:
            node.detach(child)
        kept = node is not None and node.kept_fd is not None
        if child.in_upper and not kept and (child.attr.is_dir or child.attr.nlink <= 1):
            inodes.retire(child.attr)   # a kept file's number is retired when its fd goes, at FORGET

    # ---- renames ------------------------------------------------------------------------
    def rename(self, parent: Node, name: bytes, new_parent: Node, new_name: bytes, flags: int) -> None:
        source = self._existing(parent, name)
        _check_name(new_name)
        target = self.tree.listing(new_parent).get(new_name)
        if flags & RENAME_EXCHANGE:
            if target is None:
                raise OSError(errno.ENOENT, "no such entry")
            self._exchange(parent, source, new_parent, target)
        elif target is None or self._may_replace(source, new_parent, target, flags):
            self._move(parent, source, new_parent, new_name, target)

    def _may_replace(self, source: Child, new_parent: Node, target: Child, flags: int) -> bool:
        """Whether ``source`` may replace ``target``; False when rename(2) has nothing to do."""
        inodes = self.tree.inodes
        if flags & RENAME_NOREPLACE:
            raise OSError(errno.EEXIST, "exists")
        if target is source or inodes.ino_for(target.attr) == inodes.ino_for(source.attr):
            return False  # hardlinks of one file: rename(2) does nothing
        if source.attr.is_dir and not target.attr.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if not source.attr.is_dir and target.attr.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        if target.attr.is_dir and self.tree.listing(self.tree.node_of(new_parent, target)):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
        return True

    def _move(self, parent: Node, source: Child, new_parent: Node, new_name: bytes, target: Child | None) -> None:
        name = source.name
        self.copyup.check_whole(self.tree.node_of(parent, source))
        if target is not None:
            self.tree.refresh(target, new_parent)   # its link count now says whether this is its last name
        upper = self.upper
        with _closing(self.copyup.upper_dir_fd(parent)) as old_fd, \
                _closing(self.copyup.upper_dir_fd(new_parent)) as new_fd:
            if target is not None and target.in_upper:
                self._keep_if_held(new_fd, target)
                if target.attr.is_dir:
                    with _closing(_open_child_dir(new_fd, new_name)) as emptied:
                        upper.clear_markers(emptied)
            upper.remove_whiteout(new_fd, new_name)
            if source.attr.is_dir and new_name in new_parent.lower_names:
                self._make_opaque(old_fd, name)   # before the move, so a failure leaves nothing half done
            if name in parent.lower_names and not (parent is new_parent and name == new_name):
                upper.rename_leaving_whiteout(old_fd, name, new_fd, new_name)
            else:
                os.rename(name, new_name, src_dir_fd=old_fd, dst_dir_fd=new_fd)
        del self.tree.listing(parent)[name]
        if target is not None:
            self._orphan(target)
        self._moved(source, new_parent, new_name)

    def _exchange(self, parent: Node, first: Child, new_parent: Node, second: Child) -> None:
        for owner, child in ((parent, first), (new_parent, second)):
            self.copyup.check_whole(self.tree.node_of(owner, child))
        with _closing(self.copyup.upper_dir_fd(parent)) as old_fd, \
                _closing(self.copyup.upper_dir_fd(new_parent)) as new_fd:
            safepath.rename_exchange(old_fd, first.name, new_fd, second.name)
            for fd, name, owner in ((new_fd, second.name, new_parent), (old_fd, first.name, parent)):
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) and name in owner.lower_names:
                    self._make_opaque(fd, name)
        first_name, second_name = first.name, second.name
        self._moved(first, new_parent, second_name)
        self._moved(second, parent, first_name)

    def _moved(self, child: Child, new_parent: Node, new_name: bytes) -> None:
        """A child now lives at ``new_name`` in ``new_parent``, in the upper; its node follows."""
        child.name, child.sources = new_name, (UPPER,)
        self.tree.listing(new_parent)[new_name] = child
        node = self.tree.inodes.known(child.attr)
        if node is not None:
            node.attach(new_parent, child)
        self.tree.refresh(child, new_parent)

    def _make_opaque(self, dir_fd: int, name: bytes) -> None:
        with _closing(_open_child_dir(dir_fd, name)) as fd, times_kept(fd):
            self.upper.make_opaque(fd)


def _check_name(name: bytes) -> None:
    check_name_length(name)
    if is_marker_name(name):
        raise OSError(errno.EINVAL, "names starting with .wh. are reserved for whiteouts")


def _new_gid(parent: Node, gid: int) -> int:
    """Files in a setgid directory take its group, as on any Unix filesystem."""
    return parent.attr.gid if parent.attr.mode & stat.S_ISGID else gid


def _open_child_dir(dir_fd: int, name: bytes) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


@contextlib.contextmanager
def _closing(fd: int):
    """An fd closed at the end of the block, whatever happens in it."""
    try:
        yield fd
    finally:
        os.close(fd)

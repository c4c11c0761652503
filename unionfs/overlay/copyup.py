"""Copy-up: bringing a lower entry into the upper before it changes, atomically, keeping its st_ino.

A file is copied in the upper's work directory and renamed into place, so a
crash leaves the old lower file or the complete copy, never half of one; the
data copy of a large file may run in a worker thread meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import Callable

import trio

from .layers import ParentFd, paths_of_inode, regular_file
from .nodes import UPPER, Attr, Node
from .tree import Tree
from .upper import StagedCopy, UpperLayer, read_xattrs, times_kept

# Copy-ups of files this large copy their data in a worker thread.
THREADED_COPY_SIZE = 1 << 20


class CopyUp:
    """The copy-ups of one writable view (on a read-only one every change is EROFS)."""

    def __init__(self, tree: Tree, upper: UpperLayer | None, copied_up: Callable[[Node], None]):
        self.tree = tree
        self.upper = upper
        self._copied_up = copied_up       # told of every entry that now lives in the upper

    def writable(self) -> UpperLayer:
        if self.upper is None:
            raise OSError(errno.EROFS, "read-only file system")
        return self.upper

    def _lower_fd(self, node: Node) -> ParentFd:
        return ParentFd(self.tree.layers[node.winner], node.relpath)

    # ---- directories ------------------------------------------------------------
    def upper_dir_fd(self, node: Node) -> int:
        """An fd of ``node``'s directory in the upper, copying it (and its parents) up first."""
        self.copy_up_dir(node)
        return self.writable().open_dir(node.relpath)

    def copy_up_dir(self, node: Node) -> None:
        """Make a directory (and every missing parent, outermost first) exist in the upper."""
        missing = []
        while not node.in_upper:
            missing.append(node)
            node = node.parent
        upper = self.writable() if missing else None
        for directory in reversed(missing):
            with self._lower_fd(directory) as (lower_fd, name):
                xattrs = read_xattrs(lower_fd, name)
            parent_fd = upper.open_dir(directory.parent.relpath)
            try:
                with times_kept(parent_fd):
                    upper.make_dir_like(parent_fd, directory.name, directory.attr, xattrs)
            finally:
                os.close(parent_fd)
            self._became_upper(directory, (UPPER,) + directory.sources)

    def copy_up_tree(self, node: Node) -> None:
        """Everything below a directory into the upper: the price of renaming a lower directory.

        A loop with its own stack, so a tree of any depth can be moved.
        """
        pending, copied = [node], []
        while pending:
            directory = pending.pop()
            self.copy_up_dir(directory)
            copied.append(directory)
            for child in list(self.tree.listing(directory).values()):
                child_node = self.tree.node_of(directory, child)
                if child.attr.is_dir:
                    pending.append(child_node)
                else:
                    self.copy_up(child_node)
        for directory in copied:
            # Each directory now holds all it shows: nothing below may add to it.
            fd = self.writable().open_dir(directory.relpath)
            try:
                with times_kept(fd):
                    self.upper.make_opaque(fd)
            finally:
                os.close(fd)
            directory.child.sources = (UPPER,)
            directory.lower_names = set()

    def copy_up_whole(self, node: Node) -> None:
        """What a rename moves must live wholly in the upper (kernel overlayfs says EXDEV instead)."""
        if not node.attr.is_dir:
            self.copy_up(node)
        elif node.child.is_merged_dir or not node.in_upper:
            self.copy_up_tree(node)

    # ---- files -----------------------------------------------------------------------
    def copy_up(self, node: Node, *, with_data: bool = True) -> None:
        """Bring a non-directory into the upper, atomically, keeping its st_ino."""
        staged = self.stage(node, with_data=with_data)
        if staged is not None:
            with _discarded_on_failure(staged):
                staged.run()
            self.finish(node, staged)

    async def copy_up_in_thread(self, node: Node, *, with_data: bool = True) -> None:
        """``copy_up``, with the data of a large file copied in a worker thread (the view is not
        touched there, only the copy's two fds)."""
        staged = self.stage(node, with_data=with_data)
        if staged is not None:
            with _discarded_on_failure(staged):
                if staged.size >= THREADED_COPY_SIZE:
                    await trio.to_thread.run_sync(staged.run)
                else:
                    staged.run()
            self.finish(node, staged)

    def stage(self, node: Node, *, with_data: bool = True) -> StagedCopy | None:
        """First half of a copy-up: parents made, the copy started in the work dir.

        Returns None when nothing is left to do: already in the upper, or a
        symlink or special file, which is created whole at once.
        """
        if node.in_upper:
            return None
        upper = self.writable()
        self.copy_up_dir(node.parent)
        with self._lower_fd(node) as (lower_fd, name):
            xattrs = read_xattrs(lower_fd, name)
            served = node.attr   # owner and mode as served, override xattrs applied
            if stat.S_ISREG(served.mode):
                data_fd = regular_file(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                                               dir_fd=lower_fd))
                try:
                    return upper.stage_file(data_fd, served, xattrs, with_data=with_data)
                except BaseException:
                    os.close(data_fd)
                    raise
            target = os.readlink(name, dir_fd=lower_fd) if stat.S_ISLNK(served.mode) else None
        parent_fd = upper.open_dir(node.parent.relpath)
        try:
            with times_kept(parent_fd):
                upper.copy_special_in(parent_fd, node.name, served, target, xattrs)
        finally:
            os.close(parent_fd)
        self._became_upper(node, (UPPER,))
        return None

    def finish(self, node: Node, staged: StagedCopy) -> None:
        """Second half: rename the complete copy into the node's place (wherever that is now)."""
        if node.in_upper or node.unlinked:
            staged.discard()
            return
        parent_fd = self.upper_dir_fd(node.parent)
        try:
            with times_kept(parent_fd):
                staged.publish(parent_fd, node.name)
        finally:
            os.close(parent_fd)
        lower, lower_index = node.attr, node.winner
        self._became_upper(node, (UPPER,))
        if lower.nlink > 1:
            self._copy_up_other_names(node, lower, lower_index)

    def _copy_up_other_names(self, node: Node, lower: Attr, layer_index: int) -> None:
        """Hardlinks stay hardlinks: every merged name of the same lower file is linked to the copy.

        Kernel overlayfs needs index=on for this; here the layer is searched for
        the file's other names once, at its copy-up, so the upper itself records
        the links and a remount or a commit keeps them.
        """
        for relpath in paths_of_inode(self.tree.layers[layer_index], lower.host_ino):
            if relpath == node.relpath:
                continue
            parent, child = self.tree.resolve(relpath)
            if child is None or child.in_upper or child.sources[0] != layer_index:
                continue
            if (child.attr.host_dev, child.attr.host_ino) != (lower.host_dev, lower.host_ino):
                continue
            source_fd, source_name = self.upper_path_of(node)
            try:
                dest_fd = self.upper_dir_fd(parent)
                try:
                    with times_kept(dest_fd):
                        os.link(source_name, child.name, src_dir_fd=source_fd, dst_dir_fd=dest_fd,
                                follow_symlinks=False)
                finally:
                    os.close(dest_fd)
            finally:
                os.close(source_fd)
            child.sources = (UPPER,)
            self.tree.refresh(child, parent)

    def upper_path_of(self, node: Node) -> tuple[int, bytes]:
        """(upper parent dir fd, name) of a node, copying it up first; caller closes the fd."""
        if node.attr.is_dir:
            self.copy_up_dir(node)
        else:
            self.copy_up(node)
        if node.parent is None:
            return os.dup(self.upper.root_fd), b"."
        return self.upper.open_dir(node.parent.relpath), node.name

    def _became_upper(self, node: Node, sources: tuple[int, ...]) -> None:
        old = node.attr
        node.child.sources = sources
        self.tree.refresh(node.child, node.parent)
        self.tree.inodes.keep(old, node.attr)
        self._copied_up(node)


@contextlib.contextmanager
def _discarded_on_failure(staged: StagedCopy):
    """A copy that fails half way leaves nothing behind in the work dir."""
    try:
        yield
    except BaseException:
        staged.discard()
        raise

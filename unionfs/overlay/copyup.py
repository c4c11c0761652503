"""Copy-up: bringing a lower entry into the upper before it changes, atomically, keeping its st_ino.

A file is copied in the upper's work directory and renamed into place, so a
crash leaves the old lower file or the complete copy, never half of one.

Who waits for a copy-up: its data is copied in a worker thread, whatever change
asked for it. Meanwhile reads of every inode are served and so are changes to
other inodes (the change lock is let go); changes to the same inode, under any
of its names, wait until the copy is in place. Renaming a lower directory
copies its tree holding the change lock (other changes wait, reads go on),
after the copies already in flight have finished.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import Callable

import trio

from .layers import ParentFd, paths_of_inode, regular_file
from .nodes import UPPER, Attr, Child, Node
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
        # Held by every change to the view (the FUSE handlers take it); a data copy lets go of it.
        self.lock = trio.Lock()
        self._in_flight: dict[int, trio.Event] = {}    # inode -> set when its copy-up is over

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

    async def copy_up_tree(self, node: Node) -> None:
        """Everything below a directory into the upper: the price of renaming a lower directory.

        A loop with its own stack, so a tree of any depth can be moved. The lock is
        kept throughout (after the copies in flight are done), so the tree cannot
        change under the walk; the data still goes to worker threads.
        """
        await self._no_copy_in_flight()
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
                    await self._copy_up_file(child_node, True, others_may_change=False)
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

    async def copy_up_whole(self, node: Node) -> None:
        """What a rename moves must live wholly in the upper (kernel overlayfs says EXDEV instead)."""
        if not node.attr.is_dir:
            await self.copy_up_in_thread(node)
        elif node.child.is_merged_dir or not node.in_upper:
            await self.copy_up_tree(node)

    @staticmethod
    def check_whole(node: Node) -> None:
        """A rename moves only what ``copy_up_whole`` brought up (the FUSE handler awaits it first):
        never a copy on the thread that serves the mount; EXDEV (mv then copies) if that was missed."""
        if not node.in_upper or node.child.is_merged_dir:
            raise OSError(errno.EXDEV, "not copied up before its rename")

    # ---- files -----------------------------------------------------------------------
    def copy_up(self, node: Node, *, with_data: bool = True) -> None:
        """Bring a non-directory into the upper on the calling thread: for what ``copy_up_in_thread``
        already brought up (then it does nothing) and for copies without data."""
        staged = self.stage(node, with_data=with_data)
        if staged is not None:
            with _discarded_on_failure(staged):
                staged.run()
                lower = node.attr
                others = paths_of_inode(self.tree.layers[node.winner], lower.host_ino) if lower.nlink > 1 else []
            self.finish(node, staged, others)

    async def copy_up_in_thread(self, node: Node, *, with_data: bool = True) -> None:
        """Bring an entry into the upper before it changes, its data copied in a worker thread.

        ENOENT if the entry was deleted meanwhile: nothing of it reaches the upper.
        """
        if node.attr.is_dir:
            self.copy_up_dir(node)
            return
        while (copying := self._in_flight.get(node.ino)) is not None:
            async with self._others_may_change():
                await copying.wait()
        if node.unlinked and not node.in_upper and not await self._named_again(node):
            await self._copy_up_deleted(node)
            return
        await self._copy_up_file(node, with_data, others_may_change=True)
        if node.unlinked and not node.in_upper:
            raise OSError(errno.ENOENT, "deleted while it was copied up")

    async def _copy_up_file(self, node: Node, with_data: bool, *, others_may_change: bool) -> None:
        staged = self.stage(node, with_data=with_data)
        if staged is None:
            return
        copying = self._in_flight[node.ino] = trio.Event()
        try:
            with _discarded_on_failure(staged):
                layer, host_ino = self.tree.layers[node.winner], staged.served.host_ino
                hardlinked = staged.served.nlink > 1

                def work() -> list[bytes]:
                    # Only the copy's fds and the (unchanging) lower layer are touched here.
                    staged.run()
                    return paths_of_inode(layer, host_ino) if hardlinked else []
                if staged.size < THREADED_COPY_SIZE and not hardlinked:
                    others = work()
                elif others_may_change:
                    async with self._others_may_change():
                        others = await trio.to_thread.run_sync(work)
                else:
                    others = await trio.to_thread.run_sync(work)
                self.finish(node, staged, others)
        finally:
            del self._in_flight[node.ino]
            copying.set()

    async def _named_again(self, node: Node) -> bool:
        """A hardlinked lower file whose name went may still have others the kernel never looked
        up: then it lives on under one of them (and its copy-up links them all), not as deleted."""
        lower = node.attr
        if lower.nlink <= 1 or not stat.S_ISREG(lower.mode):
            return False
        layer = self.tree.layers[node.winner]
        paths = await trio.to_thread.run_sync(paths_of_inode, layer, lower.host_ino)   # a walk of the layer
        if not node.unlinked:            # looked up under another name meanwhile
            return True
        others = self._other_names(node, paths, lower, node.winner)
        if not others:
            return False
        node.attach(*others[0])
        return True

    async def _copy_up_deleted(self, node: Node) -> None:
        """A lower file deleted while still open changes through what holds it: like kernel
        overlayfs, it gets a copy of its own with no name (the layer's file, shared with every
        image built on the layer, is never written), kept until the kernel forgets the inode."""
        if not stat.S_ISREG(node.attr.mode):
            raise OSError(errno.ENOENT, "deleted")
        upper = self.writable()
        staged = self.stage(node)
        copying = self._in_flight[node.ino] = trio.Event()
        try:
            with _discarded_on_failure(staged):
                async with self._others_may_change():
                    await trio.to_thread.run_sync(staged.run)
                fd = os.open(staged.temp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=upper.work_fd)
            staged.discard()          # its name goes: the fd is all there is of the copy
        finally:
            del self._in_flight[node.ino]
            copying.set()
        old = node.attr
        st = os.fstat(fd)
        node.kept_fd = fd
        node.child = Child(node.name, (UPPER,), Attr(st, self.tree.layers[UPPER].override(fd, b"", st)))
        self.tree.inodes.keep(old, node.attr)
        self._copied_up(node)

    @contextlib.asynccontextmanager
    async def _others_may_change(self):
        """Let go of the change lock for a while (if this task holds it), and take it back."""
        holding = self.lock.statistics().owner is trio.lowlevel.current_task()
        if holding:
            self.lock.release()
        try:
            yield
        finally:
            if holding:
                with trio.CancelScope(shield=True):
                    await self.lock.acquire()

    async def _no_copy_in_flight(self) -> None:
        """Wait until every file copy in flight is in place (none starts while we hold the lock)."""
        while self._in_flight:
            copying = next(iter(self._in_flight.values()))
            async with self._others_may_change():
                await copying.wait()

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

    def finish(self, node: Node, staged: StagedCopy, other_paths: list[bytes]) -> None:
        """Second half: put the complete copy in the node's place (wherever that is now).

        Hardlinks stay hardlinks: every other merged name of the same lower file
        is linked to the copy too, all names or none (a failure half way, EMFILE
        say, must not leave one name in the upper and another on the old data).
        Kernel overlayfs needs index=on for this; here the upper itself records
        the links, so a remount or a commit keeps them.
        """
        if node.in_upper or node.unlinked:
            staged.discard()
            return
        lower, lower_index = node.attr, node.winner
        others = self._other_names(node, other_paths, lower, lower_index)
        dir_fds: dict[int, int] = {}
        try:
            parent_fd = self.upper_dir_fd(node.parent)
            dir_fds[id(node.parent)] = parent_fd
            links = []
            for parent, child in others:
                if id(parent) not in dir_fds:
                    dir_fds[id(parent)] = self.upper_dir_fd(parent)
                links.append((dir_fds[id(parent)], child.name))
            with contextlib.ExitStack() as kept:     # bookkeeping: every directory keeps its times
                for fd in dir_fds.values():
                    kept.enter_context(times_kept(fd))
                staged.publish(parent_fd, node.name, links)
        finally:
            for fd in dir_fds.values():
                os.close(fd)
        for _, child in others:
            child.sources = (UPPER,)      # first: what follows may fail, the disk already says so
        self._became_upper(node, (UPPER,))
        for parent, child in others:
            self.tree.refresh(child, parent)

    def _other_names(self, node: Node, paths: list[bytes], lower: Attr, layer_index: int) -> list[tuple[Node, Child]]:
        """The merged names among ``paths``, but the node's own, that still show this very lower file."""
        found = []
        for relpath in paths:
            parent, child = self.tree.resolve(relpath)
            if child is None or child is node.child or child.in_upper or child.sources[0] != layer_index:
                continue
            if (child.attr.host_dev, child.attr.host_ino) != (lower.host_dev, lower.host_ino):
                continue
            found.append((parent, child))
        return found

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

"""pyfuse3 handlers over the merged view: entries, the open-file table, errno mapping, nothing else.

This is the only place where OSError becomes FUSEError: every handler runs
inside ``_fuse_boundary``, which also turns any unexpected exception into EIO
for that one request (logged) instead of ending the daemon. What a handler
does to the filesystem, the view does; which view owns an inode (the live
one or a ``/.layers`` cut), the router says.
"""

from __future__ import annotations

import errno
import functools
import gc
import inspect
import logging
import os
import time
from typing import NamedTuple

import pyfuse3
import trio

from .layerform import STACK_XATTR
from .overlay import Attr, AttrChange, Child, InodeFds, MergedView, Node, ViewRouter

log = logging.getLogger("layermount")

# Lower layers never change: the kernel may keep what it learnt about them for a day.
LOWER_TIMEOUT = 86400.0
# Upper entries change only through this mount, so the kernel's own updates keep it
# right; a short attribute timeout is a cheap safety net.
UPPER_ATTR_TIMEOUT = 1.0
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
# What the kernel's open flags may carry through to the layer file; the rest (FMODE_EXEC,
# O_LARGEFILE, O_CREAT ...) is the kernel's business, and openat2 refuses bits it does not know.
# Shown only to root and the mount's owner: trusted.* is root's business (the kernel already
# refuses to read it for others, but not to list it), and the stack names store paths.
OWNER_ONLY_XATTR_PREFIXES = (b"trusted.", STACK_XATTR)
PASSED_FLAGS = os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC | os.O_DIRECT | os.O_NOATIME


def _fuse_boundary(handler):
    """A handler that never waits may be a plain function: it then runs in the boundary's own
    coroutine rather than in a second one awaited by it (a cold lookup is that much cheaper).
    pyfuse3 passes every argument by position, so no keyword dict is made per request."""
    if inspect.iscoroutinefunction(handler):
        @functools.wraps(handler)
        async def boundary(*args):
            try:
                return await handler(*args)
            except Exception as exc:
                raise _fuse_error(exc, handler) from None
    else:
        @functools.wraps(handler)
        async def boundary(*args):
            try:
                return handler(*args)
            except Exception as exc:
                raise _fuse_error(exc, handler) from None
    return boundary


def _fuse_error(exc: Exception, handler) -> pyfuse3.FUSEError:
    """What the kernel is told of a failed request; anything but an OSError is a bug, logged (EIO)."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    if isinstance(exc, OSError):
        return pyfuse3.FUSEError(exc.errno or errno.EIO)
    log.exception("internal error in %s", handler.__name__)
    return pyfuse3.FUSEError(errno.EIO)


def _change(handler):
    """A change to the merged view, inside the FUSE boundary. Changes happen one at a time, so a
    copy-up may wait on a worker thread without another change slipping in; reads go on meanwhile."""
    @functools.wraps(handler)
    async def locked(self, *args, **kwargs):
        async with self._mutation:
            return await handler(self, *args, **kwargs)
    return _fuse_boundary(locked)


class _DirHandle(NamedTuple):
    """A snapshot of a listing taken at opendir, so offsets stay stable while reading."""

    view: MergedView | None     # None for /.layers itself
    node: Node | None
    entries: list[Child]


# Seconds without a write after which a writable fd kept by inode is closed (InodeFds).
WRITER_IDLE = 1.0
# patches/pyfuse3-noopen.patch: no OPEN/OPENDIR (pyfuse3 answers them ENOSYS), inodes in place of handles.
NO_OPEN = hasattr(pyfuse3.Operations, "enable_no_open")


class _Entries:
    """The attributes the kernel is given for an inode, and how long it may keep them."""

    def __init__(self, views: ViewRouter):
        self.views = views
        self.ownership = views.live.ownership   # one mapping for the live view and its cuts
        self._shown = None if self.ownership.identity else self.ownership.shown   # None: ids as stored

    def of_attr(self, ino: int, attr: Attr, merged_dir: bool, in_upper: bool) -> pyfuse3.EntryAttributes:
        """``in_upper``: the upper supplies the entry (by the node, never by st_dev: the store and
        the upper usually share one filesystem, and a lower entry must still be cached for long)."""
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = ino                 # generation 0 and st_blksize 4096 are pyfuse3's defaults
        entry.entry_timeout = LOWER_TIMEOUT
        entry.attr_timeout = UPPER_ATTR_TIMEOUT if in_upper else LOWER_TIMEOUT
        entry.st_mode = attr.mode
        # Like kernel overlayfs: a merged directory's link count is not knowable
        # without listing every layer, so it reports 1 (find copes with that).
        entry.st_nlink = 1 if merged_dir else attr.nlink
        if self._shown is None:
            entry.st_uid = attr.uid
            entry.st_gid = attr.gid
        else:
            entry.st_uid, entry.st_gid = self._shown(attr.uid, attr.gid)
        entry.st_rdev = attr.rdev
        entry.st_size = attr.size
        entry.st_blocks = attr.blocks
        entry.st_atime_ns = attr.atime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.ctime_ns
        return entry

    def of_node(self, view: MergedView, node: Node) -> pyfuse3.EntryAttributes:
        if node.unlinked:
            attr = view.attr(node)     # deleted but still open: its size and times live on in the fd
            entry = self.of_attr(node.ino, attr, False, True)
            entry.st_nlink = view.link_count(node, attr)
            return entry
        child = node.child
        if child.in_upper:
            attr = view.attr(node)
            return self.of_attr(node.ino, attr, attr.is_dir and len(child.sources) > 1, True)
        return self.of_child(view, node.ino, child)

    def of_child(self, view: MergedView, ino: int, child: Child) -> pyfuse3.EntryAttributes:
        """Built afresh each time: kept per entry, the replies were a third of the daemon's memory
        after a walk, and building one costs less than the request that carries it. (The Child's
        properties are spelt out here: this runs once per lookup and per readdirplus entry.)"""
        attr, sources, in_upper = child.attr, child.sources, child.in_upper
        entry = self.of_attr(ino, attr, len(sources) > 1 and attr.is_dir, in_upper)
        if attr.nlink > 1 and not in_upper and not attr.is_dir:
            entry.st_nlink = view.child_link_count(child)    # its names may go, in this view or a layer
        return entry

    def virtual(self, inode: int) -> pyfuse3.EntryAttributes:
        """/.layers itself (a directory) and its short-digest aliases (symlinks)."""
        live = self.views.live
        entry = self.of_attr(inode, live.root.attr, False, live.writable)
        entry.st_mode, entry.st_nlink, entry.st_size = self.views.virtual_shape(inode)
        entry.st_uid = entry.st_gid = 0
        return entry

    def found(self, found: int | MergedView) -> pyfuse3.EntryAttributes:
        """An entry of /.layers: an alias inode, or a cut shown by its root."""
        if isinstance(found, int):
            return self.virtual(found)
        return self.of_node(found, found.root)


# After mount.py's gc.freeze only what the kernel holds is tracked: a full collection costs little
# beside the 10,000 FORGETs that lead to it.
FORGETS_PER_COLLECTION = 10_000


class LayerOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False
    enable_no_open = NO_OPEN

    def __init__(self, view: MergedView, layers_dir: bool = True):
        super().__init__()
        self.view = view
        self.views = ViewRouter(view, layers_dir)
        self._dir_handles: dict[int, _DirHandle] = {}
        self._next_dir_handle = 1
        self._files = view.files
        self._entries = _Entries(self.views)
        self._mutation = view.change_lock
        self._forgotten = 0
        # No handles (patches/pyfuse3-noopen.patch): the kernel sends no OPEN, OPENDIR, RELEASE or
        # RELEASEDIR and caches data and listings by itself; files are served by inode.
        self.no_open = NO_OPEN
        self._inode_fds = InodeFds(self._files, self._open_by_inode)
        self._listings: dict[int, list[Child]] = {}
        self._watching_writers = False

    def close(self) -> None:
        self._inode_fds.close()
        self.views.close()

    # ---- lookups ---------------------------------------------------------
    @_fuse_boundary
    def lookup(self, parent_inode, name, ctx=None):
        if self.views.is_virtual(parent_inode):
            return self._entries.found(self.views.lookup_virtual(parent_inode, name))
        view, parent = self.views.locate(parent_inode)
        node = view.lookup(parent, name)
        if node is not None:
            return self._entries.of_node(view, node)
        layers_dir = self.views.layers_dir_at(parent, name)
        if layers_dir is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._entries.virtual(layers_dir)

    async def forget(self, inode_list):
        for ino, count in inode_list:
            if self.views.forget(ino, count) and self.no_open:
                self._inode_fds.forget(ino)
                self._listings.pop(ino, None)
        self._forgotten += len(inode_list)
        if self._forgotten >= FORGETS_PER_COLLECTION:
            self._forgotten = 0
            # The forgotten nodes are freed at once, but pymalloc keeps their arenas while the
            # interpreter's free lists pin a few objects in each; only a full collection empties
            # those lists. Without it a daemon that was walked once keeps its peak memory for
            # good (74 MB after 100,000 entries were forgotten, against 41 MB with it).
            gc.collect()

    @_fuse_boundary
    def getattr(self, inode, ctx=None):
        if self.views.is_virtual(inode):
            return self._entries.virtual(inode)
        return self._entries.of_node(*self.views.locate(inode))

    @_fuse_boundary
    def readlink(self, inode, ctx):
        if self.views.is_virtual(inode):
            return self.views.alias_target(inode)
        view, node = self.views.locate(inode)
        return view.readlink(node)

    # ---- directories -----------------------------------------------------
    @_fuse_boundary
    def opendir(self, inode, ctx):
        if self.views.is_layers_dir(inode):
            handle = _DirHandle(None, None, [])
        else:
            view, node = self.views.locate(inode)
            handle = _DirHandle(view, node, list(view.listing(node).values()))
        number = self._next_dir_handle
        self._next_dir_handle += 1
        self._dir_handles[number] = handle
        return number

    @_fuse_boundary
    def readdir(self, fh, start_id, token):
        handle = self._by_inode_dir(fh, start_id) if self.no_open else self._dir_handles[fh]
        if handle.view is None:
            return self._readdir_layers(start_id, token)
        view, node = handle.view, handle.node
        # Offsets: 1 is ".", 2 is "..", 3+i is entries[i].
        if start_id < 1:
            if not pyfuse3.readdir_reply(token, b".", self._entries.of_node(view, node), 1):
                return
        if start_id < 2:
            if not pyfuse3.readdir_reply(token, b"..", self._entries.of_node(view, node.parent or node), 2):
                return
        entries = handle.entries
        current = view.listing(node)
        for index in range(max(start_id - 2, 0), len(entries)):
            child = entries[index]
            if current.get(child.name) is not child:
                continue   # removed or replaced since opendir: never hand the kernel a dead entry
            attr = self._entries.of_child(view, view.child_ino(node, child), child)
            if not pyfuse3.readdir_reply(token, child.name, attr, index + 3):
                return
            view.remember(node, child)

    def _by_inode_dir(self, inode: int, start_id: int) -> _DirHandle:
        """No OPENDIR, so no snapshot per reader: one list per directory, only ever appended to
        (what is removed stays as a gap that readdir skips), so a reader's offsets stay right
        however its reads and changes interleave. A reader starting at 0 brings it up to date."""
        if self.views.is_layers_dir(inode):
            return _DirHandle(None, None, [])
        view, node = self.views.locate(inode)
        entries = self._listings.get(inode)
        if entries is None:
            entries = self._listings[inode] = list(view.listing(node).values())
        elif start_id == 0 and view.writable:
            current = view.listing(node)
            live = {id(child) for child in entries if current.get(child.name) is child}
            if len(live) != len(current):
                entries.extend(child for child in current.values() if id(child) not in live)
            if len(entries) > 2 * len(current) + 64:    # mostly gaps: start afresh (rare churn)
                entries = self._listings[inode] = list(current.values())
        return _DirHandle(view, node, entries)

    def _readdir_layers(self, start_id: int, token) -> None:
        """/.layers lists 1 … N and the short-digest aliases; replies count as lookups of the cuts' roots."""
        index = start_id
        while (item := self.views.layers_dir_item(index)) is not None:
            name, found = item
            index += 1
            if not pyfuse3.readdir_reply(token, name, self._entries.found(found), index):
                return
            if isinstance(found, MergedView):
                found.hold_root()

    @_fuse_boundary
    def releasedir(self, fh):
        self._dir_handles.pop(fh, None)

    # ---- files -----------------------------------------------------------
    @_fuse_boundary
    async def open(self, inode, flags, ctx):
        view, node = self.views.locate(inode)
        if node.unlinked:
            return pyfuse3.FileInfo(fh=self._files.reopen(node, flags & PASSED_FLAGS), keep_cache=True)
        if flags & WRITE_FLAGS:
            if not view.writable:
                raise pyfuse3.FUSEError(errno.EROFS)
            async with self._mutation:
                await view.copy_up(node, with_data=not flags & os.O_TRUNC)
                fd = view.open_file(node, flags & PASSED_FLAGS)
            self._files.add(fd, node)
        else:
            fd = view.open_file(node, flags & PASSED_FLAGS)
            # The kernel reads a FUSE file in 128 KiB requests; a wider host readahead keeps the disk busy.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._files.add(fd, node, lower=view.writable and not node.child.in_upper)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @_fuse_boundary
    def read(self, fh, off, size):
        # Inline, not in a worker thread: a FUSE read is at most 128 KiB and the host's
        # readahead runs ahead of it, so the hand-off to a thread would cost more than
        # the read (measured: 266 MB/s through threads, 494 MB/s inline, cold 256 MiB).
        if self.no_open:
            fh = self._inode_fds.fd(fh, writable=False)
        return os.pread(fh, size, off)

    def _open_by_inode(self, inode: int, writable: bool) -> int:
        """An fd for InodeFds; the caller has brought a file it writes to into the upper."""
        view, node = self.views.locate(inode)
        flags = os.O_RDWR if writable else os.O_RDONLY
        if writable and not node.in_upper:
            raise OSError(errno.EIO, "a lower file is never opened for writing")
        if node.unlinked and node.in_upper:
            return self._files.reopen(node, flags)
        fd = view.open_file(node, flags)
        if not writable:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._files.add(fd, node, lower=view.writable and not node.child.in_upper)
        return fd

    @_fuse_boundary
    async def write(self, fh, off, buf):
        if self.no_open:
            fh = await self._writable_fd(fh)
        return os.pwrite(fh, buf, off)

    async def _writable_fd(self, inode: int) -> int:
        """No OPEN: the first write to a lower file is what copies it up (open(O_TRUNC) arrives
        as a truncating SETATTR, which copies up without the data)."""
        view, node = self.views.locate(inode)
        if not view.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not node.in_upper:
            async with self._mutation:
                await view.copy_up(node)
        fd = self._inode_fds.fd(inode, writable=True)
        self._watch_writers()
        return fd

    def _watch_writers(self) -> None:
        if not self._watching_writers:
            self._watching_writers = True
            trio.lowlevel.spawn_system_task(self._close_idle_writers)

    async def _close_idle_writers(self) -> None:
        """A system task: an exception escaping it would end the daemon, so none may."""
        try:
            while self._inode_fds.writing:
                await trio.sleep(WRITER_IDLE)
                self._inode_fds.close_writers_idle_since(time.monotonic() - WRITER_IDLE)
        except Exception:
            log.exception("closing idle writable fds")
        finally:
            self._watching_writers = False

    @_fuse_boundary
    def release(self, fh):
        if not self.no_open:      # without OPEN, only a CREATE's handle 0 is released: nothing to do
            self._files.release(fh)

    @_fuse_boundary
    def fsync(self, fh, datasync):
        if self.view.options.volatile:     # the caller accepts losing data on a crash
            return
        if self.no_open:
            view, node = self.views.locate(fh)
            if not view.writable or not (node.child.in_upper or node.unlinked):
                return                     # a lower file has nothing to write back
            fh = self._inode_fds.fd(fh, writable=False)
        (os.fdatasync if datasync else os.fsync)(fh)

    @_fuse_boundary
    def fsyncdir(self, fh, datasync):
        if not self.view.options.volatile:
            self.view.sync()

    @_change
    async def create(self, parent_inode, name, mode, flags, ctx):
        view, (parent,) = self._changing(parent_inode)
        if self.no_open:
            # The file is served by inode like any other: the fd it was made with, read-write
            # (an open for reading may create a file whose mode then forbids writing to it),
            # becomes its InodeFds entry, and the kernel gets handle 0.
            node, fd = view.create(parent, name, mode, os.O_RDWR, *self._creator(ctx))
            self._files.add(fd, node)
            self._inode_fds.adopt(node.ino, fd, writable=True)
            self._watch_writers()
            return pyfuse3.FileInfo(fh=0, keep_cache=True), self._entries.of_node(view, node)
        node, fd = view.create(parent, name, mode, flags & PASSED_FLAGS, *self._creator(ctx))
        self._files.add(fd, node)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), self._entries.of_node(view, node)

    def _creator(self, ctx) -> tuple[int, int]:
        return self._entries.ownership.creator(ctx.uid, ctx.gid)

    # ---- namespace changes -----------------------------------------------
    def _changing(self, *inodes: int) -> tuple[MergedView, list[Node]]:
        """The view a change goes to and the nodes it touches: EROFS unless the live view is writable."""
        view = self.views.changing(*inodes)
        if not view.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        return view, [view.node(inode) for inode in inodes]

    @_change
    async def mkdir(self, parent_inode, name, mode, ctx):
        view, (parent,) = self._changing(parent_inode)
        return self._entries.of_node(view, view.mkdir(parent, name, mode, *self._creator(ctx)))

    @_change
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        view, (parent,) = self._changing(parent_inode)
        return self._entries.of_node(view, view.mknod(parent, name, mode, rdev, *self._creator(ctx)))

    @_change
    async def symlink(self, parent_inode, name, target, ctx):
        view, (parent,) = self._changing(parent_inode)
        return self._entries.of_node(view, view.symlink(parent, name, target, *self._creator(ctx)))

    @_change
    async def link(self, inode, new_parent_inode, new_name, ctx):
        view, (node, new_parent) = self._changing(inode, new_parent_inode)
        await view.copy_up(node)
        return self._entries.of_node(view, view.link(node, new_parent, new_name))

    @_change
    async def unlink(self, parent_inode, name, ctx):
        view, (parent,) = self._changing(parent_inode)
        view.unlink(parent, name)

    @_change
    async def rmdir(self, parent_inode, name, ctx):
        view, (parent,) = self._changing(parent_inode)
        view.rmdir(parent, name)

    @_change
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        view, (parent, new_parent) = self._changing(parent_inode_old, parent_inode_new)
        await view.rename(parent, name_old, new_parent, name_new, flags)

    # ---- attribute changes -------------------------------------------------
    @_change
    async def setattr(self, inode, attr, fields, fh, ctx):
        view = self.views.changing(inode)
        node = view.node(inode)
        uid, gid = self._entries.ownership.chown_target(attr.st_uid if fields.update_uid else None,
                                                        attr.st_gid if fields.update_gid else None)
        change = AttrChange(
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=uid, gid=gid,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None)
        if change.empty:
            return self._entries.of_node(view, node)
        if not view.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not node.in_upper:      # a deleted lower file too: it gets a private copy
            await view.copy_up(node, with_data=change.size is None or change.size > 0)
        if node.unlinked:
            if self.no_open:
                fd = self._inode_fds.fd(inode, writable=change.size is not None)
            else:
                fd = fh if fh in self._files else self._files.any_fd(node)
            if fd is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            view.change_open_file(fd, change)
            return self._entries.of_node(view, node)
        own_fd = fh if fh in self._files and node.child.in_upper else None
        view.set_attributes(node, change, own_fd)
        return self._entries.of_node(view, node)

    @_change
    async def setxattr(self, inode, name, value, ctx):
        self._check_xattrs()
        view, (node,) = self._changing(inode)
        await view.copy_up(node)
        view.set_xattr(node, name, value)

    @_change
    async def removexattr(self, inode, name, ctx):
        self._check_xattrs()
        view, (node,) = self._changing(inode)
        await view.copy_up(node)
        view.remove_xattr(node, name)

    # ---- extended attributes ---------------------------------------------
    def _check_xattrs(self) -> None:
        """noxattrs: every xattr call is "not supported", as fuse-overlayfs answers it."""
        if not self.view.options.xattrs:
            raise pyfuse3.FUSEError(errno.ENOTSUP)

    @_fuse_boundary
    def getxattr(self, inode, name, ctx):
        self._check_xattrs()
        if self.views.is_virtual(inode):
            raise pyfuse3.FUSEError(errno.ENODATA)
        if name.startswith(OWNER_ONLY_XATTR_PREFIXES) and not _owner_or_root(ctx):
            raise pyfuse3.FUSEError(errno.ENODATA)
        view, node = self.views.locate(inode)
        return view.xattr(node, name)

    @_fuse_boundary
    def listxattr(self, inode, ctx):
        self._check_xattrs()
        if self.views.is_virtual(inode):
            return []
        view, node = self.views.locate(inode)
        names = view.xattr_names(node)
        if _owner_or_root(ctx):
            return names
        return [name for name in names if not name.startswith(OWNER_ONLY_XATTR_PREFIXES)]

    # ---- the filesystem --------------------------------------------------
    @_fuse_boundary
    def statfs(self, ctx):
        st = self.view.statfs()
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                      "f_favail", "f_namemax"):
            setattr(data, field, getattr(st, field))
        return data


def _owner_or_root(ctx) -> bool:
    """Whether the process asking is root or the user who mounted (the daemon runs as them)."""
    return ctx.uid in (0, os.getuid())

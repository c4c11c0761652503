"""pyfuse3 operations over a MergedView: inodes, handles, attribute caching, errno mapping.

This is the only place where OSError becomes FUSEError: every handler runs
inside ``_fuse_boundary``, which also turns any unexpected exception into EIO
for that one request (logged) instead of ending the daemon.
"""

from __future__ import annotations

import errno
import functools
import logging
import os

import pyfuse3
import trio

from .overlay import Attr, MergedView, Node

log = logging.getLogger("layermount")

# Lower layers never change: the kernel may keep what it learnt about them for a day.
LOWER_TIMEOUT = 86400.0
# Reads this large go to a worker thread so one slow disk read never stalls every request.
THREADED_READ_SIZE = 64 * 1024


def _fuse_boundary(handler):
    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


class _DirHandle:
    """A snapshot of a listing taken at opendir, so offsets stay stable while reading."""

    __slots__ = ("node", "entries")

    def __init__(self, node: Node, entries: list):
        self.node = node
        self.entries = entries


class LayerOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, view: MergedView):
        super().__init__()
        self.view = view
        self._dir_handles: dict[int, _DirHandle] = {}
        self._next_dir_handle = 1

    # ---- attributes ------------------------------------------------------
    def _entry(self, ino: int, attr: Attr, merged_dir: bool) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = ino
        entry.generation = 0
        entry.entry_timeout = LOWER_TIMEOUT
        entry.attr_timeout = LOWER_TIMEOUT
        entry.st_mode = attr.mode
        # Like kernel overlayfs: a merged directory's link count is not knowable
        # without listing every layer, so it reports 1 (find copes with that).
        entry.st_nlink = 1 if merged_dir else attr.nlink
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        entry.st_rdev = attr.rdev
        entry.st_size = attr.size
        entry.st_blksize = 4096
        entry.st_blocks = attr.blocks
        entry.st_atime_ns = attr.atime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.ctime_ns
        return entry

    def _node_entry(self, node: Node) -> pyfuse3.EntryAttributes:
        return self._entry(node.ino, node.attr, node.attr.is_dir and len(node.sources) > 1)

    # ---- lookups ---------------------------------------------------------
    @_fuse_boundary
    async def lookup(self, parent_inode, name, ctx=None):
        parent = self.view.node(parent_inode)
        if name == b".":
            node = parent
        elif name == b"..":
            node = parent.parent or parent
        else:
            node = self.view.lookup(parent, name)
            if node is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._node_entry(node)
        node.lookups += 1
        return self._node_entry(node)

    async def forget(self, inode_list):
        for ino, count in inode_list:
            self.view.forget(ino, count)

    @_fuse_boundary
    async def getattr(self, inode, ctx=None):
        return self._node_entry(self.view.node(inode))

    @_fuse_boundary
    async def readlink(self, inode, ctx):
        return self.view.readlink(self.view.node(inode))

    # ---- directories -----------------------------------------------------
    @_fuse_boundary
    async def opendir(self, inode, ctx):
        node = self.view.node(inode)
        listing = self.view.listing(node)
        handle = self._next_dir_handle
        self._next_dir_handle += 1
        self._dir_handles[handle] = _DirHandle(node, list(listing.values()))
        return handle

    @_fuse_boundary
    async def readdir(self, fh, start_id, token):
        handle = self._dir_handles[fh]
        node = handle.node
        # Offsets: 1 is ".", 2 is "..", 3+i is entries[i].
        if start_id < 1:
            if not pyfuse3.readdir_reply(token, b".", self._node_entry(node), 1):
                return
        if start_id < 2:
            parent = node.parent or node
            if not pyfuse3.readdir_reply(token, b"..", self._node_entry(parent), 2):
                return
        view = self.view
        entries = handle.entries
        for index in range(max(start_id - 2, 0), len(entries)):
            child = entries[index]
            ino = view.ino_for(child.attr)
            known = view.nodes.get(ino)
            attr = (self._node_entry(known) if known is not None
                    else self._entry(ino, child.attr, child.attr.is_dir and len(child.sources) > 1))
            if not pyfuse3.readdir_reply(token, child.name, attr, index + 3):
                return
            view.remember(node, child)

    @_fuse_boundary
    async def releasedir(self, fh):
        self._dir_handles.pop(fh, None)

    # ---- files -----------------------------------------------------------
    @_fuse_boundary
    async def open(self, inode, flags, ctx):
        node = self.view.node(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        fd = self.view.open_file(node, os.O_RDONLY)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @_fuse_boundary
    async def read(self, fh, off, size):
        if size >= THREADED_READ_SIZE:
            return await trio.to_thread.run_sync(os.pread, fh, size, off)
        return os.pread(fh, size, off)

    @_fuse_boundary
    async def release(self, fh):
        os.close(fh)

    @_fuse_boundary
    async def flush(self, fh):
        pass

    # ---- extended attributes ---------------------------------------------
    @_fuse_boundary
    async def getxattr(self, inode, name, ctx):
        return self.view.xattr(self.view.node(inode), name)

    @_fuse_boundary
    async def listxattr(self, inode, ctx):
        return self.view.xattr_names(self.view.node(inode))

    # ---- the filesystem --------------------------------------------------
    @_fuse_boundary
    async def statfs(self, ctx):
        st = os.statvfs(self.view.statfs_path())
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                      "f_favail", "f_namemax"):
            setattr(data, field, getattr(st, field))
        return data

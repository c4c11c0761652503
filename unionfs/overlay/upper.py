"""The writable upper layer: copy-up through a work dir, whiteouts and opaque markers.

The upper is kept in the form of a real layer, so ``diff`` is a walk of it and
``commit`` is "tar it up": deletions are whiteouts, a directory recreated over
a lower one is opaque. Image mounts write the OCI form (``.wh.NAME`` files,
``.wh..wh..opq``); ``-o upperdir=`` mounts default to overlayfs' form (char
device 0/0, ``trusted.overlay.opaque=y``) so kernel overlayfs and podman read it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from .. import layerform, safepath
from ..layerform import HIDDEN_XATTR_PREFIXES, OCI, OVERLAY, whiteout_name_bytes
from .idmap import record_owner

COPY_CHUNK = 1 << 30


class UpperLayer:
    """An upper directory and its work directory (same filesystem, so rename is atomic)."""

    fsync_copies = True     # a copy-up reaches the disk before it is published; off for volatile mounts
    override_xattr = None   # xattr_permissions: owners and modes kept in this xattr, not on the inodes

    def __init__(self, upper_path: str, work_path: str, whiteout_form: str = OCI):
        self.path = upper_path
        self.work_path = work_path
        self.whiteout_form = whiteout_form
        self.root_fd = os.open(upper_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.work_fd = os.open(work_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if os.fstat(self.root_fd).st_dev != os.fstat(self.work_fd).st_dev:
            raise OSError(errno.EXDEV, "upper and work directories must be on one filesystem")
        self._temp_counter = 0
        self.clear_work()

    def close(self) -> None:
        os.close(self.root_fd)
        os.close(self.work_fd)

    def clear_work(self) -> None:
        """Remove what an interrupted copy-up left: never a partial file in the upper itself."""
        for name in os.listdir(self.work_fd):
            remove_tree_at(self.work_fd, name)

    # ---- paths ----------------------------------------------------------------
    def open_dir(self, relpath: bytes) -> int:
        return safepath.open_beneath(self.root_fd, relpath, os.O_RDONLY | os.O_DIRECTORY)

    def temp_name(self) -> bytes:
        self._temp_counter += 1
        return b"copyup-%d-%d" % (os.getpid(), self._temp_counter)

    # ---- whiteouts and opacity -----------------------------------------------
    def make_whiteout(self, dir_fd: int, name: bytes) -> None:
        layerform.make_whiteout(dir_fd, name, self.whiteout_form)

    def remove_whiteout(self, dir_fd: int, name: bytes) -> bool:
        """Remove a whiteout for ``name`` if this directory holds one; True if it did."""
        return layerform.remove_whiteout(dir_fd, name, self.whiteout_form)

    def rename_leaving_whiteout(self, old_dir_fd: int, name: bytes, new_dir_fd: int, new_name: bytes) -> None:
        """Move an entry and hide the lower one left at its old name, all or nothing."""
        if self.whiteout_form == OVERLAY:
            try:
                safepath.rename_whiteout(old_dir_fd, name, new_dir_fd, new_name)
                return
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
            os.rename(name, new_name, src_dir_fd=old_dir_fd, dst_dir_fd=new_dir_fd)
            self.make_whiteout(old_dir_fd, name)   # this filesystem has no RENAME_WHITEOUT
            return
        self.make_whiteout(old_dir_fd, name)       # .wh.NAME is a name of its own: it can go first
        try:
            os.rename(name, new_name, src_dir_fd=old_dir_fd, dst_dir_fd=new_dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(whiteout_name_bytes(name), dir_fd=old_dir_fd)
            raise

    def make_opaque(self, dir_fd: int) -> None:
        layerform.make_opaque(dir_fd, self.whiteout_form)

    def clear_markers(self, dir_fd: int) -> None:
        """Empty a directory that the merged view already shows as empty (only markers remain)."""
        for name in os.listdir(dir_fd):
            remove_tree_at(dir_fd, name)

    # ---- copy-up -----------------------------------------------------------------
    def stage_file(self, source_fd: int, served, xattrs: dict[str, bytes], *, with_data: bool = True) -> "StagedCopy":
        """Start a copy-up in the work dir; ``run`` then ``publish`` finish it (atomically)."""
        temp = self.temp_name()
        out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=self.work_fd)
        return StagedCopy(self, temp, source_fd, out, served, xattrs, with_data)

    def make_dir_like(self, dest_dir_fd: int, name: bytes, served, xattrs: dict[str, bytes]) -> None:
        """Create a directory in the upper carrying a lower directory's metadata."""
        temp = self.temp_name()
        os.mkdir(temp, 0o700, dir_fd=self.work_fd)
        try:
            fd = os.open(temp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.work_fd)
            try:
                apply_metadata(fd, served, xattrs, self.override_xattr)
            finally:
                os.close(fd)
            os.rename(temp, name, src_dir_fd=self.work_fd, dst_dir_fd=dest_dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(temp, dir_fd=self.work_fd)
            raise

    def copy_special_in(self, dest_dir_fd: int, name: bytes, served, link_target: str | None,
                        xattrs: dict[str, bytes]) -> None:
        """Symlinks, devices, fifos and sockets: created directly (no data to be half-copied)."""
        mode = served.mode
        if stat.S_ISLNK(mode):
            os.symlink(link_target, name, dir_fd=dest_dir_fd)
        else:
            os.mknod(name, mode, served.rdev, dir_fd=dest_dir_fd)
        path = safepath.fd_path(dest_dir_fd, name)
        os.chown(name, served.uid, served.gid, dir_fd=dest_dir_fd, follow_symlinks=False)
        if not stat.S_ISLNK(mode):
            os.chmod(path, stat.S_IMODE(mode))
        for key, value in xattrs.items():
            with contextlib.suppress(OSError):
                os.setxattr(path, key, value, follow_symlinks=False)
        os.utime(name, ns=(served.atime_ns, served.mtime_ns), dir_fd=dest_dir_fd, follow_symlinks=False)


class StagedCopy:
    """A file being copied up: the data copy may run in a worker thread (it touches only its fds);
    publishing renames it into the upper and belongs to the thread that owns the merged view."""

    def __init__(self, upper: UpperLayer, temp: bytes, source_fd: int, out_fd: int, served, xattrs, with_data):
        self.upper, self.temp, self.source_fd, self.out_fd = upper, temp, source_fd, out_fd
        self.served, self.xattrs, self.with_data = served, xattrs, with_data

    @property
    def size(self) -> int:
        return self.served.size if self.with_data else 0

    def run(self) -> None:
        if self.with_data:
            copy_data(self.source_fd, self.out_fd, self.served.size)
        apply_metadata(self.out_fd, self.served, self.xattrs, self.upper.override_xattr)
        if self.upper.fsync_copies:
            os.fsync(self.out_fd)

    def publish(self, dest_dir_fd: int, dest_name: bytes) -> None:
        self._close()
        os.rename(self.temp, dest_name, src_dir_fd=self.upper.work_fd, dst_dir_fd=dest_dir_fd)

    def discard(self) -> None:
        self._close()
        with contextlib.suppress(OSError):
            os.unlink(self.temp, dir_fd=self.upper.work_fd)

    def _close(self) -> None:
        for fd in (self.source_fd, self.out_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.source_fd = self.out_fd = -1


def copy_data(source_fd: int, dest_fd: int, size: int) -> None:
    """In-kernel copy (reflinks where the filesystem has them); plain copy as the fallback."""
    offset = 0
    try:
        while offset < size:
            copied = os.copy_file_range(source_fd, dest_fd, min(COPY_CHUNK, size - offset), offset, offset)
            if copied == 0:
                break
            offset += copied
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    while offset < size:
        chunk = os.pread(source_fd, min(1 << 20, size - offset), offset)
        if not chunk:
            break
        os.pwrite(dest_fd, chunk, offset)
        offset += len(chunk)


def apply_metadata(fd: int, served, xattrs: dict[str, bytes], override_xattr: str | None = None) -> None:
    """Owner, mode (after chown, which clears setuid), xattrs, then times (last: the rest touch ctime only).

    ``served`` is the entry's attributes as the mount shows them (nodes.Attr).
    """
    record_owner(fd, served.uid, served.gid, served.mode, override_xattr)
    for key, value in xattrs.items():
        with contextlib.suppress(OSError):
            os.setxattr(fd, key, value)
    os.utime(fd, ns=(served.atime_ns, served.mtime_ns))


def read_xattrs(dir_fd: int, name: bytes) -> dict[str, bytes]:
    """An entry's xattrs to copy up: all but the hidden ones (ours and the kernel overlay's)."""
    path = safepath.fd_path(dir_fd, name)
    found = {}
    with contextlib.suppress(OSError):
        for key in os.listxattr(path, follow_symlinks=False):
            if os.fsencode(key).startswith(HIDDEN_XATTR_PREFIXES):
                continue
            with contextlib.suppress(OSError):
                found[key] = os.getxattr(path, key, follow_symlinks=False)
    return found


def remove_tree_at(dir_fd: int, name: bytes | str) -> None:
    """rm -rf of one entry below a directory fd, never following symlinks."""
    try:
        os.unlink(name, dir_fd=dir_fd)
        return
    except IsADirectoryError:
        pass
    except FileNotFoundError:
        return
    except PermissionError:
        # unlink(2) of a directory says EISDIR on Linux, but EPERM elsewhere; check.
        if not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise
    child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        for entry in os.listdir(child):
            remove_tree_at(child, entry)
    finally:
        os.close(child)
    os.rmdir(name, dir_fd=dir_fd)



"""The one walk and the one removal of a directory tree, for the whole project.

Both loop instead of recursing, so a hostile tree 100,000 levels deep costs
memory, never the Python stack; both go through directory fds and never
follow a symlink. A name swapped for a symlink during the walk is refused
(``O_NOFOLLOW``), a directory swapped for another is noticed (its device and
inode differ from what was listed), and a directory moved elsewhere is noticed
when the walk climbs back through "..". However deep the tree, at most
``KEPT_FDS`` descriptors are open: deeper parents are closed on the way down
and reopened through ".." (and checked) on the way up.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass, field
from typing import Iterator

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
KEPT_FDS = 32


class TreeChanged(OSError):
    """The tree was changed under the walk in a way that would lead it astray."""

    def __init__(self, relpath: str, what: str):
        super().__init__(errno.ESTALE, f"changed during the walk ({what})", relpath)


@dataclass
class Entry:
    """One name met by ``walk``. The fds are the walk's: valid until it moves on, never to be closed."""

    dir_fd: int                 # the directory holding ``name``
    name: str
    relpath: str                # below the walk's root, "/"-separated
    stat: os.stat_result        # lstat
    fd: int | None = None       # the directory itself, for directories

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.stat.st_mode)


@dataclass
class _Frame:
    fd: int | None
    identity: tuple[int, int]
    relpath: str
    name: str = ""                                     # in its parent
    pending: list[str] = field(default_factory=list)   # names still to visit, last first


class _Descent:
    """The directories from the walk's root down to where it is, with a bounded number of open fds."""

    def __init__(self, root_fd: int):
        fd = os.dup(root_fd)
        self.frames = [_Frame(fd, _identity(os.fstat(fd)), "")]

    @property
    def top(self) -> _Frame:
        return self.frames[-1]

    def descend(self, name: str, listed: os.stat_result | None = None, *, opener=None) -> _Frame:
        parent = self.top
        relpath = f"{parent.relpath}/{name}" if parent.relpath else name
        try:
            fd = (opener or _open_dir)(parent.fd, name)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise TreeChanged(relpath, "a directory became something else") from None
            raise
        identity = _identity(os.fstat(fd))
        if listed is not None and identity != _identity(listed):
            os.close(fd)
            raise TreeChanged(relpath, "a directory was replaced")
        frame = _Frame(fd, identity, relpath, name)
        self.frames.append(frame)
        if len(self.frames) > KEPT_FDS:
            far = self.frames[-KEPT_FDS - 1]
            if far.fd is not None and len(self.frames) - KEPT_FDS - 1 > 0:
                os.close(far.fd)
                far.fd = None
        return frame

    def ascend(self) -> _Frame:
        """Leave the current directory; returns the frame left (its fd closed)."""
        child = self.frames.pop()
        parent = self.top
        try:
            if parent.fd is None:
                fd = os.open("..", DIR_FLAGS, dir_fd=child.fd)
                if _identity(os.fstat(fd)) != parent.identity:
                    os.close(fd)
                    raise TreeChanged(child.relpath, "a directory was moved")
                parent.fd = fd
        finally:
            os.close(child.fd)
            child.fd = None
        return child

    def close(self) -> None:
        for frame in self.frames:
            if frame.fd is not None:
                os.close(frame.fd)
                frame.fd = None


def walk(root_fd: int) -> Iterator[Entry]:
    """Every entry below ``root_fd``, parents before children, names sorted; symlinks never followed.

    Entries that vanish between listing and stat are skipped; a directory that
    is swapped or moved raises ``TreeChanged``.
    """
    descent = _Descent(root_fd)
    descent.top.pending = sorted(os.listdir(descent.top.fd), reverse=True)
    try:
        while True:
            frame = descent.top
            if not frame.pending:
                if len(descent.frames) == 1:
                    return
                descent.ascend()
                continue
            name = frame.pending.pop()
            try:
                st = os.stat(name, dir_fd=frame.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            relpath = f"{frame.relpath}/{name}" if frame.relpath else name
            if not stat.S_ISDIR(st.st_mode):
                yield Entry(frame.fd, name, relpath, st)
                continue
            child = descent.descend(name, st)
            child.pending = sorted(os.listdir(child.fd), reverse=True)
            yield Entry(frame.fd, name, relpath, st, child.fd)
    finally:
        descent.close()


def remove_tree(path: str | os.PathLike) -> None:
    """rm -rf ``path`` (its parent directories are followed as given; nothing below is)."""
    path = os.fspath(path)
    parent, name = os.path.split(os.path.abspath(path))
    try:
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        remove_tree_at(parent_fd, name)
    finally:
        os.close(parent_fd)


def remove_tree_at(dir_fd: int, name: str | bytes) -> None:
    """rm -rf of one entry of a directory fd, never following symlinks, however deep.

    Directories an unprivileged unpack left read-only (0555) or closed (0000)
    are made ours (0700) first, as rm -rf of one's own files would need.
    """
    name = os.fsdecode(name)
    if _unlink(dir_fd, name):
        return
    descent = _Descent(dir_fd)
    try:
        frame = descent.descend(name, opener=_open_dir_making_it_ours)
        frame.pending = _listing(frame.fd)
        while True:
            frame = descent.top
            if frame.pending:
                entry = frame.pending.pop()
                if not _unlink(frame.fd, entry):
                    child = descent.descend(entry, opener=_open_dir_making_it_ours)
                    child.pending = _listing(child.fd)
                continue
            again = _listing(frame.fd)       # something created meanwhile goes too
            if again:
                frame.pending = again
                continue
            left = descent.ascend()
            _rmdir(descent.top.fd, left.name)
            if len(descent.frames) == 1:
                return
    finally:
        descent.close()


def _unlink(dir_fd: int, name: str) -> bool:
    """Remove a non-directory; False if ``name`` is a directory (left for the caller)."""
    for attempt in range(2):
        try:
            os.unlink(name, dir_fd=dir_fd)
            return True
        except FileNotFoundError:
            return True
        except IsADirectoryError:
            return False
        except PermissionError:
            # EPERM: a directory on some systems; EACCES: our own read-only directory.
            if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                return False
            if attempt:
                raise
            _make_ours(dir_fd)
    return False


def _rmdir(dir_fd: int, name: str) -> None:
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except PermissionError:
        _make_ours(dir_fd)
        os.rmdir(name, dir_fd=dir_fd)


def _listing(fd: int) -> list[str]:
    try:
        return os.listdir(fd)
    except PermissionError:
        _make_ours(fd)
        return os.listdir(fd)


def _open_dir(parent_fd: int, name: str) -> int:
    return os.open(name, DIR_FLAGS, dir_fd=parent_fd)


def _open_dir_making_it_ours(parent_fd: int, name: str) -> int:
    try:
        return _open_dir(parent_fd, name)
    except PermissionError:
        pass
    # A 0000 directory: chmod it through an O_PATH fd, so a symlink swapped in is never followed.
    handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    try:
        if not stat.S_ISDIR(os.fstat(handle).st_mode):
            raise OSError(errno.ENOTDIR, "not a directory", name)
        os.chmod(f"/proc/self/fd/{handle}", stat.S_IRWXU)
    finally:
        os.close(handle)
    return _open_dir(parent_fd, name)


def _make_ours(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | stat.S_IRWXU)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino

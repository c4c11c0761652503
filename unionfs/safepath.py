"""Open paths beneath a directory fd without ever following a symlink.

An image may hold ``etc -> /`` in one layer and ``etc/`` in another; the
daemon must never be steered onto host files by that. openat2(2) with
RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS makes the kernel enforce it in one call;
where the kernel lacks openat2 we walk component by component with O_NOFOLLOW.
"""

from __future__ import annotations

import ctypes
import errno
import os

_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = 437  # the same number on every Linux architecture (since 5.6)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_have_openat2 = True
# The longest path one open(2) takes (PATH_MAX less its NUL); a layer path may be longer than that
# (the mount's own path is not part of it), so longer ones are opened a stretch at a time.
PATH_MAX = 4095


def open_beneath(root_fd: int, relpath: bytes, flags: int, mode: int = 0o600) -> int:
    """open(2) ``relpath`` (b"" is the root itself) beneath ``root_fd``, refusing symlinks anywhere.

    The last component is refused too when it is a symlink (ELOOP), unless
    O_PATH|O_NOFOLLOW is asked for, which opens the link itself.
    """
    if len(relpath) > PATH_MAX:
        return _open_long(root_fd, relpath, flags, mode)
    global _have_openat2
    flags |= os.O_CLOEXEC
    path = relpath or b"."
    if _have_openat2:
        how = _OpenHow(flags, mode if flags & os.O_CREAT else 0,
                       _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
        fd = _libc.syscall(_SYS_OPENAT2, root_fd, path, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err), path)
        _have_openat2 = False
    return _open_by_components(root_fd, path, flags, mode)


def _open_long(root_fd: int, relpath: bytes, flags: int, mode: int) -> int:
    """open_beneath of a path longer than PATH_MAX: its leading directories a stretch at a time."""
    head = relpath[:PATH_MAX + 1].rpartition(b"/")[0]
    if not head:
        raise OSError(errno.ENAMETOOLONG, "name too long", relpath[:PATH_MAX])
    fd = open_beneath(root_fd, head, os.O_PATH | os.O_DIRECTORY)
    try:
        return open_beneath(fd, relpath[len(head) + 1:], flags, mode)
    finally:
        os.close(fd)


def _open_by_components(root_fd: int, path: bytes, flags: int, mode: int) -> int:
    parts = [part for part in path.split(b"/") if part not in (b"", b".")]
    if any(part == b".." for part in parts):
        raise OSError(errno.EXDEV, "path leaves its layer", path)
    if not parts:
        return os.open(".", flags, mode, dir_fd=root_fd)
    parent = root_fd
    try:
        for part in parts[:-1]:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            if parent != root_fd:
                os.close(parent)
            parent = child
        return os.open(parts[-1], flags | os.O_NOFOLLOW, mode, dir_fd=parent)
    finally:
        if parent != root_fd:
            os.close(parent)


_RENAME_EXCHANGE = 2
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


_RENAME_WHITEOUT = 4


def rename_exchange(old_dir_fd: int, old_name: bytes, new_dir_fd: int, new_name: bytes) -> None:
    """renameat2(RENAME_EXCHANGE): swap two names atomically (os.rename has no flags)."""
    _renameat2(old_dir_fd, old_name, new_dir_fd, new_name, _RENAME_EXCHANGE)


def rename_whiteout(old_dir_fd: int, old_name: bytes, new_dir_fd: int, new_name: bytes) -> None:
    """renameat2(RENAME_WHITEOUT): move, leaving an overlayfs whiteout in one atomic step."""
    _renameat2(old_dir_fd, old_name, new_dir_fd, new_name, _RENAME_WHITEOUT)


def _renameat2(old_dir_fd: int, old_name: bytes, new_dir_fd: int, new_name: bytes, flags: int) -> None:
    if _libc.renameat2(old_dir_fd, old_name, new_dir_fd, new_name, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old_name)


def split_parent(relpath: bytes) -> tuple[bytes, bytes]:
    """(parent, name) of a relative path; the root's parent is itself."""
    parent, _, name = relpath.rpartition(b"/")
    return parent, name


def fd_path(fd: int, name: bytes = b"") -> bytes:
    """A path naming ``name`` inside the directory ``fd`` for calls that take no dir_fd (xattrs).

    The /proc magic link pins the directory; ``name`` is one component, so
    nothing but its own last step is resolved, and callers pass follow_symlinks=False.
    """
    base = b"/proc/self/fd/%d" % fd
    return base + b"/" + name if name else base


_RESOLVE_IN_ROOT = 0x10
_IN_ROOT_RETRIES = 1000


def open_in_root(root_fd: int, relpath: bytes, flags: int) -> int:
    """open(2) ``relpath`` as a process chrooted at ``root_fd`` would: ``..`` and absolute symlinks stay inside.

    For following an image's own symlinks (a runtime's Volumes) without ever
    reaching the host; magic links (/proc/*/fd) are refused. Needs openat2 (Linux 5.6).
    """
    how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    for _ in range(_IN_ROOT_RETRIES):
        fd = _libc.syscall(_SYS_OPENAT2, root_fd, relpath or b".", ctypes.byref(how), ctypes.sizeof(how))
        # EAGAIN: a rename anywhere on the host while ".." was walked; the kernel asks for a retry.
        if fd >= 0 or ctypes.get_errno() != errno.EAGAIN:
            break
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            raise OSError(err, "resolving a path inside an image needs openat2 (Linux 5.6)", relpath)
        raise OSError(err, os.strerror(err), relpath)
    return fd

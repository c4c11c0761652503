"""Owners as the mount shows them and as the layers store them: id mapping and squashing.

podman and buildah run a container in a user namespace without chowning its
image: containers/storage passes ``uidmapping=``/``gidmapping=`` and the
mount shifts ids on the way, as fuse-overlayfs does. The layers hold the
container's ids (``CONTAINER`` in ``CONTAINER:HOST:LENGTH``, root is 0); the
mount shows host ids, which the namespace turns back into the container's.
A stored id outside every range is shown as the overflow id; a new entry made
by a caller outside them is stored as the overflow id (both as fuse-overlayfs);
a chown to an id outside them is refused with EINVAL, not stored as another id.
Squashing (``squash_to_*``) changes what is shown only, never what is stored.

Where an upper stores an owner is the other half: on the inode, or, with
``xattr_permissions=`` (containers/storage's ``force_mask``), in fuse-overlayfs'
override xattr, the inode left 0755 and the daemon's.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from .. import safepath
from ..layerform import Override, read_override
from ..mountopts import IdRange, ViewOptions

OVERFLOW_ID = 65534     # /proc/sys/kernel/overflowuid: the id the kernel shows for an unmapped one


@dataclass(frozen=True)
class IdMap:
    """One direction-agnostic list of ranges; empty means ids pass unchanged."""

    ranges: tuple[IdRange, ...] = ()

    def shown(self, stored: int) -> int:
        if not self.ranges:
            return stored
        for span in self.ranges:
            if span.container <= stored < span.container + span.length:
                return span.host + stored - span.container
        return OVERFLOW_ID

    def stored(self, shown: int) -> int | None:
        """The layer id for a host id, or None when no range holds it."""
        if not self.ranges:
            return shown
        for span in self.ranges:
            if span.host <= shown < span.host + span.length:
                return span.container + shown - span.host
        return None


class Ownership:
    """The mount's translation of owners, both ways."""

    def __init__(self, options: ViewOptions | None = None):
        options = options or ViewOptions()
        self.uids, self.gids = IdMap(options.uid_map), IdMap(options.gid_map)
        self.squash_uid, self.squash_gid = options.squash_uid, options.squash_gid

    @property
    def identity(self) -> bool:
        return not (self.uids.ranges or self.gids.ranges) and self.squash_uid is None and self.squash_gid is None

    def shown(self, uid: int, gid: int) -> tuple[int, int]:
        """A stored owner as the mount shows it."""
        return (self.uids.shown(uid) if self.squash_uid is None else self.squash_uid,
                self.gids.shown(gid) if self.squash_gid is None else self.squash_gid)

    def creator(self, uid: int, gid: int) -> tuple[int, int]:
        """The stored owner of an entry a caller (host ids) creates."""
        return _or_overflow(self.uids.stored(uid)), _or_overflow(self.gids.stored(gid))

    def chown_target(self, uid: int | None, gid: int | None) -> tuple[int | None, int | None]:
        """The stored ids a chown asks for; EINVAL for an id no range holds (kernel idmapped mounts too)."""
        return self._stored(self.uids, uid), self._stored(self.gids, gid)

    @staticmethod
    def _stored(ids: IdMap, shown: int | None) -> int | None:
        if shown is None:
            return None
        stored = ids.stored(shown)
        if stored is None:
            raise OSError(errno.EINVAL, f"id {shown} is not mapped into the mount")
        return stored


def _or_overflow(stored: int | None) -> int:
    return OVERFLOW_ID if stored is None else stored


# ---- where an upper keeps owners: on the inode, or (xattr_permissions) in an xattr -----------

# The mode every directory and file of such an upper has on disk, as fuse-overlayfs leaves them:
# the daemon can always reach them, and their real owner and mode live in the xattr.
STORED_MODE = 0o755


def keeps_in_xattr(override_xattr: str | None, mode: int) -> bool:
    """fuse-overlayfs records directories and regular files only; the rest carry their owner themselves."""
    return override_xattr is not None and (stat.S_ISDIR(mode) or stat.S_ISREG(mode))


def record_owner(fd: int, uid: int, gid: int, mode: int, override_xattr: str | None) -> None:
    """Give an upper entry open as ``fd`` its owner and mode (``mode`` with its file type)."""
    if keeps_in_xattr(override_xattr, mode):
        os.setxattr(fd, override_xattr, Override(uid, gid, mode).encode())
        os.fchmod(fd, STORED_MODE)
    else:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, stat.S_IMODE(mode))


def change_owner(dir_fd: int, name: bytes, owner: tuple[int, int] | None, mode: int | None,
                 override_xattr: str | None) -> None:
    """chown (-1: that id stays) and chmod of an upper entry, where its upper keeps them."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if keeps_in_xattr(override_xattr, st.st_mode):
        current = read_override(dir_fd, name, override_xattr) or Override(st.st_uid, st.st_gid, st.st_mode)
        uid, gid = owner if owner is not None else (-1, -1)
        new_mode = current.mode if mode is None else stat.S_IFMT(st.st_mode) | stat.S_IMODE(mode)
        record = Override(current.uid if uid == -1 else uid, current.gid if gid == -1 else gid, new_mode)
        os.setxattr(safepath.fd_path(dir_fd, name), override_xattr, record.encode(), follow_symlinks=False)
        return
    if owner is not None:
        os.chown(name, *owner, dir_fd=dir_fd, follow_symlinks=False)
    if mode is not None and not stat.S_ISLNK(st.st_mode):
        os.chmod(name, stat.S_IMODE(mode), dir_fd=dir_fd)

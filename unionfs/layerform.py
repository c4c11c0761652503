"""The on-disk layer contract: how a layer directory says "deleted", "opaque" and "really owned by".

Everything that reads or writes a layer directory shares these rules: the
extractor (which writes the override xattr), the merged view and its upper
(which read and write markers), diff, commit and provenance. Two marker forms
exist and both are read:

- OCI (image-spec layer.md): a file ``.wh.NAME`` hides NAME below;
  ``.wh..wh..opq`` makes its directory opaque. Store layers and image uppers.
- overlayfs: a char device 0/0 named NAME hides it; the xattr
  ``trusted.overlay.opaque=y`` (``user.overlay.opaque`` when unprivileged)
  makes a directory opaque. ``-o lowerdir=``/``upperdir=`` directories.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from . import safepath

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
# Names like .wh..wh.plnk belong to the AUFS era: never shown, never meaningful.
META_PREFIX = ".wh..wh."
WHITEOUT_PREFIX_BYTES = WHITEOUT_PREFIX.encode()
OPAQUE_MARKER_BYTES = OPAQUE_MARKER.encode()
META_PREFIX_BYTES = META_PREFIX.encode()

OCI = "oci"
OVERLAY = "overlay"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
OPAQUE_XATTRS = (OVERLAY_OPAQUE_XATTR, "user.overlay.opaque")

# fuse-overlayfs' and containers/storage's record of what an unprivileged unpack could not apply.
OVERRIDE_XATTR = "user.containers.override_stat"
# Where fuse-overlayfs keeps an upper's owners and modes with xattr_permissions=1 and =2.
XATTR_PERMISSIONS = {1: "security.fuseoverlayfs.override_stat", 2: "user.fuseoverlayfs.override_stat"}
# Ours, answered by the daemon on its mount: the layer an entry comes from, the stack, the pid.
PROVENANCE_XATTR = b"user.layermount.layer"
STACK_XATTR = b"user.layermount.stack"
PID_XATTR = b"user.layermount.pid"
# Never shown through the mount, never copied up or committed, never taken from an image:
# our bookkeeping and the kernel overlay's.
HIDDEN_XATTR_PREFIXES = (OVERRIDE_XATTR.encode(), b"trusted.overlay.", b"user.overlay.", b"user.layermount.",
                         b"user.fuseoverlayfs.", b"security.fuseoverlayfs.")


# ---- names -----------------------------------------------------------------

def whiteout_name(name: str) -> str:
    """The OCI marker file that hides ``name`` in the layers below."""
    return WHITEOUT_PREFIX + name


def whiteout_name_bytes(name: bytes) -> bytes:
    return WHITEOUT_PREFIX_BYTES + name


def whiteout_target(name: str) -> str | None:
    """The name a ``.wh.`` marker hides, or None if ``name`` is no plain whiteout."""
    target = whiteout_target_bytes(os.fsencode(name))
    return None if target is None else os.fsdecode(target)


def whiteout_target_bytes(name: bytes) -> bytes | None:
    if name.startswith(META_PREFIX_BYTES) or not name.startswith(WHITEOUT_PREFIX_BYTES):
        return None
    target = name[len(WHITEOUT_PREFIX_BYTES):]
    return target if target not in (b"", b".", b"..") else None


def is_marker_name(name: bytes) -> bool:
    """Whiteout, opaque and AUFS markers (every ``.wh.`` name) are never visible in a merged view."""
    return name.startswith(WHITEOUT_PREFIX_BYTES)


# ---- overlayfs form: reading -------------------------------------------------

def is_overlay_whiteout(st: os.stat_result) -> bool:
    """A char device 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_overlay_opaque(dir_fd: int) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(dir_fd, name) == b"y":
                return True
        except OSError:
            continue
    return False


# ---- writing, in either form -------------------------------------------------

def make_whiteout(dir_fd: int, name: bytes, form: str) -> None:
    if form == OVERLAY:
        os.mknod(name, stat.S_IFCHR | 0o000, 0, dir_fd=dir_fd)
    else:
        os.close(os.open(whiteout_name_bytes(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o000,
                         dir_fd=dir_fd))


def remove_whiteout(dir_fd: int, name: bytes, form: str) -> bool:
    """Remove a whiteout for ``name`` if this directory holds one; True if it did."""
    if form == OVERLAY:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not is_overlay_whiteout(st):
            return False
        os.unlink(name, dir_fd=dir_fd)
        return True
    try:
        os.unlink(whiteout_name_bytes(name), dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


def make_opaque(dir_fd: int, form: str) -> None:
    if form == OVERLAY:
        os.setxattr(safepath.fd_path(dir_fd, b"."), OVERLAY_OPAQUE_XATTR, b"y")
    else:
        os.close(os.open(OPAQUE_MARKER, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o000, dir_fd=dir_fd))


# ---- override_stat -------------------------------------------------------------

@dataclass(frozen=True)
class Override:
    """``uid:gid:0MODE[:major:minor]``: the owner, type and mode an entry really has."""

    uid: int
    gid: int
    mode: int                  # may lack the file type bits (then the inode's type stands)
    device: tuple[int, int] | None = None

    def encode(self) -> bytes:
        value = f"{self.uid}:{self.gid}:0{self.mode:o}"
        if self.device is not None:
            value += f":{self.device[0]}:{self.device[1]}"
        return value.encode()

    @classmethod
    def parse(cls, value: bytes) -> "Override | None":
        """None for a value we cannot read: the inode's own attributes are served instead."""
        try:
            fields = value.decode().split(":")
            uid, gid, mode = int(fields[0]), int(fields[1]), int(fields[2], 8)
        except (ValueError, IndexError, UnicodeDecodeError):
            return None
        try:
            device = (int(fields[3]), int(fields[4])) if len(fields) >= 5 else None
        except ValueError:
            device = None
        return cls(uid, gid, mode, device)


def read_override(dir_fd: int, name: bytes, xattr: str = OVERRIDE_XATTR) -> Override | None:
    try:
        value = os.getxattr(safepath.fd_path(dir_fd, name), xattr, follow_symlinks=False)
    except OSError:
        return None
    return Override.parse(value)


def override_xattr_of(root_fd: int) -> str | None:
    """The override xattr a layer directory uses, told by its root carrying one (fuse-overlayfs' rule:
    containers/storage marks a layer unpacked with ``force_mask`` so)."""
    for name in (XATTR_PERMISSIONS[1], OVERRIDE_XATTR, XATTR_PERMISSIONS[2]):
        try:
            os.getxattr(root_fd, name)
            return name
        except OSError:
            continue
    return None

"""One layer directory as the merge reads it: held open by fd, its directories classified by its form.

A store layer holds OCI markers only: a char 0/0 device in it is a device.
A ``-o lowerdir=`` directory may hold either form. ``scan`` is the one place
that decides, so the mount and ``which``/``explain`` can never disagree.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import fstree, safepath
from ..layerform import OPAQUE_MARKER_BYTES, OVERRIDE_XATTR, WHITEOUT_PREFIX_BYTES, Override, is_overlay_opaque, \
    is_overlay_whiteout, override_xattr_of, read_override
from .merge import DirListing

# What os.fsencode uses, for names that come from scandir (always str, never a path object).
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


@dataclass
class Layer:
    """One layer directory, held open by fd so paths resolve beneath it."""

    name: str                 # the diff_id for store layers, the directory for -o lowerdir, "upper"
    path: str
    root_fd: int
    rootless: bool            # owner and special modes live in the override xattr
    overlay_form: bool        # may hold overlayfs-style whiteouts (char 0/0, opaque xattr)
    override_xattr: str = OVERRIDE_XATTR      # which xattr, when rootless

    @classmethod
    def open(cls, path: str | os.PathLike, name: str | None = None, *, rootless: bool | None = None,
             overlay_form: bool = True) -> "Layer":
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        xattr = OVERRIDE_XATTR
        if rootless is None:
            # A root marked with an override xattr says every entry may carry one (fuse-overlayfs);
            # plain directories made by an unprivileged unpack carry them too, which only an
            # unprivileged daemon needs to look for.
            marked = override_xattr_of(fd)
            rootless, xattr = (True, marked) if marked else (os.geteuid() != 0, OVERRIDE_XATTR)
        return cls(name or os.fspath(path), os.fspath(path), fd, rootless, overlay_form, xattr)

    def duplicate(self) -> "Layer":
        """The same layer on a new fd, for a view with a life of its own."""
        return Layer(self.name, self.path, os.dup(self.root_fd), self.rootless, self.overlay_form,
                     self.override_xattr)

    def override(self, dir_fd: int, name: bytes, st: os.stat_result) -> Override | None:
        """The owner and mode an entry really has, where this layer keeps them in an xattr.

        Only an entry of this process's user (or root) may claim another owner: a user xattr is
        anyone's to set on their own files, and would otherwise make them setuid root.
        """
        if not self.rootless or st.st_uid not in (0, os.geteuid()):
            return None
        return read_override(dir_fd, name, self.override_xattr)

    def close(self) -> None:
        os.close(self.root_fd)

    def describe(self) -> dict:
        """What ``which``/``explain`` need to read the layer exactly as the mount does."""
        return {"name": self.name, "path": self.path, "overlay_form": self.overlay_form}

    def is_whiteout(self, st: os.stat_result) -> bool:
        """Whether an entry of this layer is an overlayfs whiteout rather than a file of its own."""
        return self.overlay_form and is_overlay_whiteout(st)

    def open_dir(self, relpath: bytes) -> int | None:
        """An fd of the layer's copy of a directory, or None where it has none."""
        try:
            return safepath.open_beneath(self.root_fd, relpath, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def lstat(self, relpath: bytes) -> os.stat_result | None:
        """lstat of a path beneath the layer root, or None where the layer has nothing there."""
        parent, name = safepath.split_parent(relpath)
        try:
            fd = safepath.open_beneath(self.root_fd, parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return None   # a parent that is missing, no directory, or leads outside
        try:
            return os.stat(name or b".", dir_fd=fd, follow_symlinks=False)
        except OSError:
            return None
        finally:
            os.close(fd)

    def scan(self, dir_fd: int) -> DirListing:
        """This layer's copy of a directory, classified (names only: the merge stats just the winners)."""
        listing = DirListing()
        overlay_form, entries, add = self.overlay_form, listing.entries, listing.add
        # Per name on the first lookup in a directory: os.fsencode's checks, and a call per
        # plain name, were a fifth of the scan.
        with os.scandir(dir_fd) as scan:
            for entry in scan:
                name = entry.name.encode(_FS_ENCODING, _FS_ERRORS)
                if entry.is_file(follow_symlinks=False):
                    is_dir = False
                elif entry.is_dir(follow_symlinks=False):
                    is_dir = True
                elif overlay_form and _is_overlay_whiteout(entry):
                    listing.whiteouts.add(name)
                    continue
                else:
                    is_dir = False
                if name.startswith(WHITEOUT_PREFIX_BYTES):
                    add(name, is_dir)      # an OCI marker
                else:
                    entries[name] = is_dir
        if overlay_form and not listing.opaque:
            listing.opaque = is_overlay_opaque(dir_fd)
        return listing

    def is_opaque_dir(self, parent_fd: int, name: bytes) -> bool:
        """Whether this layer's directory ``name`` (in ``parent_fd``) is opaque, in either of its forms:
        known before the directory is listed, so it is never served as merged with what it hides."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        except OSError:
            return False
        try:
            try:
                os.stat(OPAQUE_MARKER_BYTES, dir_fd=fd, follow_symlinks=False)
                return True
            except FileNotFoundError:
                pass
            return self.overlay_form and is_overlay_opaque(fd)
        finally:
            os.close(fd)

    def listing_of(self, relpath: bytes) -> DirListing | None:
        """The classified copy of one directory, or None where the layer has none."""
        fd = self.open_dir(relpath)
        if fd is None:
            return None
        try:
            return self.scan(fd)
        finally:
            os.close(fd)


def layers_from_store(stored_layers) -> list[Layer]:
    """Open store layers (given bottom first, as images list them) as a top-first stack."""
    return [Layer.open(Path(layer.path), layer.diff_id, rootless=layer.rootless, overlay_form=False)
            for layer in reversed(stored_layers)]


class ParentFd:
    """Context manager: (fd of the entry's parent dir in a layer, entry name)."""

    def __init__(self, layer: Layer, relpath: bytes):
        self.layer, self.relpath = layer, relpath

    def __enter__(self) -> tuple[int, bytes]:
        parent, name = safepath.split_parent(self.relpath)
        if not name:
            # The root: its "parent" is the layer root fd and "." names it.
            self.fd = os.dup(self.layer.root_fd)
            return self.fd, b"."
        self.fd = safepath.open_beneath(self.layer.root_fd, parent, os.O_RDONLY | os.O_DIRECTORY)
        return self.fd, name

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def paths_of_inode(layer: Layer, host_ino: int) -> list[bytes]:
    """Every path in a layer naming one inode (the project's one walk: iterative, never following symlinks)."""
    return [os.fsencode(entry.relpath) for entry in fstree.walk(layer.root_fd)
            if not entry.is_dir and entry.stat.st_ino == host_ino]


def regular_file(fd: int) -> int:
    """The fd if it is a regular file (O_NONBLOCK then cleared); otherwise closed, and EIO."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EIO, "a layer file changed type behind the mount")
    os.set_blocking(fd, True)
    return fd


def _is_overlay_whiteout(entry: os.DirEntry) -> bool:
    """A char device 0/0, for an entry that d_type says is no file or directory."""
    if entry.is_symlink():
        return False
    return is_overlay_whiteout(entry.stat(follow_symlinks=False))

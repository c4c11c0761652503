"""What an upper layer changed: a ``docker diff`` listing, and the upper as an OCI layer tar.

The upper is already a layer in the making (whiteouts, opaque markers), so
both are walks of it; the lowers are consulted only to tell "added" from
"changed".
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from .. import fstree
from ..errors import LayermountError
from ..layerform import (HIDDEN_XATTR_PREFIXES, OPAQUE_MARKER, WHITEOUT_PREFIX, is_overlay_opaque,
                        whiteout_target)
from ..overlay import Layer, MergedView
from ..safepath import fd_path

ADDED, CHANGED, DELETED = "A", "C", "D"


@dataclass(frozen=True)
class Change:
    kind: str      # "A", "C" or "D", as docker diff prints them
    path: str      # absolute, as seen in the container

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


@dataclass(frozen=True)
class UpperEntry:
    """One entry of an upper dir, classified."""

    relpath: str
    kind: str          # "entry", "whiteout" or "opaque" (the marker of its directory)
    is_dir: bool


def walk_upper(upper: str) -> Iterator[UpperEntry]:
    """Every entry of an upper in either whiteout form, parents before children, sorted."""
    for entry, _ in _classified(upper):
        yield entry


def _classified(upper: str) -> Iterator[tuple[UpperEntry, fstree.Entry]]:
    """The upper's entries, each with the walk's entry it came from (fds to read it by, never a path)."""
    with _reading(upper):
        root_fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for found in fstree.walk(root_fd):
            name, relpath, st = found.name, found.relpath, found.stat
            prefix = os.path.dirname(relpath)
            if name == OPAQUE_MARKER:
                yield UpperEntry(prefix, "opaque", True), found
            elif (target := whiteout_target(name)) is not None:
                yield UpperEntry(f"{prefix}/{target}" if prefix else target, "whiteout", False), found
            elif name.startswith(WHITEOUT_PREFIX):
                continue
            elif stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                yield UpperEntry(relpath, "whiteout", False), found
            elif found.is_dir:
                yield UpperEntry(relpath, "entry", True), found
                if is_overlay_opaque(found.fd):
                    yield UpperEntry(relpath, "opaque", True), found
            else:
                yield UpperEntry(relpath, "entry", False), found
    finally:
        os.close(root_fd)


def changes(upper: str, lowers: list[str]) -> list[Change]:
    """The upper's changes against its lowers (top first), as ``docker diff`` lists them."""
    view = MergedView([Layer.open(path, overlay_form=True) for path in lowers]) if lowers else None
    try:
        found: dict[str, str] = {}
        with _reading(upper):
            entries = list(walk_upper(upper))
        for entry in entries:
            path = "/" + entry.relpath
            if entry.kind == "whiteout":
                if view is None or _in_lowers(view, entry.relpath):
                    found[path] = DELETED
            elif entry.kind == "opaque":
                for hidden in _lower_children(view, entry.relpath):
                    found.setdefault(f"{path}/{hidden}", DELETED)
            else:
                found[path] = CHANGED if view is not None and _in_lowers(view, entry.relpath) else ADDED
        # A re-added name under an opaque dir is new content, not a deletion.
        return [Change(kind, path) for path, kind in sorted(found.items())]
    finally:
        if view is not None:
            view.close()


@contextlib.contextmanager
def _reading(upper: str):
    """An upper that cannot be read, or changes under the walk, is one line naming the entry at fault."""
    try:
        yield
    except OSError as exc:
        where = f"{os.fsdecode(exc.filename)}: " if exc.filename else ""
        raise LayermountError(f"upper {upper}: {where}{exc.strerror or exc}") from None


def _in_lowers(view: MergedView, relpath: str) -> bool:
    _, child = view.resolve(os.fsencode(relpath))
    return child is not None


def _lower_children(view: MergedView | None, relpath: str) -> list[str]:
    if view is None:
        return []
    parent, child = view.resolve(os.fsencode(relpath))
    if child is None or not child.attr.is_dir:
        return []
    node = view.node_of(parent, child)
    return sorted(os.fsdecode(name) for name in view.listing(node))


def write_layer_tar(upper: str, out: BinaryIO) -> None:
    """The upper as an OCI layer tar: whiteouts as ``.wh.`` markers, owners, modes, times, xattrs, hardlinks.

    Everything is read through the walk's directory fds with O_NOFOLLOW: a
    user of the mount who swaps a directory for a symlink while a big file is
    being tarred gets an error or the upper's own files, never the host's.
    """
    with _reading(upper), tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        seen_inodes: dict[tuple[int, int], str] = {}
        for entry, found in _classified(upper):
            if entry.kind == "whiteout":
                parent, name = os.path.split(entry.relpath)
                tar.addfile(_marker(os.path.join(parent, WHITEOUT_PREFIX + name)))
            elif entry.kind == "opaque":
                tar.addfile(_marker(os.path.join(entry.relpath, OPAQUE_MARKER)))
            else:
                _add_entry(tar, found, seen_inodes)


def _marker(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    return info


_TAR_TYPES = {stat.S_IFREG: tarfile.REGTYPE, stat.S_IFDIR: tarfile.DIRTYPE, stat.S_IFLNK: tarfile.SYMTYPE,
              stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE, stat.S_IFIFO: tarfile.FIFOTYPE}


def _add_entry(tar: tarfile.TarFile, found: fstree.Entry, seen_inodes: dict) -> None:
    st = found.stat
    kind = _TAR_TYPES.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        return   # a socket: tar has no type for it (as tar itself skips them)
    info = tarfile.TarInfo(found.relpath)
    info.type, info.mode, info.uid, info.gid = kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    info.mtime = st.st_mtime_ns // 10**9
    # Exact to the nanosecond (a float mtime would round), as PAX allows.
    info.pax_headers["mtime"] = f"{st.st_mtime_ns // 10**9}.{st.st_mtime_ns % 10**9:09d}"
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    if kind == tarfile.SYMTYPE:
        info.linkname = os.readlink(found.name, dir_fd=found.dir_fd)
    if kind == tarfile.REGTYPE and st.st_nlink > 1:
        key = (st.st_dev, st.st_ino)
        if key in seen_inodes:
            info.type, info.linkname = tarfile.LNKTYPE, seen_inodes[key]
            info.pax_headers.update(_xattrs(fd_path(found.dir_fd, os.fsencode(found.name))))
            tar.addfile(info)
            return
        seen_inodes[key] = found.relpath
    if kind != tarfile.REGTYPE:
        target = fd_path(found.fd) if found.fd is not None else fd_path(found.dir_fd, os.fsencode(found.name))
        info.pax_headers.update(_xattrs(target))
        tar.addfile(info)
        return
    fd = os.open(found.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=found.dir_fd)
    with os.fdopen(fd, "rb") as data:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise fstree.TreeChanged(found.relpath, "a file was replaced")
        info.size = now.st_size if now.st_size < st.st_size else st.st_size
        info.pax_headers.update(_xattrs(fd_path(fd)))
        tar.addfile(info, data)


def _xattrs(path: bytes) -> dict[str, str]:
    """The entry's own xattrs as PAX headers (ours and overlayfs' left out); ``path`` is never followed."""
    found = {}
    for key in os.listxattr(path, follow_symlinks=False):
        if not os.fsencode(key).startswith(HIDDEN_XATTR_PREFIXES):
            found["SCHILY.xattr." + key] = os.getxattr(path, key, follow_symlinks=False).decode(
                "utf-8", "surrogateescape")
    return found

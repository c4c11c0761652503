"""What an upper layer changed: a ``docker diff`` listing, and the upper as an OCI layer tar.

The upper is already a layer in the making (whiteouts, opaque markers), so
both are walks of it; the lowers are consulted only to tell "added" from
"changed".
"""

from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from .layerform import (HIDDEN_XATTR_PREFIXES, OPAQUE_MARKER, WHITEOUT_PREFIX, is_overlay_opaque,
                        is_overlay_whiteout, whiteout_target)
from .overlay import Layer, MergedView

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
    root_fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield from _walk(root_fd, "")
    finally:
        os.close(root_fd)


def _walk(dir_fd: int, prefix: str) -> Iterator[UpperEntry]:
    if is_overlay_opaque(dir_fd) and prefix:
        yield UpperEntry(prefix, "opaque", True)
    for name in sorted(os.listdir(dir_fd)):
        relpath = f"{prefix}/{name}" if prefix else name
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if name == OPAQUE_MARKER:
            yield UpperEntry(prefix, "opaque", True)
        elif (target := whiteout_target(name)) is not None:
            yield UpperEntry(f"{prefix}/{target}" if prefix else target, "whiteout", False)
        elif name.startswith(WHITEOUT_PREFIX):
            continue
        elif is_overlay_whiteout(st):
            yield UpperEntry(relpath, "whiteout", False)
        elif stat.S_ISDIR(st.st_mode):
            yield UpperEntry(relpath, "entry", True)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                yield from _walk(child, relpath)
            finally:
                os.close(child)
        else:
            yield UpperEntry(relpath, "entry", False)


def changes(upper: str, lowers: list[str]) -> list[Change]:
    """The upper's changes against its lowers (top first), as ``docker diff`` lists them."""
    view = MergedView([Layer.open(path, overlay_form=True) for path in lowers]) if lowers else None
    try:
        found: dict[str, str] = {}
        for entry in walk_upper(upper):
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
    """The upper as an OCI layer tar: whiteouts as ``.wh.`` markers, owners, modes, times, xattrs, hardlinks."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        seen_inodes: dict[tuple[int, int], str] = {}
        for entry in walk_upper(upper):
            if entry.kind == "whiteout":
                parent, name = os.path.split(entry.relpath)
                tar.addfile(_marker(os.path.join(parent, WHITEOUT_PREFIX + name)))
            elif entry.kind == "opaque":
                tar.addfile(_marker(os.path.join(entry.relpath, OPAQUE_MARKER)))
            else:
                _add_entry(tar, upper, entry.relpath, seen_inodes)


def _marker(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    return info


def _add_entry(tar: tarfile.TarFile, upper: str, relpath: str, seen_inodes: dict) -> None:
    path = os.path.join(upper, relpath)
    st = os.lstat(path)
    info = tar.gettarinfo(path, arcname=relpath)
    info.uname = info.gname = ""
    # Exact to the nanosecond (a float mtime would round), as PAX allows.
    info.pax_headers["mtime"] = f"{st.st_mtime_ns // 10**9}.{st.st_mtime_ns % 10**9:09d}"
    xattrs = {}
    for key in os.listxattr(path, follow_symlinks=False):
        if not os.fsencode(key).startswith(HIDDEN_XATTR_PREFIXES):
            xattrs["SCHILY.xattr." + key] = os.getxattr(path, key, follow_symlinks=False).decode(
                "utf-8", "surrogateescape")
    info.pax_headers.update(xattrs)
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        key = (st.st_dev, st.st_ino)
        if key in seen_inodes:
            info.type, info.linkname, info.size = tarfile.LNKTYPE, seen_inodes[key], 0
            tar.addfile(info)
            return
        seen_inodes[key] = relpath
    if info.isreg():
        with open(path, "rb") as data:
            tar.addfile(info, data)
    else:
        tar.addfile(info)

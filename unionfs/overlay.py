"""The merged view of a layer stack: nodes, cached directory listings, attributes.

Lower layers never change, so a directory's merged listing is built once
(each layer's copy scanned once, the rules of ``whiteout.merge`` applied) and
kept while the kernel holds the directory; a lookup is then one dict access,
whether the image has 2 layers or 200.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from . import safepath
from .whiteout import DirListing, merge

OVERRIDE_XATTR = "user.containers.override_stat"
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
PROVENANCE_XATTR = b"user.layermount.layer"
STACK_XATTR = b"user.layermount.stack"
PID_XATTR = b"user.layermount.pid"
# Never shown through the mount: our bookkeeping and the kernel overlay's.
HIDDEN_XATTR_PREFIXES = (b"user.containers.override_stat", b"trusted.overlay.", b"user.overlay.", b"user.layermount.")
ROOT_INODE = 1
# Host inode numbers are reused as st_ino (stable, hardlinks agree for free);
# what does not fit below this bound, or lives on another device, is numbered here.
_DIRECT_INO_LIMIT = 1 << 48


@dataclass
class Layer:
    """One read-only layer directory, held open by fd so paths resolve beneath it."""

    name: str                 # the diff_id for store layers, the directory for -o lowerdir
    path: str
    root_fd: int
    rootless: bool            # owner and special modes live in the override xattr
    overlay_form: bool        # may hold overlayfs-style whiteouts (char 0/0, opaque xattr)

    @classmethod
    def open(cls, path: str | os.PathLike, name: str | None = None, *, rootless: bool | None = None,
             overlay_form: bool = True) -> "Layer":
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if rootless is None:
            # Plain directories made by an unprivileged unpack carry override
            # xattrs; only an unprivileged daemon needs to look for them.
            rootless = os.geteuid() != 0
        return cls(name or os.fspath(path), os.fspath(path), fd, rootless, overlay_form)

    def close(self) -> None:
        os.close(self.root_fd)


class Attr:
    """The attributes served for an entry: the lower's lstat, corrected by any override xattr."""

    __slots__ = ("mode", "uid", "gid", "size", "nlink", "rdev", "atime_ns", "mtime_ns", "ctime_ns",
                 "blocks", "host_dev", "host_ino")

    def __init__(self, st: os.stat_result, override: bytes | None = None):
        self.mode, self.uid, self.gid = st.st_mode, st.st_uid, st.st_gid
        self.size, self.nlink, self.rdev = st.st_size, st.st_nlink, st.st_rdev
        self.atime_ns, self.mtime_ns, self.ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        self.blocks = st.st_blocks
        self.host_dev, self.host_ino = st.st_dev, st.st_ino
        if override:
            self._apply_override(override)

    def _apply_override(self, value: bytes) -> None:
        """``uid:gid:0MODE[:major:minor]``, as containers/storage and fuse-overlayfs write it."""
        try:
            fields = value.decode().split(":")
            uid, gid, mode = int(fields[0]), int(fields[1]), int(fields[2], 8)
        except (ValueError, IndexError, UnicodeDecodeError):
            return
        self.uid, self.gid = uid, gid
        file_type = stat.S_IFMT(mode) or stat.S_IFMT(self.mode)
        self.mode = file_type | stat.S_IMODE(mode)
        if stat.S_ISCHR(file_type) or stat.S_ISBLK(file_type):
            if len(fields) >= 5:
                self.rdev = os.makedev(int(fields[3]), int(fields[4]))
            self.size = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class Child:
    """One visible name in a merged directory: the layers behind it and its attributes."""

    __slots__ = ("name", "sources", "attr")

    def __init__(self, name: bytes, sources: tuple[int, ...], attr: Attr):
        self.name = name
        self.sources = sources   # layer indexes, top first; several only for a merged directory
        self.attr = attr


class Node:
    """An inode the kernel knows: where it sits in the tree and what it merges."""

    __slots__ = ("ino", "parent", "name", "sources", "attr", "lookups", "listing")

    def __init__(self, ino: int, parent: "Node | None", name: bytes, sources: tuple[int, ...], attr: Attr):
        self.ino = ino
        self.parent = parent
        self.name = name
        self.sources = sources
        self.attr = attr
        self.lookups = 0
        self.listing: dict[bytes, Child] | None = None

    @property
    def relpath(self) -> bytes:
        """The path below each layer root; computed, so a rename can never leave it stale."""
        parts = []
        node = self
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return b"/".join(reversed(parts))

    @property
    def winner(self) -> int:
        return self.sources[0]


class MergedView:
    """The layer stack (top first) seen as one tree."""

    def __init__(self, layers: list[Layer]):
        if not layers:
            raise ValueError("a merged view needs at least one layer")
        self.layers = layers
        self._ino_of_host: dict[tuple[int, int], int] = {}
        self._next_ino = _DIRECT_INO_LIMIT
        self._direct_dev = os.fstat(layers[0].root_fd).st_dev
        root_attr = self._root_attr()
        self.root = Node(ROOT_INODE, None, b"", tuple(range(len(layers))), root_attr)
        self.root.lookups = 1
        self.nodes: dict[int, Node] = {ROOT_INODE: self.root}

    def close(self) -> None:
        for layer in self.layers:
            layer.close()

    def _root_attr(self) -> Attr:
        top = self.layers[0]
        return Attr(os.stat(top.root_fd), _read_override(top, top.root_fd, b".") if top.rootless else None)

    # ---- inode numbers ------------------------------------------------------
    def ino_for(self, attr: Attr) -> int:
        """st_ino from the host's: stable for the mount's life, shared by hardlinks."""
        if attr.host_dev == self._direct_dev and 1 < attr.host_ino < _DIRECT_INO_LIMIT:
            return attr.host_ino
        key = (attr.host_dev, attr.host_ino)
        ino = self._ino_of_host.get(key)
        if ino is None:
            ino = self._ino_of_host[key] = self._next_ino
            self._next_ino += 1
        return ino

    # ---- directory listings ------------------------------------------------
    def listing(self, node: Node) -> dict[bytes, Child]:
        if node.listing is None:
            node.listing = self._build_listing(node)
        return node.listing

    def _build_listing(self, node: Node) -> dict[bytes, Child]:
        relpath = node.relpath
        fds: list[int | None] = []
        try:
            listings: list[DirListing | None] = []
            scans: list[dict[bytes, os.DirEntry] | None] = []
            for index in node.sources:
                fd, listing, entries = self._scan_layer_dir(self.layers[index], relpath)
                fds.append(fd)
                listings.append(listing)
                scans.append(entries)
            children: dict[bytes, Child] = {}
            for name, entry in merge(listings).items():
                position = entry.sources[0]
                layer = self.layers[node.sources[position]]
                dir_entry = scans[position][name]
                override = _read_override(layer, fds[position], name) if layer.rootless else None
                attr = Attr(dir_entry.stat(follow_symlinks=False), override)
                children[name] = Child(name, tuple(node.sources[p] for p in entry.sources), attr)
            return children
        finally:
            for fd in fds:
                if fd is not None:
                    os.close(fd)

    def _scan_layer_dir(self, layer: Layer, relpath: bytes):
        """One layer's copy of a directory, classified; (None, None, None) where it has none."""
        try:
            fd = safepath.open_beneath(layer.root_fd, relpath, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            return None, None, None
        entries: dict[bytes, os.DirEntry] = {}
        names: dict[str, bool] = {}
        overlay_whiteouts: list[str] = []
        with os.scandir(fd) as scan:
            for entry in scan:
                name = entry.name
                if layer.overlay_form and _is_overlay_whiteout(entry):
                    overlay_whiteouts.append(name)
                    continue
                names[name] = entry.is_dir(follow_symlinks=False)
                entries[os.fsencode(name)] = entry
        listing = DirListing.from_names(names)
        listing.whiteouts.update(overlay_whiteouts)
        if layer.overlay_form and not listing.opaque:
            listing.opaque = _is_overlay_opaque(fd)
        listing.entries = {os.fsencode(name): is_dir for name, is_dir in listing.entries.items()}
        listing.whiteouts = {os.fsencode(name) for name in listing.whiteouts}
        return fd, listing, entries

    # ---- nodes -------------------------------------------------------------
    def lookup(self, parent: Node, name: bytes) -> Node | None:
        """The node for ``name`` in ``parent``, counting one kernel reference."""
        child = self.listing(parent).get(name)
        if child is None:
            return None
        return self.remember(parent, child)

    def remember(self, parent: Node, child: Child) -> Node:
        ino = self.ino_for(child.attr)
        node = self.nodes.get(ino)
        if node is None:
            node = self.nodes[ino] = Node(ino, parent, child.name, child.sources, child.attr)
        node.lookups += 1
        return node

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(ino)
        if node is None or ino == ROOT_INODE:
            return
        node.lookups -= count
        if node.lookups <= 0:
            del self.nodes[ino]

    def node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise OSError(2, "stale inode") from None

    # ---- content -----------------------------------------------------------
    def open_file(self, node: Node, flags: int) -> int:
        layer = self.layers[node.winner]
        return safepath.open_beneath(layer.root_fd, node.relpath, flags | os.O_NOFOLLOW)

    def readlink(self, node: Node) -> bytes:
        with self._parent_fd(node) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    def xattr_names(self, node: Node) -> list[bytes]:
        with self._parent_fd(node) as (fd, name):
            names = os.listxattr(safepath.fd_path(fd, name), follow_symlinks=False)
        return [encoded for encoded in map(os.fsencode, names) if not encoded.startswith(HIDDEN_XATTR_PREFIXES)]

    def xattr(self, node: Node, name: bytes) -> bytes:
        if name == PROVENANCE_XATTR:
            return self.layers[node.winner].name.encode()
        if node is self.root and name == STACK_XATTR:
            return json.dumps([{"name": layer.name, "path": layer.path} for layer in self.layers]).encode()
        if node is self.root and name == PID_XATTR:
            return str(os.getpid()).encode()
        if name.startswith(HIDDEN_XATTR_PREFIXES):
            raise OSError(61, "no such attribute")  # ENODATA
        with self._parent_fd(node) as (fd, entry):
            return os.getxattr(safepath.fd_path(fd, entry), os.fsdecode(name), follow_symlinks=False)

    def _parent_fd(self, node: Node):
        return _ParentFd(self.layers[node.winner], node.relpath)

    def statfs_path(self) -> str:
        return self.layers[0].path


class _ParentFd:
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


def _read_override(layer: Layer, dir_fd: int, name: bytes) -> bytes | None:
    try:
        return os.getxattr(safepath.fd_path(dir_fd, name), OVERRIDE_XATTR, follow_symlinks=False)
    except OSError:
        return None


def _is_overlay_whiteout(entry: os.DirEntry) -> bool:
    """A char device 0/0; d_type rules out the common kinds without a stat."""
    if entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False) or entry.is_symlink():
        return False
    st = entry.stat(follow_symlinks=False)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_overlay_opaque(fd: int) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(fd, name) == b"y":
                return True
        except OSError:
            continue
    return False


def layers_from_store(stored_layers, *, top_first: bool = True) -> list[Layer]:
    """Open store layers (given bottom first, as images list them) as a top-first stack."""
    ordered = list(reversed(stored_layers)) if top_first else list(stored_layers)
    return [Layer.open(Path(layer.path), layer.diff_id, rootless=layer.rootless, overlay_form=False)
            for layer in ordered]

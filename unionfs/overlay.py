"""The merged view of a layer stack: nodes, cached directory listings, attributes, copy-up.

Lower layers never change, so a directory's merged listing is built once
(each layer's copy scanned once, the rules of ``whiteout.merge`` applied) and
kept while the kernel holds the directory; a lookup is then one dict access,
whether the image has 2 layers or 200. Changes go to the upper layer (index 0
when there is one) and update the cached listings in place.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from . import safepath
from .upper import StagedCopy, UpperLayer, read_xattrs, remove_tree_at
from .whiteout import WHITEOUT_PREFIX, DirListing, merge

OVERRIDE_XATTR = "user.containers.override_stat"
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
PROVENANCE_XATTR = b"user.layermount.layer"
STACK_XATTR = b"user.layermount.stack"
PID_XATTR = b"user.layermount.pid"
# Never shown through the mount: our bookkeeping and the kernel overlay's.
HIDDEN_XATTR_PREFIXES = (b"user.containers.override_stat", b"trusted.overlay.", b"user.overlay.", b"user.layermount.")
ROOT_INODE = 1
UPPER = 0
# Host inode numbers are reused as st_ino (stable, hardlinks agree for free);
# what does not fit below this bound, or lives on another device, is numbered here.
_DIRECT_INO_LIMIT = 1 << 48


@dataclass
class Layer:
    """One layer directory, held open by fd so paths resolve beneath it."""

    name: str                 # the diff_id for store layers, the directory for -o lowerdir, "upper"
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
    """The attributes served for an entry: the layer's lstat, corrected by any override xattr."""

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

    __slots__ = ("name", "sources", "attr", "reply")

    def __init__(self, name: bytes, sources: tuple[int, ...], attr: Attr):
        self.name = name
        self.sources = sources   # layer indexes, top first; several only for a merged directory
        self.attr = attr
        self.reply = None        # the FUSE attributes, built once while the entry lives in lower layers

    @property
    def in_upper(self) -> bool:
        return self.sources[0] == UPPER

    @property
    def is_merged_dir(self) -> bool:
        return self.attr.is_dir and len(self.sources) > 1


class Node:
    """An inode the kernel knows: where it sits in the tree; its Child says what it is."""

    __slots__ = ("ino", "parent", "child", "others", "lookups", "listing", "lower_names", "unlinked")

    def __init__(self, ino: int, parent: "Node | None", child: Child):
        self.ino = ino
        self.parent = parent
        self.child = child
        self.lookups = 0
        self.listing: dict[bytes, Child] | None = None
        # Names the lower layers show here; removing one of them needs a whiteout.
        self.lower_names: set[bytes] = set()
        self.unlinked = False
        # A hardlinked file is one node under several names; the others wait here
        # so the node still has a path when its first name goes.
        self.others: list[tuple[Node, Child]] = []

    def attach(self, parent: "Node", child: Child) -> None:
        """Record that the kernel reached this node as ``child`` in ``parent``."""
        if self.child is child or self.unlinked:
            self.parent, self.child, self.unlinked = parent, child, False
            return
        for index, (_, other) in enumerate(self.others):
            if other is child:
                self.others[index] = (parent, child)
                return
        self.others.append((parent, child))

    def detach(self, child: Child) -> None:
        """One of the node's names is gone."""
        if self.child is child:
            if self.others:
                self.parent, self.child = self.others.pop()
            else:
                self.unlinked = True
        else:
            self.others = [(parent, other) for parent, other in self.others if other is not child]

    @property
    def name(self) -> bytes:
        return self.child.name

    @property
    def sources(self) -> tuple[int, ...]:
        return self.child.sources

    @property
    def attr(self) -> Attr:
        return self.child.attr

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
    """The layer stack seen as one tree.

    Layer indexes are fixed for the mount's life: 0 is the upper (None on a
    read-only mount), 1 … n the lower layers, top first.
    """

    def __init__(self, lowers: list[Layer], upper: UpperLayer | None = None):
        if not lowers:
            raise ValueError("a merged view needs at least one lower layer")
        self.upper = upper
        upper_layer = Layer("upper", upper.path, upper.root_fd, False, True) if upper is not None else None
        self.layers: list[Layer | None] = [upper_layer] + list(lowers)
        self._ino_of_host: dict[tuple[int, int], int] = {}
        self._retired: set[tuple[int, int]] = set()
        self._next_ino = _DIRECT_INO_LIMIT
        self._direct_dev = os.fstat(lowers[-1].root_fd).st_dev
        present = tuple(index for index, layer in enumerate(self.layers) if layer is not None)
        top = self.layers[present[0]]
        root_attr = Attr(os.stat(top.root_fd), _read_override(top, top.root_fd, b".") if top.rootless else None)
        self.root = Node(ROOT_INODE, None, Child(b"", present, root_attr))
        self.root.lookups = 1
        self.nodes: dict[int, Node] = {ROOT_INODE: self.root}

    @property
    def writable(self) -> bool:
        return self.upper is not None

    def close(self) -> None:
        for layer in self.layers[1:]:
            layer.close()
        if self.upper is not None:
            self.upper.close()

    def stack(self) -> list[Layer]:
        """The layers present, top first."""
        return [layer for layer in self.layers if layer is not None]

    # ---- inode numbers ------------------------------------------------------
    def ino_for(self, attr: Attr) -> int:
        """st_ino from the host's: stable for the mount's life, shared by hardlinks.

        A host inode number freed in the upper may be reused by the host for a new
        file while the kernel still holds the old one; such numbers are retired
        and the new file gets one of ours.
        """
        key = (attr.host_dev, attr.host_ino)
        ino = self._ino_of_host.get(key)
        if ino is not None:
            return ino
        if (attr.host_dev == self._direct_dev and 1 < attr.host_ino < _DIRECT_INO_LIMIT
                and key not in self._retired):
            return attr.host_ino
        ino = self._ino_of_host[key] = self._next_ino
        self._next_ino += 1
        return ino

    def _keep_ino(self, old: Attr, new: Attr) -> None:
        """After a copy-up the host inode changes; the served st_ino must not."""
        self._ino_of_host[(new.host_dev, new.host_ino)] = self.ino_for(old)

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
            if node.parent is None:
                # Kernel overlayfs (so Docker's overlay2 and containerd too) never lets a layer's
                # root be opaque: an opaque marker there hides nothing.
                for listing in listings:
                    if listing is not None:
                        listing.opaque = False
            opaque_at = next((p for p, listing in enumerate(listings) if listing is not None and listing.opaque), None)
            if opaque_at is not None and opaque_at + 1 < len(node.sources):
                # An opaque copy ends the directory: what lies below it never contributes.
                node.child.sources = node.sources[:opaque_at + 1]
                listings, scans = listings[:opaque_at + 1], scans[:opaque_at + 1]
            children: dict[bytes, Child] = {}
            for name, entry in merge(listings).items():
                position = entry.sources[0]
                layer = self.layers[node.sources[position]]
                dir_entry = scans[position][name]
                override = _read_override(layer, fds[position], name) if layer.rootless else None
                attr = Attr(dir_entry.stat(follow_symlinks=False), override)
                children[name] = Child(name, tuple(node.sources[p] for p in entry.sources), attr)
            if node.sources[0] == UPPER:
                node.lower_names = set(merge(listings[1:])) if len(listings) > 1 else set()
            elif self.upper is not None:
                node.lower_names = set(children)
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
            listing.opaque = is_overlay_opaque(fd)
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

    def node_of(self, parent: Node, child: Child) -> Node:
        """The node for a child, registered or not; counts no reference."""
        if child.in_upper:
            self.refresh(child, parent)
        ino = self.ino_for(child.attr)
        node = self.nodes.get(ino)
        if node is None:
            return Node(ino, parent, child)
        node.attach(parent, child)
        return node

    def remember(self, parent: Node, child: Child) -> Node:
        node = self.node_of(parent, child)
        if node.ino not in self.nodes:
            self.nodes[node.ino] = node
        node.attach(parent, child)
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

    def refresh(self, child: Child, parent: Node | None) -> Attr:
        """Upper entries change: their attributes are read afresh, never cached."""
        if child.in_upper:
            relpath = (parent.relpath + b"/" + child.name).lstrip(b"/") if parent is not None else b""
            try:
                if relpath:
                    dir_path, name = safepath.split_parent(relpath)
                    fd = safepath.open_beneath(self.upper.root_fd, dir_path, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    finally:
                        os.close(fd)
                else:
                    st = os.stat(self.upper.root_fd)
            except FileNotFoundError:
                return child.attr
            child.attr = Attr(st)
        return child.attr

    def attr(self, node: Node) -> Attr:
        if node.unlinked:
            return node.attr
        return self.refresh(node.child, node.parent)

    # ---- content -----------------------------------------------------------
    def open_file(self, node: Node, flags: int) -> int:
        """Open a node's file. O_NONBLOCK: a layer changed behind our back (a FIFO where a file
        was) must not block the daemon's one thread; anything but a regular file is refused."""
        layer = self.layers[node.winner]
        fd = safepath.open_beneath(layer.root_fd, node.relpath, flags | os.O_NOFOLLOW | os.O_NONBLOCK)
        return _regular_file(fd)

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
            return json.dumps([{"name": layer.name, "path": layer.path} for layer in self.stack()]).encode()
        if node is self.root and name == PID_XATTR:
            return str(os.getpid()).encode()
        if name.startswith(HIDDEN_XATTR_PREFIXES):
            raise OSError(61, "no such attribute")  # ENODATA
        with self._parent_fd(node) as (fd, entry):
            return os.getxattr(safepath.fd_path(fd, entry), os.fsdecode(name), follow_symlinks=False)

    def _parent_fd(self, node: Node, layer_index: int | None = None):
        return _ParentFd(self.layers[node.winner if layer_index is None else layer_index], node.relpath)

    def statfs_path(self) -> str:
        return self.stack()[0].path

    # ---- copy-up -------------------------------------------------------------
    def _writable(self) -> UpperLayer:
        if self.upper is None:
            raise OSError(30, "read-only file system")  # EROFS
        return self.upper

    def upper_dir_fd(self, node: Node) -> int:
        """An fd of ``node``'s directory in the upper, copying it (and its parents) up first."""
        self.copy_up_dir(node)
        return self._writable().open_dir(node.relpath)

    def copy_up_dir(self, node: Node) -> None:
        """Make a directory (and every missing parent, outermost first) exist in the upper."""
        missing = []
        while not node.child.in_upper:
            missing.append(node)
            node = node.parent
        upper = self._writable() if missing else None
        for directory in reversed(missing):
            with self._parent_fd(directory) as (lower_fd, name):
                xattrs = read_xattrs(lower_fd, name, HIDDEN_XATTR_PREFIXES)
            parent_fd = upper.open_dir(directory.parent.relpath)
            try:
                upper.make_dir_like(parent_fd, directory.name, directory.attr, xattrs)
            finally:
                os.close(parent_fd)
            self._became_upper(directory, (UPPER,) + directory.sources)

    def copy_up(self, node: Node, *, with_data: bool = True) -> None:
        """Bring a non-directory into the upper, atomically, keeping its st_ino."""
        staged = self.stage_copy_up(node, with_data=with_data)
        if staged is not None:
            try:
                staged.run()
            except BaseException:
                staged.discard()
                raise
            self.finish_copy_up(node, staged)

    def stage_copy_up(self, node: Node, *, with_data: bool = True) -> StagedCopy | None:
        """First half of a copy-up: parents made, the copy started in the work dir.

        Returns None when nothing is left to do: already in the upper, or a
        symlink or special file, which is created whole at once.
        """
        if node.child.in_upper:
            return None
        upper = self._writable()
        self.copy_up_dir(node.parent)
        with self._parent_fd(node) as (lower_fd, name):
            xattrs = read_xattrs(lower_fd, name, HIDDEN_XATTR_PREFIXES)
            served = node.attr   # owner and mode as served, override xattrs applied
            if stat.S_ISREG(served.mode):
                data_fd = _regular_file(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                                                dir_fd=lower_fd))
                try:
                    return upper.stage_file(data_fd, served, xattrs, with_data=with_data)
                except BaseException:
                    os.close(data_fd)
                    raise
            target = os.readlink(name, dir_fd=lower_fd) if stat.S_ISLNK(served.mode) else None
        parent_fd = upper.open_dir(node.parent.relpath)
        try:
            upper.copy_special_in(parent_fd, node.name, served, target, xattrs)
        finally:
            os.close(parent_fd)
        self._became_upper(node, (UPPER,))
        return None

    def finish_copy_up(self, node: Node, staged: StagedCopy) -> None:
        """Second half: rename the complete copy into the node's place (wherever that is now)."""
        if node.child.in_upper or node.unlinked:
            staged.discard()
            return
        parent_fd = self.upper_dir_fd(node.parent)
        try:
            staged.publish(parent_fd, node.name)
        finally:
            os.close(parent_fd)
        lower, lower_index = node.attr, node.winner
        self._became_upper(node, (UPPER,))
        if lower.nlink > 1:
            self._copy_up_other_names(node, lower, lower_index)

    def _copy_up_other_names(self, node: Node, lower: Attr, layer_index: int) -> None:
        """Hardlinks stay hardlinks: every merged name of the same lower file is linked to the copy.

        Kernel overlayfs needs index=on for this; here the layer is searched for
        the file's other names once, at its copy-up, so the upper itself records
        the links and a remount or a commit keeps them.
        """
        for relpath in _paths_of_inode(self.layers[layer_index], lower.host_ino):
            if relpath == node.relpath:
                continue
            parent, child = self.resolve(relpath)
            if child is None or child.in_upper or child.sources[0] != layer_index:
                continue
            if (child.attr.host_dev, child.attr.host_ino) != (lower.host_dev, lower.host_ino):
                continue
            source_fd, source_name = self.upper_path_of(node)
            try:
                dest_fd = self.upper_dir_fd(parent)
                try:
                    os.link(source_name, child.name, src_dir_fd=source_fd, dst_dir_fd=dest_fd,
                            follow_symlinks=False)
                finally:
                    os.close(dest_fd)
            finally:
                os.close(source_fd)
            child.sources = (UPPER,)
            self.refresh(child, parent)

    def resolve(self, relpath: bytes) -> tuple[Node | None, Child | None]:
        """(parent node, child) of a path in the merged view; the child is None if not visible."""
        node = self.root
        *dirs, last = relpath.split(b"/")
        for part in dirs:
            child = self.listing(node).get(part)
            if child is None or not child.attr.is_dir:
                return None, None
            node = self.node_of(node, child)
        return node, self.listing(node).get(last)

    def copy_up_tree(self, node: Node) -> None:
        """Everything below a directory into the upper: the price of renaming a lower directory.

        A loop with its own stack, so a tree of any depth can be moved.
        """
        pending, copied = [node], []
        while pending:
            directory = pending.pop()
            self.copy_up_dir(directory)
            copied.append(directory)
            for child in list(self.listing(directory).values()):
                child_node = self.node_of(directory, child)
                if child.attr.is_dir:
                    pending.append(child_node)
                else:
                    self.copy_up(child_node)
        for directory in copied:
            # Each directory now holds all it shows: nothing below may add to it.
            fd = self._writable().open_dir(directory.relpath)
            try:
                self.upper.make_opaque(fd)
            finally:
                os.close(fd)
            directory.child.sources = (UPPER,)
            directory.lower_names = set()

    def _became_upper(self, node: Node, sources: tuple[int, ...]) -> None:
        old = node.attr
        node.child.sources = sources
        self.refresh(node.child, node.parent)
        self._keep_ino(old, node.attr)

    # ---- namespace changes --------------------------------------------------
    def _check_name(self, name: bytes) -> None:
        if name.startswith(WHITEOUT_PREFIX.encode()):
            raise OSError(22, "names starting with .wh. are reserved for whiteouts")  # EINVAL
        if len(name) > 255:
            raise OSError(36, "name too long")  # ENAMETOOLONG

    def _prepare_entry(self, parent: Node, name: bytes) -> int:
        """The parent's upper dir fd, ready for a new ``name`` (no whiteout left in the way)."""
        self._check_name(name)
        if name in self.listing(parent):
            raise OSError(17, "exists")  # EEXIST
        fd = self.upper_dir_fd(parent)
        try:
            self.upper.remove_whiteout(fd, name)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _added(self, parent: Node, name: bytes, dir_fd: int) -> Node:
        child = Child(name, (UPPER,), Attr(os.stat(name, dir_fd=dir_fd, follow_symlinks=False)))
        self.listing(parent)[name] = child
        return self.remember(parent, child)

    def create(self, parent: Node, name: bytes, mode: int, flags: int, uid: int, gid: int) -> tuple[Node, int]:
        fd = self._prepare_entry(parent, name)
        try:
            file_fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                              stat.S_IMODE(mode), dir_fd=fd)
            os.fchown(file_fd, uid, self._new_gid(parent, gid))
            os.fchmod(file_fd, stat.S_IMODE(mode))
            return self._added(parent, name, fd), file_fd
        finally:
            os.close(fd)

    def mkdir(self, parent: Node, name: bytes, mode: int, uid: int, gid: int) -> Node:
        fd = self._prepare_entry(parent, name)
        try:
            upper = self.upper
            temp = upper.temp_name()
            os.mkdir(temp, 0o700, dir_fd=upper.work_fd)
            new_fd = os.open(temp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=upper.work_fd)
            try:
                if name in parent.lower_names:
                    upper.make_opaque(new_fd)   # a new directory shows nothing of an old one below
                os.fchown(new_fd, uid, self._new_gid(parent, gid))
                setgid = stat.S_ISGID if parent.attr.mode & stat.S_ISGID else 0
                os.fchmod(new_fd, stat.S_IMODE(mode) | setgid)
            finally:
                os.close(new_fd)
            os.rename(temp, name, src_dir_fd=upper.work_fd, dst_dir_fd=fd)
            node = self._added(parent, name, fd)
            node.listing, node.lower_names = {}, set()
            return node
        finally:
            os.close(fd)

    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Node:
        fd = self._prepare_entry(parent, name)
        try:
            os.mknod(name, mode, rdev, dir_fd=fd)
            os.chown(name, uid, self._new_gid(parent, gid), dir_fd=fd, follow_symlinks=False)
            return self._added(parent, name, fd)
        finally:
            os.close(fd)

    def symlink(self, parent: Node, name: bytes, target: bytes, uid: int, gid: int) -> Node:
        fd = self._prepare_entry(parent, name)
        try:
            os.symlink(target, name, dir_fd=fd)
            os.chown(name, uid, self._new_gid(parent, gid), dir_fd=fd, follow_symlinks=False)
            return self._added(parent, name, fd)
        finally:
            os.close(fd)

    def link(self, node: Node, new_parent: Node, new_name: bytes) -> Node:
        self.copy_up(node)
        fd = self._prepare_entry(new_parent, new_name)
        try:
            source_fd = self.upper_dir_fd(node.parent)
            try:
                os.link(node.name, new_name, src_dir_fd=source_fd, dst_dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(source_fd)
            return self._added(new_parent, new_name, fd)
        finally:
            os.close(fd)

    def _new_gid(self, parent: Node, gid: int) -> int:
        """Files in a setgid directory take its group, as on any Unix filesystem."""
        return parent.attr.gid if parent.attr.mode & stat.S_ISGID else gid

    def unlink(self, parent: Node, name: bytes) -> None:
        child = self.listing(parent).get(name)
        if child is None:
            raise OSError(2, "no such entry")
        if child.attr.is_dir:
            raise OSError(21, "is a directory")  # EISDIR
        self._remove(parent, child)

    def rmdir(self, parent: Node, name: bytes) -> None:
        child = self.listing(parent).get(name)
        if child is None:
            raise OSError(2, "no such entry")
        if not child.attr.is_dir:
            raise OSError(20, "not a directory")  # ENOTDIR
        node = self.node_of(parent, child)
        if self.listing(node):
            raise OSError(39, "directory not empty")  # ENOTEMPTY
        self._remove(parent, child)

    def _remove(self, parent: Node, child: Child) -> None:
        """Drop an entry: its upper copy goes, and a whiteout hides any lower one."""
        fd = self.upper_dir_fd(parent)
        try:
            if child.in_upper:
                remove_tree_at(fd, child.name)
            if child.name in parent.lower_names:
                self.upper.make_whiteout(fd, child.name)
        finally:
            os.close(fd)
        del self.listing(parent)[child.name]
        self._orphan(parent, child)

    def _orphan(self, parent: Node, child: Child) -> None:
        node = self.nodes.get(self.ino_for(child.attr))
        if node is not None:
            node.detach(child)
        if child.in_upper and (child.attr.is_dir or child.attr.nlink <= 1):
            # Its host inode is gone; the host may hand the number to a new file.
            key = (child.attr.host_dev, child.attr.host_ino)
            self._ino_of_host.pop(key, None)
            self._retired.add(key)

    def rename(self, parent: Node, name: bytes, new_parent: Node, new_name: bytes, flags: int) -> None:
        source = self.listing(parent).get(name)
        if source is None:
            raise OSError(2, "no such entry")
        self._check_name(new_name)
        target = self.listing(new_parent).get(new_name)
        if flags & _RENAME_EXCHANGE:
            if target is None:
                raise OSError(2, "no such entry")
            self._exchange(parent, source, new_parent, target)
            return
        if target is not None:
            if flags & _RENAME_NOREPLACE:
                raise OSError(17, "exists")
            if target is source or self.ino_for(target.attr) == self.ino_for(source.attr):
                return  # hardlinks of one file: rename(2) does nothing
            if source.attr.is_dir and not target.attr.is_dir:
                raise OSError(20, "not a directory")
            if not source.attr.is_dir and target.attr.is_dir:
                raise OSError(21, "is a directory")
            if target.attr.is_dir:
                target_node = self.node_of(new_parent, target)
                if self.listing(target_node):
                    raise OSError(39, "directory not empty")
        node = self.node_of(parent, source)
        self._copy_up_whole(node)
        old_fd = self.upper_dir_fd(parent)
        try:
            new_fd = self.upper_dir_fd(new_parent)
            try:
                if target is not None and target.in_upper and target.attr.is_dir:
                    emptied = _open_child_dir(new_fd, new_name)
                    try:
                        self.upper.clear_markers(emptied)
                    finally:
                        os.close(emptied)
                self.upper.remove_whiteout(new_fd, new_name)
                if source.attr.is_dir and new_name in new_parent.lower_names:
                    # Before the move, so a failure leaves nothing half done.
                    moved = _open_child_dir(old_fd, name)
                    try:
                        self.upper.make_opaque(moved)
                    finally:
                        os.close(moved)
                if name in parent.lower_names and not (parent is new_parent and name == new_name):
                    self.upper.rename_leaving_whiteout(old_fd, name, new_fd, new_name)
                else:
                    os.rename(name, new_name, src_dir_fd=old_fd, dst_dir_fd=new_fd)
            finally:
                os.close(new_fd)
        finally:
            os.close(old_fd)
        del self.listing(parent)[name]
        if target is not None:
            self._orphan(new_parent, target)
        self._moved(source, new_parent, new_name)

    def _moved(self, child: Child, new_parent: Node, new_name: bytes) -> None:
        """A child now lives at ``new_name`` in ``new_parent``, in the upper; its node follows."""
        child.name, child.sources = new_name, (UPPER,)
        self.listing(new_parent)[new_name] = child
        node = self.nodes.get(self.ino_for(child.attr))
        if node is not None:
            node.attach(new_parent, child)
        self.refresh(child, new_parent)

    def _copy_up_whole(self, node: Node) -> None:
        """What a rename moves must live wholly in the upper (kernel overlayfs says EXDEV instead)."""
        if not node.attr.is_dir:
            self.copy_up(node)
        elif node.child.is_merged_dir or not node.child.in_upper:
            self.copy_up_tree(node)

    def _exchange(self, parent: Node, first: Child, new_parent: Node, second: Child) -> None:
        nodes = []
        for owner, child in ((parent, first), (new_parent, second)):
            node = self.node_of(owner, child)
            self._copy_up_whole(node)
            nodes.append(node)
        old_fd = self.upper_dir_fd(parent)
        try:
            new_fd = self.upper_dir_fd(new_parent)
            try:
                safepath.rename_exchange(old_fd, first.name, new_fd, second.name)
                for fd, name, owner in ((new_fd, second.name, new_parent), (old_fd, first.name, parent)):
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode) and name in owner.lower_names:
                        moved = _open_child_dir(fd, name)
                        try:
                            self.upper.make_opaque(moved)
                        finally:
                            os.close(moved)
            finally:
                os.close(new_fd)
        finally:
            os.close(old_fd)
        first_name, second_name = first.name, second.name
        self._moved(first, new_parent, second_name)
        self._moved(second, parent, first_name)

    # ---- attribute changes ------------------------------------------------------
    def upper_path_of(self, node: Node) -> tuple[int, bytes]:
        """(upper parent dir fd, name) of a node, copying it up first; caller closes the fd."""
        if node.attr.is_dir:
            self.copy_up_dir(node)
        else:
            self.copy_up(node)
        if node.parent is None:
            return os.dup(self.upper.root_fd), b"."
        return self.upper.open_dir(node.parent.relpath), node.name


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


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _open_child_dir(dir_fd: int, name: bytes) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _paths_of_inode(layer: Layer, host_ino: int) -> list[bytes]:
    """Every path in a layer naming one inode (a walk of the layer, never following symlinks)."""
    found = []
    for dir_path, _, file_names, dir_fd in os.fwalk(".", dir_fd=layer.root_fd):
        for name in file_names:
            try:
                if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino == host_ino:
                    found.append(os.fsencode(os.path.normpath(os.path.join(dir_path, name))))
            except FileNotFoundError:
                continue
    return found


def _read_override(layer: Layer, dir_fd: int, name: bytes) -> bytes | None:
    try:
        return os.getxattr(safepath.fd_path(dir_fd, name), OVERRIDE_XATTR, follow_symlinks=False)
    except OSError:
        return None


def _regular_file(fd: int) -> int:
    """The fd if it is a regular file (O_NONBLOCK then cleared); otherwise closed, and EIO."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(5, "a layer file changed type behind the mount")   # EIO
    os.set_blocking(fd, True)
    return fd


def _is_overlay_whiteout(entry: os.DirEntry) -> bool:
    """A char device 0/0; d_type rules out the common kinds without a stat."""
    if entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False) or entry.is_symlink():
        return False
    st = entry.stat(follow_symlinks=False)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_overlay_opaque(fd: int) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(fd, name) == b"y":
                return True
        except OSError:
            continue
    return False


def layers_from_store(stored_layers) -> list[Layer]:
    """Open store layers (given bottom first, as images list them) as a top-first stack."""
    return [Layer.open(Path(layer.path), layer.diff_id, rootless=layer.rootless, overlay_form=False)
            for layer in reversed(stored_layers)]

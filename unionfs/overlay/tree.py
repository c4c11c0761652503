"""The merged tree: each directory's listing built once from its layers' copies, lookups, fresh upper attributes.

Lower layers never change, so a directory's merged listing is built once
(each layer's copy scanned once, the rules of ``merge`` applied) and kept
while the kernel holds the directory; a lookup is then one dict access,
whether the image has 2 layers or 200. Changes update the cached listings
in place (``changes``, ``copyup``).
"""

from __future__ import annotations

import errno
import os
from typing import NamedTuple

from .. import safepath
from .inodes import InodeTable
from .layers import Layer
from .merge import DirListing, merge
from .nodes import UPPER, Attr, Child, Node


NAME_MAX = 255
_FIRST_COPY = (0,)      # the copy a name comes from, as merge's positions say, when there is one copy


def check_name_length(name: bytes) -> None:
    """A name longer than any layer can hold is ENAMETOOLONG, never a mere ENOENT (as on the host)."""
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name too long")


class _Copy(NamedTuple):
    """One layer's copy of the directory being listed."""

    layer_index: int
    fd: int
    listing: DirListing


class Tree:
    """Listings and lookups over a fixed stack: ``layers[0]`` the upper (or None), then the lowers."""

    def __init__(self, layers: list[Layer | None], inodes: InodeTable):
        self.layers = layers
        self.inodes = inodes
        present = tuple(index for index, layer in enumerate(layers) if layer is not None)
        top = layers[present[0]]
        st = os.stat(top.root_fd)
        self.root = inodes.make_root(Child(b"", present, Attr(st, top.override(top.root_fd, b".", st))))

    # ---- listings -------------------------------------------------------------
    def listing(self, node: Node) -> dict[bytes, Child]:
        if node.listing is None:
            node.listing = self._build_listing(node)
        return node.listing

    def _build_listing(self, node: Node) -> dict[bytes, Child]:
        copies: list[_Copy] = []
        try:
            for index in node.sources:
                layer = self.layers[index]
                fd = layer.open_dir(node.relpath)
                if fd is not None:
                    copies.append(_Copy(index, fd, layer.scan(fd)))
            if node.parent is None:
                # Kernel overlayfs (so Docker's overlay2 and containerd too) never lets a layer's
                # root be opaque: an opaque marker there hides nothing.
                for copy in copies:
                    copy.listing.opaque = False
            opaque_at = next((p for p, copy in enumerate(copies) if copy.listing.opaque), None)
            if opaque_at is not None:
                # An opaque copy ends the directory: what lies below it never contributes.
                copies = copies[:opaque_at + 1]
                cut = node.sources.index(copies[-1].layer_index) + 1
                node.child.sources = node.sources[:cut]
            return self._children(node, copies)
        finally:
            for copy in copies:
                os.close(copy.fd)

    def _children(self, node: Node, copies: list[_Copy]) -> dict[bytes, Child]:
        listings = [copy.listing for copy in copies]
        children: dict[bytes, Child] = {}
        # Per copy: its fd, its layer (rootless ones keep owners in an xattr), and the one-layer
        # sources tuple most children share (one object, not one per child).
        sides = [(copy.fd, self.layers[copy.layer_index], (copy.layer_index,)) for copy in copies]
        if len(copies) == 1:
            # One layer has the directory (most do): its names are the listing, nothing to merge.
            positions = dict.fromkeys(listings[0].entries, _FIRST_COPY)
        else:
            positions = {name: entry.sources for name, entry in merge(listings).items()}
        stat = os.stat
        for name, sources in positions.items():
            fd, layer, alone = sides[sources[0]]
            st = stat(name, dir_fd=fd, follow_symlinks=False)
            attr = Attr(st, layer.override(fd, name, st)) if layer.rootless else Attr(st)
            if len(sources) > 1:
                alone = self._down_to_opaque(copies, sources, name)
            children[name] = Child(name, alone, attr)
        if node.sources[0] == UPPER:
            node.lower_names = set(merge([copy.listing for copy in copies if copy.layer_index != UPPER]))
        elif self.layers[UPPER] is not None:
            node.lower_names = set(children)
        return children

    def _down_to_opaque(self, copies: list[_Copy], positions: tuple[int, ...], name: bytes) -> tuple[int, ...]:
        """The layers of a child, ending at its first opaque copy (nlink and copy-up tell merged from not)."""
        sources = tuple(copies[p].layer_index for p in positions)
        for count, position in enumerate(positions[:-1], 1):
            if self.layers[copies[position].layer_index].is_opaque_dir(copies[position].fd, name):
                return sources[:count]
        return sources

    # ---- attributes -------------------------------------------------------------
    def refresh(self, child: Child, parent: Node | None) -> Attr:
        """Upper entries change: their attributes are read afresh, never cached."""
        if child.in_upper:
            upper = self.layers[UPPER]
            upper_fd = upper.root_fd
            relpath = (parent.relpath + b"/" + child.name).lstrip(b"/") if parent is not None else b""
            try:
                if relpath:
                    dir_path, name = safepath.split_parent(relpath)
                    fd = safepath.open_beneath(upper_fd, dir_path, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        override = upper.override(fd, name, st)
                    finally:
                        os.close(fd)
                else:
                    st = os.stat(upper_fd)
                    override = upper.override(upper_fd, b".", st)
            except FileNotFoundError:
                return child.attr
            child.attr = Attr(st, override)
        return child.attr

    def attr(self, node: Node) -> Attr:
        if node.unlinked:
            return node.attr
        return self.refresh(node.child, node.parent)

    # ---- lookups -------------------------------------------------------------------
    def node_of(self, parent: Node, child: Child) -> Node:
        """The node for a child, registered or not; counts no reference."""
        if child.in_upper:
            self.refresh(child, parent)
        return self.inodes.node_of(parent, child)

    def remember(self, parent: Node, child: Child) -> Node:
        """The node for a child, counting one kernel reference (a lookup or a readdirplus reply)."""
        if child.in_upper:
            self.refresh(child, parent)
        return self.inodes.remember(parent, child)

    def lookup(self, parent: Node, name: bytes) -> Node | None:
        """The node for ``name`` in ``parent`` ("." and ".." too), counting one kernel reference."""
        if name in (b".", b".."):
            node = parent if name == b"." else parent.parent or parent
            node.lookups += 1
            return node
        check_name_length(name)
        child = self.listing(parent).get(name)
        if child is None:
            return None
        return self.remember(parent, child)

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

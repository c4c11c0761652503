"""Time travel: ``/.layers/N`` is the image as it stood after build step N, and the router of inodes to views.

Each cut is its own merged view (the same merge, stopped at layer N) with its
own inode numbers, told apart from the live view's by their tag. ``/.layers``
is found by name but never listed in ``/``, so a container's root is not
polluted; the short diff_id of each layer is a symlink to its number. A
handler asks ``ViewRouter.locate`` once which view owns an inode.
"""

from __future__ import annotations

import errno
import stat

from .inodes import LAYERS_DIR_INO, TAG_BASE, VIRTUAL_TAG, alias_ino, alias_number, view_number, view_tag
from .nodes import Node
from .view import MergedView

LAYERS_NAME = b".layers"
VIRTUAL_BASE = view_tag(VIRTUAL_TAG)     # inodes are 64 bits: every one from here up is virtual


class LayerCuts:
    """The views behind /.layers, made on first visit."""

    def __init__(self, main: MergedView):
        self.main = main
        self.count = len(main.layers) - 1           # lower layers; index 0 is the upper slot
        self._views: dict[int, MergedView] = {}
        names: list[tuple[bytes, int, bytes | None]] = [(str(n).encode(), n, None) for n in range(1, self.count + 1)]
        for number in range(1, self.count + 1):
            name = self.main.layers[self.count - number + 1].name
            if name.startswith("sha256:"):
                names.append((name[7:19].encode(), number, str(number).encode()))
        self.entries = names          # (name, layer number, symlink target or None)

    def view(self, number: int) -> MergedView:
        if number not in self._views:
            lowers = [self.main.layers[self.count - n + 1].duplicate() for n in range(number, 0, -1)]
            self._views[number] = MergedView(lowers, number=number)
        return self._views[number]

    def entry(self, name: bytes) -> tuple[int, bytes | None] | None:
        for entry_name, number, target in self.entries:
            if entry_name == name:
                return number, target
        return None

    def close(self) -> None:
        for view in self._views.values():
            view.close()


class ViewRouter:
    """Which view owns an inode: the live one, a ``/.layers`` cut, or ``/.layers`` itself (virtual)."""

    def __init__(self, live: MergedView, layers_dir: bool = True):
        self.live = live
        self.cuts = LayerCuts(live) if layers_dir else None

    def close(self) -> None:
        if self.cuts is not None:
            self.cuts.close()

    def locate(self, inode: int) -> tuple[MergedView, Node]:
        if inode < TAG_BASE:            # the live view's: most requests, so one comparison
            return self.live, self.live.node(inode)
        number = view_number(inode)
        if self.cuts is None or not 1 <= number <= self.cuts.count:
            raise OSError(errno.ENOENT, "no such layer")
        view = self.cuts.view(number)
        return view, view.node(inode)

    def changing(self, *inodes: int) -> MergedView:
        """The view a change touching ``inodes`` goes to: the live one; ``/.layers`` is history, read-only."""
        if any(view_number(inode) != 0 for inode in inodes):
            raise OSError(errno.EROFS, "/.layers is read-only")
        return self.live

    def forget(self, inode: int, count: int) -> bool:
        """Whether the kernel now holds the inode no more."""
        number = view_number(inode)
        if number == 0:
            return self.live.forget(inode, count)
        if self.cuts is not None and 1 <= number <= self.cuts.count:
            return self.cuts.view(number).forget(inode, count)
        return True

    # ---- /.layers itself ---------------------------------------------------------------
    def is_virtual(self, inode: int) -> bool:
        return inode >= VIRTUAL_BASE and self.cuts is not None

    def is_layers_dir(self, inode: int) -> bool:
        return self.cuts is not None and inode == LAYERS_DIR_INO

    def layers_dir_at(self, parent: Node, name: bytes) -> int | None:
        """The inode of ``/.layers`` when that is what a failed lookup in the live root asked for."""
        if self.cuts is not None and parent is self.live.root and name == LAYERS_NAME:
            return LAYERS_DIR_INO
        return None

    def lookup_virtual(self, parent_inode: int, name: bytes) -> int | MergedView:
        """A name in ``/.layers``: an alias (its inode) or a cut (whose root the kernel now holds)."""
        found = self.cuts.entry(name) if parent_inode == LAYERS_DIR_INO else None
        if found is None:
            raise OSError(errno.ENOENT, "no such layer")
        number, target = found
        if target is not None:
            return alias_ino(number)
        view = self.cuts.view(number)
        view.hold_root()
        return view

    def layers_dir_item(self, index: int) -> tuple[bytes, int | MergedView] | None:
        """Entry ``index`` of ``/.layers`` (None past the end): its name and an alias inode or a cut."""
        if index >= len(self.cuts.entries):
            return None
        name, number, target = self.cuts.entries[index]
        return name, alias_ino(number) if target is not None else self.cuts.view(number)

    def virtual_shape(self, inode: int) -> tuple[int, int, int]:
        """(mode, nlink, size) of ``/.layers`` (a directory) or one of its aliases (symlinks)."""
        if inode == LAYERS_DIR_INO:
            return stat.S_IFDIR | 0o555, 2 + self.cuts.count, 0
        return stat.S_IFLNK | 0o777, 1, len(self.alias_target(inode) or b"")

    def alias_target(self, inode: int) -> bytes | None:
        number = alias_number(inode)
        return str(number).encode() if 1 <= number <= self.cuts.count else None

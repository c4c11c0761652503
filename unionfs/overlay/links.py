"""Link counts as the merged view has them: the names a fresh unpack of the merged tree would give a file.

A lower file's own count is its layer's: a name a later layer deleted or
shadowed, or one deleted through the mount, still counts there. So the names
of each multiply-linked inode are found once per layer (one walk, on the
first stat of such a file) and counted where they still lead to that file.
Upper files need none of this: a copy-up links every merged name of the file.
"""

from __future__ import annotations

import os

from .nodes import UPPER, Attr
from .tree import Tree


class LinkCounts:
    """st_nlink of the view's non-directories."""

    def __init__(self, tree: Tree):
        self.tree = tree
        self._names_by_layer: dict[int, dict[int, list[bytes]]] = {}
        # Counts found since the last change of names: a directory of 10,000 names of one file
        # is then one count, not 10,000 for each entry listed.
        self._counted: dict[tuple[int, int], int] = {}

    def names_changed(self) -> None:
        """A name came, went or moved (or a file was copied up): the counts are found afresh."""
        self._counted.clear()

    def count(self, attr: Attr, layer_index: int, *, unlinked: bool = False) -> int:
        """The merged names of a file whose copy in ``layer_index`` is described by ``attr``."""
        if layer_index == UPPER or attr.is_dir:
            return attr.nlink
        if attr.nlink <= 1:
            return 0 if unlinked else attr.nlink
        key = (layer_index, attr.host_ino)
        count = self._counted.get(key)
        if count is None:
            names = self._names(layer_index).get(attr.host_ino, ())
            count = self._counted[key] = sum(self._leads_to(relpath, attr, layer_index) for relpath in names)
        return count

    def _leads_to(self, relpath: bytes, attr: Attr, layer_index: int) -> bool:
        _, child = self.tree.resolve(relpath)
        return (child is not None and child.sources[0] == layer_index
                and (child.attr.host_dev, child.attr.host_ino) == (attr.host_dev, attr.host_ino))

    def _names(self, layer_index: int) -> dict[int, list[bytes]]:
        names = self._names_by_layer.get(layer_index)
        if names is None:
            names = self._names_by_layer[layer_index] = linked_names(self.tree.layers[layer_index])
        return names


def linked_names(layer) -> dict[int, list[bytes]]:
    """Every path of each multiply-linked non-directory in a layer: a loop with its own stack (any depth),
    directories opened beneath the layer root, symlinks never followed."""
    found: dict[int, list[bytes]] = {}
    pending = [b""]
    while pending:
        relpath = pending.pop()
        fd = layer.open_dir(relpath)
        if fd is None:
            continue
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    path = os.path.join(relpath, os.fsencode(entry.name))
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(path)
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if st.st_nlink > 1:
                        found.setdefault(st.st_ino, []).append(path)
        finally:
            os.close(fd)
    return found

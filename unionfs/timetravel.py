"""``/.layers/N``: the image as it stood after build step N, read-only, beside the live root.

Each cut is its own merged view (the same merge, stopped at layer N) with its
own inode numbers, told apart from the live view's by a tag in the top byte.
``/.layers`` is found by name but never listed in ``/``, so a container's root
is not polluted; the short diff_id of each layer is a symlink to its number.
"""

from __future__ import annotations

import os

from .overlay import Layer, MergedView

TAG_SHIFT = 56
TAG_BASE = 1 << TAG_SHIFT
LAYERS_NAME = b".layers"
VIRTUAL_TAG = 0xFF
LAYERS_DIR_INO = (VIRTUAL_TAG << TAG_SHIFT) | 1


class LayerCuts:
    """The views behind /.layers, made on first visit."""

    def __init__(self, main: MergedView):
        self.main = main
        self.count = len(main.layers) - 1           # lower layers; index 0 is the upper slot
        self._views: dict[int, MergedView] = {}
        names: list[tuple[bytes, int, bytes | None]] = [(str(n).encode(), n, None) for n in range(1, self.count + 1)]
        for number in range(1, self.count + 1):
            name = self._layer(number).name
            if name.startswith("sha256:"):
                names.append((name[7:19].encode(), number, str(number).encode()))
        self.entries = names          # (name, layer number, symlink target or None)

    def _layer(self, number: int) -> Layer:
        return self.main.layers[self.count - number + 1]

    def view(self, number: int) -> MergedView:
        if number not in self._views:
            lowers = [Layer(layer.name, layer.path, os.dup(layer.root_fd), layer.rootless, layer.overlay_form)
                      for layer in (self._layer(n) for n in range(number, 0, -1))]
            self._views[number] = MergedView(lowers)
        return self._views[number]

    def entry(self, name: bytes) -> tuple[int, bytes | None] | None:
        for entry_name, number, target in self.entries:
            if entry_name == name:
                return number, target
        return None

    @staticmethod
    def is_tagged(inode: int) -> bool:
        return inode >= TAG_BASE

    @staticmethod
    def split(inode: int) -> tuple[int, int]:
        return inode >> TAG_SHIFT, inode & (TAG_BASE - 1)

    @staticmethod
    def tag(number: int) -> int:
        return number << TAG_SHIFT

    def alias_ino(self, number: int) -> int:
        return (VIRTUAL_TAG << TAG_SHIFT) | (1 + number)

    def alias_target(self, inode: int) -> bytes | None:
        _, local = self.split(inode)
        number = local - 1
        return str(number).encode() if 1 <= number <= self.count else None

    def close(self) -> None:
        for view in self._views.values():
            view.close()

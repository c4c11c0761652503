"""The top-down merge rules, as pure functions over one directory's listings (names are bytes).

Kept apart from FUSE and from the disk so the rules (OCI image-spec layer.md,
kernel overlayfs) can be read and tested on their own; which names are
markers is layerform's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from ..layerform import OPAQUE_MARKER_BYTES, WHITEOUT_PREFIX_BYTES, whiteout_target_bytes


@dataclass
class DirListing:
    """One layer's copy of one directory, already classified.

    ``entries`` maps each visible name to whether it is a directory;
    ``whiteouts`` names what this layer hides below it; ``opaque`` says the
    layers below contribute nothing to this directory.
    """

    entries: dict[bytes, bool] = field(default_factory=dict)
    whiteouts: set[bytes] = field(default_factory=set)
    opaque: bool = False

    @classmethod
    def from_names(cls, names: dict[bytes, bool]) -> "DirListing":
        """Classify raw names (OCI marker form) into entries, whiteouts and opacity."""
        listing = cls()
        for name, is_dir in names.items():
            listing.add(name, is_dir)
        return listing

    def add(self, name: bytes, is_dir: bool) -> None:
        """One raw name of the layer's directory, OCI markers (every ``.wh.`` name) recognised."""
        if not name.startswith(WHITEOUT_PREFIX_BYTES):
            self.entries[name] = is_dir
        elif name == OPAQUE_MARKER_BYTES:
            self.opaque = True
        elif (target := whiteout_target_bytes(name)) is not None:
            self.whiteouts.add(target)


class MergedEntry(NamedTuple):
    """A visible name and the listings (indexes, top first) whose copy makes it.

    A non-directory comes from exactly one listing. A directory merges the
    copy that wins with every same-named directory below it, down to a
    whiteout, a non-directory or an opaque copy.
    """

    name: bytes
    is_dir: bool
    sources: tuple[int, ...]

    @property
    def winner(self) -> int:
        return self.sources[0]


def contributing(listings: list[DirListing | None]) -> list[int]:
    """Indexes of the listings that make up a directory: down to the first opaque one."""
    used = []
    for index, listing in enumerate(listings):
        if listing is None:
            continue
        used.append(index)
        if listing.opaque:
            break
    return used


def merge(listings: list[DirListing | None]) -> dict[bytes, MergedEntry]:
    """Merge one directory's copies, top layer first; None marks a layer without it.

    A whiteout or opaque marker applies only to the layers below its own, so a
    layer may both whiteout and re-add a name.
    """
    used = contributing(listings)
    merged: dict[bytes, MergedEntry] = {}
    hidden: set[bytes] = set()
    last = len(used) - 1
    for position, index in enumerate(used):
        listing = listings[index]
        alone = (index,)
        below = used[position:] if position < last else None
        for name, is_dir in listing.entries.items():
            if name in hidden:
                continue
            sources = alone
            if is_dir and below is not None:
                sources += _lower_dir_copies(name, listings, below)
            merged[name] = MergedEntry(name, is_dir, sources)
        if below is not None:
            hidden |= listing.whiteouts
            hidden |= listing.entries.keys()
    return merged


def _lower_dir_copies(name: bytes, listings: list[DirListing | None], used: list[int]) -> tuple[int, ...]:
    """Same-named directories below used[0] that merge into it."""
    found: list[int] = []
    for above, index in zip(used, used[1:]):
        if name in listings[above].whiteouts:
            break
        kind = listings[index].entries.get(name)
        if kind is None:
            continue
        if not kind:
            break
        found.append(index)
    return tuple(found)

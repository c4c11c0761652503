"""OCI whiteout naming and the top-down merge rules, as pure functions over listings.

Kept apart from FUSE so the rules (OCI image-spec layer.md, kernel overlayfs)
can be read and tested on their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
# Names like .wh..wh.plnk belong to the AUFS era: never shown, never meaningful.
META_PREFIX = ".wh..wh."


def whiteout_name(name: str) -> str:
    """The marker file that hides ``name`` in the layers below."""
    return WHITEOUT_PREFIX + name


def whiteout_target(name: str) -> str | None:
    """The name a ``.wh.`` marker hides, or None if ``name`` is no plain whiteout."""
    if name.startswith(META_PREFIX) or not name.startswith(WHITEOUT_PREFIX):
        return None
    target = name[len(WHITEOUT_PREFIX):]
    return target if target not in ("", ".", "..") else None


def is_hidden_name(name: str) -> bool:
    """Whiteout and opaque markers are never visible in a merged view."""
    return name.startswith(WHITEOUT_PREFIX)


@dataclass
class DirListing:
    """One layer's copy of one directory, already classified.

    ``entries`` maps each visible name to whether it is a directory;
    ``whiteouts`` names what this layer hides below it; ``opaque`` says the
    layers below contribute nothing to this directory.
    """

    entries: dict[str, bool] = field(default_factory=dict)
    whiteouts: set[str] = field(default_factory=set)
    opaque: bool = False

    @classmethod
    def from_names(cls, names: dict[str, bool]) -> "DirListing":
        """Classify raw names (OCI marker form) into entries, whiteouts and opacity."""
        listing = cls()
        for name, is_dir in names.items():
            if name == OPAQUE_MARKER:
                listing.opaque = True
            elif (target := whiteout_target(name)) is not None:
                listing.whiteouts.add(target)
            elif not is_hidden_name(name):
                listing.entries[name] = is_dir
        return listing


@dataclass(frozen=True)
class MergedEntry:
    """A visible name and the listings (indexes, top first) whose copy makes it.

    A non-directory comes from exactly one listing. A directory merges the
    copy that wins with every same-named directory below it, down to a
    whiteout, a non-directory or an opaque copy.
    """

    name: str
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


def merge(listings: list[DirListing | None]) -> dict[str, MergedEntry]:
    """Merge one directory's copies, top layer first; None marks a layer without it.

    A whiteout or opaque marker applies only to the layers below its own, so a
    layer may both whiteout and re-add a name.
    """
    used = contributing(listings)
    merged: dict[str, MergedEntry] = {}
    hidden: set[str] = set()
    for position, index in enumerate(used):
        listing = listings[index]
        for name, is_dir in listing.entries.items():
            if name in merged or name in hidden:
                continue
            sources = [index]
            if is_dir:
                sources += _lower_dir_copies(name, listings, used[position:])
            merged[name] = MergedEntry(name, is_dir, tuple(sources))
        hidden |= listing.whiteouts
        hidden |= listing.entries.keys()
    return merged


def _lower_dir_copies(name: str, listings: list[DirListing | None], used: list[int]) -> list[int]:
    """Same-named directories below used[0] that merge into it."""
    found = []
    for above, index in zip(used, used[1:]):
        if name in listings[above].whiteouts:
            break
        kind = listings[index].entries.get(name)
        if kind is None:
            continue
        if not kind:
            break
        found.append(index)
    return found

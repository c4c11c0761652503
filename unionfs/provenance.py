"""Provenance, for people learning layers: which layers have a path, what the lookup saw, what hid what."""

from __future__ import annotations

import datetime
import os
import stat
from dataclasses import dataclass

from .errors import UsageError
from .layerform import whiteout_name
from .overlay import Layer, MergedView

UPPER_NAME = "upper"      # the name the mount gives its upper in its stack


@dataclass
class LayerVerdict:
    """What one layer says about a path."""

    index: int            # 1 = bottom layer, as in build steps
    name: str
    has: str | None       # "file", "directory", "symlink", ... or None
    note: str             # "wins", "hidden by ...", "whiteout", ...


def open_stack(stack: list[dict]) -> MergedView:
    """The mount's layers, read in the marker form the mount reads each in (its stack xattr says)."""
    return MergedView([Layer.open(entry["path"], entry["name"], overlay_form=entry.get("overlay_form", True))
                       for entry in stack])


def cut_stack(stack: list[dict], number: int) -> list[dict]:
    """The stack of ``/.layers/N``: the bottom N lower layers, no upper (as the mount's cut has them)."""
    lowers = [entry for entry in stack if entry["name"] != UPPER_NAME]
    if not 1 <= number <= len(lowers):
        raise UsageError(f"the image has no build step {number}")
    return lowers[len(lowers) - number:]


def explain_path(stack: list[dict], relpath: str) -> list[LayerVerdict]:
    """For each layer (top first) whether it has ``relpath``, and which copy the merge shows."""
    view = open_stack(stack)
    try:
        sources, blocked_by = _resolve(view, relpath)
        verdicts = []
        parent, name = os.path.split(relpath)
        for position, layer in enumerate(view.layers):
            if layer is None:
                continue
            number = len(view.layers) - position
            has = _kind_in_layer(view, position, relpath)
            marks = _markers_in_layer(view, position, parent, name)
            if position in sources:
                note = "wins" if position == sources[0] else "merged into the directory above"
            elif marks:
                note = marks
            elif has is None:
                note = "-"
            elif blocked_by is not None and position > blocked_by[0]:
                note = f"hidden: {blocked_by[1]}"
            elif sources:
                note = f"hidden by layer {len(view.layers) - sources[0]}"
            else:
                note = "hidden"
            verdicts.append(LayerVerdict(number, layer.name, has, note))
        return verdicts
    finally:
        view.close()


def _resolve(view: MergedView, relpath: str) -> tuple[list[int], tuple[int, str] | None]:
    """The layers that make ``relpath`` in the merge, and what first hid it, if anything."""
    node = view.root
    parts = [part for part in relpath.split("/") if part]
    for depth, part in enumerate(parts):
        child = view.listing(node).get(os.fsencode(part))
        if child is None:
            return [], _first_blocker(view, "/".join(parts[:depth]), part, node.sources)
        if depth < len(parts) - 1 and not child.attr.is_dir:
            return [], None    # a symlink or file on the way: nothing below it (the mount never follows one)
        node = view.remember(node, child)
    return list(node.sources), None


def _first_blocker(view: MergedView, parent: str, name: str, sources: tuple[int, ...]) -> tuple[int, str] | None:
    for position in sources:
        marks = _markers_in_layer(view, position, parent, name)
        if marks:
            return position, f"{marks} in layer {len(view.layers) - position}"
    return None


def _kind_in_layer(view: MergedView, position: int, relpath: str) -> str | None:
    st = view.layer_lstat(position, os.fsencode(relpath))
    if st is None:
        return None
    if view.layers[position].is_whiteout(st):
        return "whiteout (overlay form)"
    kinds = {stat.S_IFDIR: "directory", stat.S_IFREG: "file", stat.S_IFLNK: "symlink",
             stat.S_IFCHR: "char device", stat.S_IFBLK: "block device", stat.S_IFIFO: "fifo",
             stat.S_IFSOCK: "socket"}
    return kinds.get(stat.S_IFMT(st.st_mode), "other")


def _markers_in_layer(view: MergedView, position: int, parent: str, name: str) -> str:
    """Whiteout or opaque markers in this layer that hide ``name`` below it, as the merge reads them."""
    listing = view.layer_listing(position, os.fsencode(parent))
    if listing is None:
        return ""
    found = []
    if os.fsencode(name) in listing.whiteouts:
        marker = os.path.join(parent, whiteout_name(name))
        if view.layer_lstat(position, os.fsencode(marker)) is not None:
            found.append(f"whiteout {marker}")
        else:
            found.append(f"whiteout {os.path.join(parent, name)} (char device 0/0)")
    if listing.opaque and parent:
        found.append(f"opaque directory /{parent}")   # the root is never opaque, as in kernel overlayfs
    return ", ".join(found)


def explain_lines(stack: list[dict], relpath: str) -> list[str]:
    """The lookup of ``relpath`` told step by step: each directory, each layer looked at, what stopped it."""
    view = open_stack(stack)
    try:
        lines = []
        node = view.root
        parts = [part for part in relpath.split("/") if part]
        for depth, part in enumerate(parts):
            parent = "/".join(parts[:depth])
            path = "/" + "/".join(parts[:depth + 1])
            lines.append(f"{path}:")
            looked = list(node.sources)
            for position in looked:
                label = _label(view, position)
                kind = _kind_in_layer(view, position, "/".join(parts[:depth + 1]))
                marks = _markers_in_layer(view, position, parent, part)
                if kind is not None and not kind.startswith("whiteout"):
                    lines.append(f"  {label}: has it ({kind})")
                    if kind != "directory":
                        break
                elif marks:
                    lines.append(f"  {label}: {marks}: the layers below are not looked at")
                    break
                else:
                    lines.append(f"  {label}: nothing here")
            child = view.listing(node).get(os.fsencode(part))
            if child is None:
                lines.append(f"  => {path} does not exist in the merged view")
                return lines
            child_node = view.remember(node, child)
            if depth < len(parts) - 1 and not child.attr.is_dir:
                lines.append(f"  => {path} is no directory here: {'/'.join(parts[depth + 1:])} below it does not "
                             f"exist in the merged view")
                return lines
            if child.attr.is_dir:
                view.listing(child_node)   # an opaque copy below cuts the merge short here
            winner = _label(view, child.sources[0])
            if child.attr.is_dir and len(child.sources) > 1:
                others = ", ".join(_label(view, p) for p in child.sources[1:])
                lines.append(f"  => a directory from {winner}, merged with {others}")
            else:
                lines.append(f"  => the copy in {winner} is the one seen")
            if view.layers[child.sources[0]].name == UPPER_NAME:
                below = [p for p in looked if p != child.sources[0] and _kind_in_layer(
                    view, p, "/".join(parts[:depth + 1])) is not None]
                when = datetime.datetime.fromtimestamp(child.attr.ctime_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
                if below:
                    lines.append(f"  => copied up from {_label(view, below[0])}; the upper copy last changed {when}")
                else:
                    lines.append(f"  => created in the upper, last changed {when}")
            node = child_node
        return lines
    finally:
        view.close()


def _label(view: MergedView, position: int) -> str:
    name = view.layers[position].name
    if name == UPPER_NAME:
        return "the upper layer"
    number = len(view.layers) - position
    return f"layer {number} ({name[:19] if name.startswith('sha256:') else name})"

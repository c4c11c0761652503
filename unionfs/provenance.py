"""Provenance, for people learning layers: which layers have a path, what the lookup saw, what hid what."""

from __future__ import annotations

import contextlib
import datetime
import os
import stat
from dataclasses import dataclass

from . import safepath
from .overlay import Layer, MergedView
from .layerform import OPAQUE_MARKER, whiteout_name


@dataclass
class LayerVerdict:
    """What one layer says about a path."""

    index: int            # 1 = bottom layer, as in build steps
    name: str
    has: str | None       # "file", "directory", "symlink", ... or None
    note: str             # "wins", "hidden by ...", "whiteout", ...


def explain_path(stack: list[dict], relpath: str) -> list[LayerVerdict]:
    """For each layer (top first) whether it has ``relpath``, and which copy the merge shows."""
    view = MergedView([Layer.open(entry["path"], entry["name"], overlay_form=True) for entry in stack])
    try:
        sources, blocked_by = _resolve(view, relpath)
        verdicts = []
        parent, name = os.path.split(relpath)
        for position, layer in enumerate(view.layers):
            if layer is None:
                continue
            number = len(view.layers) - position
            has = _kind_in_layer(layer, relpath)
            marks = _markers_in_layer(layer, parent, name)
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
        node = view.remember(node, child)
    return list(node.sources), None


def _first_blocker(view: MergedView, parent: str, name: str, sources: tuple[int, ...]) -> tuple[int, str] | None:
    for position in sources:
        marks = _markers_in_layer(view.layers[position], parent, name)
        if marks:
            return position, f"{marks} in layer {len(view.layers) - position}"
    return None


def _kind_in_layer(layer: Layer, relpath: str) -> str | None:
    parent, name = os.path.split(relpath)
    try:
        fd = safepath.open_beneath(layer.root_fd, os.fsencode(parent), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        st = os.stat(name or ".", dir_fd=fd, follow_symlinks=False)
    except OSError:
        return None
    finally:
        os.close(fd)
    kinds = {stat.S_IFDIR: "directory", stat.S_IFREG: "file", stat.S_IFLNK: "symlink",
             stat.S_IFCHR: "char device", stat.S_IFBLK: "block device", stat.S_IFIFO: "fifo",
             stat.S_IFSOCK: "socket"}
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return "whiteout (overlay form)"
    return kinds.get(stat.S_IFMT(st.st_mode), "other")


def _markers_in_layer(layer: Layer, parent: str, name: str) -> str:
    """Whiteout or opaque markers in this layer that hide ``name`` below it."""
    try:
        fd = safepath.open_beneath(layer.root_fd, os.fsencode(parent), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return ""
    try:
        found = []
        with contextlib.suppress(OSError):
            os.stat(whiteout_name(name), dir_fd=fd, follow_symlinks=False)
            found.append(f"whiteout {os.path.join(parent, whiteout_name(name))}")
        with contextlib.suppress(OSError):
            os.stat(OPAQUE_MARKER, dir_fd=fd, follow_symlinks=False)
            found.append(f"opaque directory /{parent}")
        return ", ".join(found)
    finally:
        os.close(fd)




def explain_lines(stack: list[dict], relpath: str) -> list[str]:
    """The lookup of ``relpath`` told step by step: each directory, each layer looked at, what stopped it."""
    view = MergedView([Layer.open(entry["path"], entry["name"], overlay_form=True) for entry in stack])
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
                layer = view.layers[position]
                label = _label(view, position)
                kind = _kind_in_layer(layer, "/".join(parts[:depth + 1]))
                marks = _markers_in_layer(layer, parent, part)
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
            if child.attr.is_dir:
                view.listing(child_node)   # an opaque copy below cuts the merge short here
            winner = _label(view, child.sources[0])
            if child.attr.is_dir and len(child.sources) > 1:
                others = ", ".join(_label(view, p) for p in child.sources[1:])
                lines.append(f"  => a directory from {winner}, merged with {others}")
            else:
                lines.append(f"  => the copy in {winner} is the one seen")
            if view.layers[child.sources[0]].name == "upper":
                below = [p for p in looked if p != child.sources[0] and _kind_in_layer(
                    view.layers[p], "/".join(parts[:depth + 1])) is not None]
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
    if name == "upper":
        return "the upper layer"
    number = len(view.layers) - position
    return f"layer {number} ({name[:19] if name.startswith('sha256:') else name})"

"""Where a tool's input lives: the layermount mount that holds a path, its layers, and an upper's lowers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..api import read_upper_record, store_for
from ..errors import MountError, UsageError
from ..layerform import STACK_XATTR
from ..mount import FSTYPE, mount_entries, mount_owner


def find_mount(path: str) -> tuple[str, str]:
    """(mountpoint, path inside it) of the layermount mount that holds ``path``."""
    real = os.path.realpath(os.path.abspath(path)) if os.path.lexists(path) else os.path.abspath(path)
    candidates = [point for point, kind in mount_entries() if kind == FSTYPE]
    best = None
    for point in candidates:
        if real == point or real.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) > len(best):
                best = point
    if best is None:
        raise UsageError(f"{path}: not inside a layermount mount")
    inside = os.path.relpath(real, best)
    return best, "" if inside == "." else inside


def mount_stack(mountpoint: str) -> list[dict]:
    """The layers of a mount, top first, as its daemon tells them.

    Only a mount of this user's or root's is asked: anyone can run a FUSE
    daemon that calls itself layermount and names root-only directories as
    its layers, for root's ``commit`` to tar.
    """
    owner = mount_owner(mountpoint)
    if owner not in (0, os.geteuid()):
        who = "nobody known" if owner is None else f"uid {owner}"
        raise MountError(f"{mountpoint}: mounted by {who}, not by you or root: its word on its layers is not "
                         f"trusted (give the upper directory itself)")
    try:
        stack = json.loads(os.getxattr(mountpoint, STACK_XATTR.decode()))
    except OSError as exc:
        raise MountError(f"{mountpoint}: cannot ask the daemon for its layers: {exc.strerror}") from None
    except ValueError:
        raise MountError(f"{mountpoint}: the daemon's list of layers is not JSON") from None
    if not isinstance(stack, list) or not all(isinstance(entry, dict) and isinstance(entry.get("name"), str)
                                              and isinstance(entry.get("path"), str) for entry in stack):
        raise MountError(f"{mountpoint}: the daemon's list of layers is malformed")
    return stack


@dataclass
class UpperInfo:
    """An upper directory and the lower layers (top first) it sits on."""

    upper: str
    lowers: list[str]
    record: dict


def locate_upper(target: str, lowerdir: str | None = None) -> UpperInfo:
    """Find the upper and its lowers from a mountpoint, a kept --upper dir, or a raw upperdir + lowerdir."""
    real = os.path.realpath(target)
    if any(point == real and kind == FSTYPE for point, kind in mount_entries()):
        stack = mount_stack(real)
        uppers = [entry["path"] for entry in stack if entry["name"] == "upper"]
        if not uppers:
            raise UsageError(f"{target}: a read-only mount has no upper layer")
        return UpperInfo(uppers[0], [entry["path"] for entry in stack if entry["name"] != "upper"], {})
    root = Path(real)
    if root.name == "diff" and (root.parent / "layermount.json").exists():
        root = root.parent
    record_path = root / "layermount.json"
    if record_path.exists():
        record = read_upper_record(record_path, target)
        store = store_for(record["store"])
        lowers = []
        for diff_id in reversed(record["layers"]):
            layer = store.layer(diff_id)
            if layer is None:
                raise UsageError(f"{target}: its layer {diff_id[:19]} is no longer in store {store.root}")
            lowers.append(str(layer.path))
        return UpperInfo(str(root / "diff"), lowers, record)
    if not root.is_dir():
        raise UsageError(f"{target}: not a mountpoint, an upper directory or a directory at all")
    lowers = [path for path in (lowerdir or "").split(":") if path]
    return UpperInfo(str(root), lowers, {})

"""Where a tool's input lives: the layermount mount that holds a path, its layers, and an upper's lowers."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .. import safepath
from ..api import read_upper_record, store_for
from ..errors import MountError, UsageError
from ..layerform import STACK_XATTR
from ..mount import FSTYPE, mount_entries, mount_owner
from ..overlay.cuts import LAYERS_NAME


@dataclass(frozen=True)
class MountPath:
    """A path found in a layermount mount, as the container sees it."""

    mountpoint: str
    inside: str             # the path in the view, without a leading "/" ("" is its root)
    cut: int | None = None  # N for a path below /.layers/N: the image after build step N


_MAX_SYMLINKS = 40          # as the kernel's path walk
LAYERS_DIR_NAME = LAYERS_NAME.decode()


def find_mount(path: str) -> MountPath:
    """The layermount mount that holds ``path`` and the path inside it.

    The host's symlinks are followed up to the mountpoint; below it the path
    is resolved inside the mount's root (or a ``/.layers/N`` cut's), as a
    container would: ``/usr/bin/awk -> /etc/alternatives/awk`` stays in the image.
    """
    points = {point for point, kind in mount_entries() if kind == FSTYPE}
    pending = [part for part in os.path.join(os.getcwd(), path).split("/") if part]
    current, hops = "/", 0
    while pending and current not in points:
        part = pending.pop(0)
        if part in (".", ".."):
            current = current if part == "." else os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        if os.path.islink(candidate):
            hops += 1
            if hops > _MAX_SYMLINKS:
                raise UsageError(f"{path}: too many levels of symbolic links")
            target = os.readlink(candidate)
            pending[:0] = [piece for piece in target.split("/") if piece]
            current = "/" if target.startswith("/") else current
            continue
        current = candidate
    if current not in points:
        raise UsageError(f"{path}: not inside a layermount mount")
    _trusted(current)     # before any path is resolved through its daemon
    return _inside_mount(path, current, "/".join(pending))


def _inside_mount(path: str, mountpoint: str, rest: str) -> MountPath:
    root = mountpoint
    cut = None
    first, _, below = rest.partition("/")
    if first == LAYERS_DIR_NAME and below:
        step, _, rest = below.partition("/")
        root = _resolved_in(path, mountpoint, mountpoint, f"{LAYERS_DIR_NAME}/{step}")
        number = os.path.relpath(root, os.path.join(mountpoint, LAYERS_DIR_NAME))
        if not number.isdigit():
            raise UsageError(f"{path}: {LAYERS_DIR_NAME}/{step} is no cut of the image")
        cut = int(number)
    inside = os.path.relpath(_resolved_in(path, mountpoint, root, rest), root)
    return MountPath(mountpoint, "" if inside == "." else inside, cut)


def _resolved_in(path: str, mountpoint: str, root: str, rest: str) -> str:
    """The host path ``rest`` reaches below ``root``, resolved as if ``root`` were ``/``. Where it
    leads nowhere (a missing name, a dangling symlink) the longest part that
    resolves is taken and the rest kept as written, so ``which`` can tell what hid it; a symlink
    loop is an error."""
    parts = [part for part in rest.split("/") if part]
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for cut in range(len(parts), -1, -1):
            try:
                fd = safepath.open_in_root(root_fd, os.fsencode("/".join(parts[:cut])), os.O_PATH)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES) or cut == 0:
                    raise UsageError(f"{path}: {exc.strerror} (in the image)") from None
                continue
            try:
                reached = os.readlink(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            break
    finally:
        os.close(root_fd)
    if reached != mountpoint and not reached.startswith(mountpoint.rstrip("/") + "/"):
        raise UsageError(f"{path}: not inside a layermount mount")
    return os.path.join(reached, *parts[cut:])


def _trusted(mountpoint: str) -> None:
    """Only a mount of this user's or root's is asked anything (its layers, a path's resolution)."""
    owner = mount_owner(mountpoint)
    if owner not in (0, os.geteuid()):
        who = "nobody known" if owner is None else f"uid {owner}"
        raise MountError(f"{mountpoint}: mounted by {who}, not by you or root: its word on its layers is not "
                         f"trusted (give the upper directory itself)")


def mount_stack(mountpoint: str) -> list[dict]:
    """The layers of a mount, top first, as its daemon tells them.

    Only a mount of this user's or root's is asked: anyone can run a FUSE
    daemon that calls itself layermount and names root-only directories as
    its layers, for root's ``commit`` to tar.
    """
    _trusted(mountpoint)
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

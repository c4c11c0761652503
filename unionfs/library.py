"""The importable API: what a runtime needs from layermount as a rootfs backend, without a subprocess.

Every function returns data and prints nothing; failures raise
:class:`unionfs.errors.LayermountError` subclasses, whose ``exit_code`` is
the CLI's. ``image`` arguments take a path (docker save tar, OCI layout tar
or directory) or an already opened :class:`unionfs.image.Image`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Union

from .image.model import Image

if TYPE_CHECKING:
    from .store import StoredLayer
    from .tools.diff import Change

ImageArg = Union[str, "os.PathLike[str]", Image]


@dataclass(frozen=True)
class Mounted:
    """A live mount made by :func:`mounted`."""

    mountpoint: str
    upper: str | None     # the kept upper directory, or None (throw-away or read-only)
    pid: int              # the serving daemon, a child of this process
    image: Image


def open_image(path: str | os.PathLike[str], *, platform: str | None = None, ref: str | None = None) -> Image:
    """Read an image's manifest and config (no layer is unpacked)."""
    from .api import load_image

    return load_image([os.fspath(path)], platform=platform, ref=ref)


def unpack(image: ImageArg, *, store: str | os.PathLike[str] | None = None, platform: str | None = None,
           ref: str | None = None) -> list[StoredLayer]:
    """Put every layer of ``image`` into the layer store (once); return them bottom first."""
    from .api import store_for, unpack as unpack_into

    return unpack_into(_image(image, platform, ref), store_for(_path(store)))


@contextlib.contextmanager
def mounted(image: ImageArg, mountpoint: str | os.PathLike[str], *, upper: str | os.PathLike[str] | None = None,
            read_only: bool = False, store: str | os.PathLike[str] | None = None, platform: str | None = None,
            ref: str | None = None) -> Iterator[Mounted]:
    """Mount ``image`` at ``mountpoint`` for the ``with`` block; unmount (and wait for the daemon) on exit.

    Writes go to ``upper`` (kept, reusable by a later mount) or to a
    throw-away upper removed at the unmount; ``read_only`` mounts none.
    """
    from .api import mount_image, store_for
    from .mount import MountOptions, check_mountpoint, unmount

    opened = _image(image, platform, ref)
    point = os.fspath(mountpoint)
    check_mountpoint(point)
    options = MountOptions(mountpoint=point, read_only=read_only)
    pid = mount_image(opened, store_for(_path(store)), options, None, _path(upper))
    try:
        yield Mounted(options.mountpoint, _path(upper), pid, opened)
    finally:
        unmount(options.mountpoint)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)       # the daemon is our child: leave no zombie


def diff(target: str | os.PathLike[str], *, lowerdir: str | None = None) -> list[Change]:
    """What an upper changed, as ``docker diff`` lists it: a mountpoint, a kept upper, or an upperdir + lowerdir."""
    from .tools.diff import changes
    from .tools.locate import locate_upper

    located = locate_upper(os.fspath(target), lowerdir)
    return changes(located.upper, located.lowers)


def commit(image: ImageArg, upper: str | os.PathLike[str], output: str | os.PathLike[str], *,
           message: str | None = None, image_format: str = "docker", tag: str | None = None,
           platform: str | None = None, ref: str | None = None) -> str:
    """Write ``image`` plus ``upper`` (a mountpoint or a kept upper) as a new image; return its id."""
    from .tools.commit import commit as write_commit
    from .tools.locate import locate_upper

    return write_commit(_image(image, platform, ref), locate_upper(os.fspath(upper)), os.fspath(output),
                        message=message, image_format=image_format, tag=tag)


def _image(image: ImageArg, platform: str | None, ref: str | None) -> Image:
    return image if isinstance(image, Image) else open_image(image, platform=platform, ref=ref)


def _path(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else os.fspath(path)

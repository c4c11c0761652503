"""``layermount run``: mount an image, run a command in it with the toy runtime, unmount."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..api import mount_image
from ..fstree import remove_tree
from ..image.model import Image
from ..mount import MountOptions, unmount
from ..runtime import container_for, fresh_volumes, run
from ..textsafe import shown

if TYPE_CHECKING:
    from ..store import LayerStore


def run_image(image: Image, store: "LayerStore", command: list[str], *, upper_dir: str | None = None,
              network: str = "none", progress=None) -> int:
    """Mount the image, run ``command`` (or its Entrypoint + Cmd) inside, unmount; return the exit code."""
    container = container_for(image.config, "", command)
    container.network = network
    # The mountpoint sits in a 0700 directory of its own: the container gets in through the
    # pivot, no other host user can walk to it, whatever the mount's allow_other says.
    private = tempfile.mkdtemp(prefix="layermount-run-")
    mountpoint = os.path.join(private, "root")
    os.mkdir(mountpoint, 0o700)
    volumes_base = None
    try:
        # FUSE lets only the mounting user in unless allow_other: needed when the image runs as another.
        user = container.user.split(":")[0]
        options = MountOptions(mountpoint=mountpoint, allow_other=user not in ("", "root", "0"))
        container.volumes, volumes_base = fresh_volumes(image.config)
        mount_image(image, store, options, progress, upper_dir)
        try:
            container.root = mountpoint
            for inside in container.volumes:
                print(f"layermount: volume {shown(inside)} is a fresh temporary directory; writes there "
                      f"do not go to the upper layer", file=sys.stderr)
            return run(container)
        finally:
            unmount(mountpoint)
    finally:
        if volumes_base is not None:
            with contextlib.suppress(OSError):     # what the container left, however deep
                remove_tree(Path(volumes_base))
        for directory in (mountpoint, private):
            with contextlib.suppress(OSError):
                os.rmdir(directory)

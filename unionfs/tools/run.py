"""``layermount run``: mount an image, run a command in it with the toy runtime, unmount.

``RunOptions`` holds what ``docker run`` lets a user change: command,
entrypoint, env, workdir, user, hostname, bind mounts, network, terminal.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..api import mount_image
from ..errors import UsageError
from ..fstree import remove_tree
from ..image.model import Image
from ..mount import MountOptions, unmount
from ..runtime import HOSTNAME, Container, check_runnable, container_for, fresh_volumes, run

if TYPE_CHECKING:
    from ..store import LayerStore

_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclass
class RunOptions:
    command: list[str] = field(default_factory=list)      # replaces the image's Cmd
    entrypoint: str | None = None                         # replaces the Entrypoint ("" clears it) and Cmd
    env: list[str] = field(default_factory=list)          # KEY=VAL, over the image's Env
    workdir: str | None = None
    user: str | None = None
    hostname: str = HOSTNAME
    binds: list[tuple[str, str, bool]] = field(default_factory=list)   # (host dir, path inside, read-only)
    network: str = "none"
    tty: bool = False
    interactive: bool = True


def parse_bind(spec: str) -> tuple[str, str, bool]:
    """``HOST:CTR[:ro|rw]`` as docker's ``-v`` takes it; HOST must be an existing directory."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise UsageError(f"-v {spec!r}: not HOST:CONTAINER[:ro|rw]")
    host, inside = os.path.abspath(parts[0]), parts[1]
    if not inside.startswith("/"):
        raise UsageError(f"-v {spec!r}: the container path must be absolute")
    if not os.path.isdir(host):
        raise UsageError(f"-v {spec!r}: {host} is not a directory (only directories can be bound)")
    return host, inside, len(parts) == 3 and parts[2] == "ro"


def container_from(image: Image, options: RunOptions) -> Container:
    """Docker's rules over the image's config: --entrypoint also resets Cmd; -e KEY takes ours."""
    command = list(options.command)
    if options.entrypoint is not None:
        config = {**image.config, "config": {**(image.config.get("config") or {}), "Entrypoint": None,
                                               "Cmd": None}}
        command = ([options.entrypoint] if options.entrypoint else []) + command
    else:
        config = image.config
    container = container_for(config, "", command)
    for item in options.env:
        key, sep, value = item.partition("=")
        if not key or "\0" in item:
            raise UsageError(f"-e {item!r}: not KEY=VALUE")
        if not sep:
            if key not in os.environ:
                continue                      # as docker: -e KEY of an unset variable sets nothing
            value = os.environ[key]
        container.env = [entry for entry in container.env if entry.partition("=")[0] != key] + [f"{key}={value}"]
    if options.workdir is not None:
        if not options.workdir.startswith("/"):
            raise UsageError(f"-w {options.workdir!r}: the working directory must be absolute")
        container.workdir = options.workdir
    if options.user is not None:
        container.user = options.user
    if not _HOSTNAME.fullmatch(options.hostname):
        raise UsageError(f"--name {options.hostname!r}: a hostname is 1 to 63 letters, digits, '.', '_' or '-'")
    container.hostname = options.hostname
    container.network = options.network
    container.binds = list(options.binds)
    container.tty = options.tty
    return container


def run_image(image: Image, store: "LayerStore", options: RunOptions, *, upper_dir: str | None = None,
              progress=None, jobs: int | None = None) -> int:
    """Mount the image, run the command (or its Entrypoint + Cmd) inside, unmount; return the exit code."""
    container = container_from(image, options)
    check_runnable(container)             # before unpacking: a run that cannot start costs nothing
    # The mountpoint sits in a 0700 directory of its own: the container gets in through the
    # pivot, no other host user can walk to it, whatever the mount's allow_other says.
    private = tempfile.mkdtemp(prefix="layermount-run-")
    mountpoint = os.path.join(private, "root")
    os.mkdir(mountpoint, 0o700)
    volumes_base = None
    try:
        # FUSE lets only the mounting user in unless allow_other: needed when the image runs as another.
        user = container.user.split(":")[0]
        mount_options = MountOptions(mountpoint=mountpoint, allow_other=user not in ("", "root", "0"))
        container.volumes, volumes_base = fresh_volumes(image.config)
        mount_image(image, store, mount_options, progress, upper_dir, jobs=jobs)
        try:
            container.root = mountpoint
            return run(container, interactive=options.interactive)
        finally:
            unmount(mountpoint)
    finally:
        if volumes_base is not None:
            with contextlib.suppress(OSError):     # what the container left, however deep
                remove_tree(Path(volumes_base))
        for directory in (mountpoint, private):
            with contextlib.suppress(OSError):
                os.rmdir(directory)

"""Image formats: read docker-archive, OCI layouts and plain layer tars into one model."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import ImageError
from .docker_archive import MANIFEST_FILE, read_docker_archive
from .layer_tars import open_layer_tars
from .model import Image, LayerRef
from .reference import parse_source
from .oci_layout import INDEX_FILE, LAYOUT_FILE, DirectoryBlobs, Platform, TarBlobs, read_oci_layout

if TYPE_CHECKING:
    from .auth import RegistryOptions

__all__ = ["Image", "LayerRef", "open_image", "open_layer_tars"]


def open_image(path, *, platform: str | None = None, ref: str | None = None,
               registry: "RegistryOptions | None" = None) -> Image:
    """The image at ``path``: a docker save tar or an OCI layout (tar or directory), told apart by content,
    or an image in a registry (``docker://...``, or a bare name when no such file exists).

    ``platform`` ("os/arch[/variant]") picks from a multi-platform image, the
    host's by default; ``ref`` picks one of several images by tag or ref name;
    ``registry`` says how to talk to registries.
    """
    wanted = Platform.parse(platform) if platform else None
    source = parse_source(os.fspath(path))
    if source.registry is not None:
        from .auth import RegistryOptions
        from .registry import open_registry_image

        return open_registry_image(source.registry, registry or RegistryOptions(), platform=wanted)
    path, ref = source.path, ref or source.ref
    if os.path.isdir(path):
        blobs = DirectoryBlobs(path)
    elif os.path.lexists(path):
        blobs = TarBlobs.open_path(path)
    else:
        raise ImageError(f"{path}: no such file or directory")
    if blobs.exists(MANIFEST_FILE):
        return read_docker_archive(blobs, path, platform=wanted, ref=ref)
    if blobs.exists(LAYOUT_FILE) and blobs.exists(INDEX_FILE):
        return read_oci_layout(blobs, path, platform=wanted, ref=ref)
    kind = "directory" if isinstance(blobs, DirectoryBlobs) else "tar archive"
    raise ImageError(f"{path}: not an image: a {kind} without manifest.json or oci-layout and index.json")

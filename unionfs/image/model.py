"""The format-independent picture of an image: a config and its layers, bottom first.

Modelled on go-containerregistry's v1.Image / v1.Layer: a reader knows where
each blob lives and which digests it must match, and nothing about disks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import BinaryIO, Callable


@dataclass(frozen=True)
class LayerRef:
    """One layer blob as the image names it.

    ``digest`` is the sha256 of the blob as stored (possibly compressed) and
    ``diff_id`` the sha256 of the uncompressed tar (from the config). Either
    may be None when the source does not record it (a plain layer tar has no
    config); the store then computes it and has nothing to compare against.
    """

    name: str                       # where the blob lives in the source, for messages
    open: Callable[[], BinaryIO]    # a fresh stream of the blob's bytes, from the start
    digest: str | None = None       # "sha256:<hex>" of the blob bytes
    diff_id: str | None = None      # "sha256:<hex>" of the uncompressed tar
    size: int | None = None         # blob size in bytes, when known
    media_type: str = ""
    # Streamed from a registry: progress speaks of downloading, and ``open`` takes
    # ``partial_dir``, where the bytes received are kept for a later pull to resume from.
    remote: bool = False


@dataclass
class Image:
    """An image ready to unpack: its config and its layers, bottom layer first."""

    source: str                              # the path given by the user
    layers: list[LayerRef]
    config: dict = field(default_factory=dict)   # OCI/docker image config JSON
    config_digest: str | None = None         # "sha256:<hex>" of the config blob; the image id
    repo_tags: list[str] = field(default_factory=list)
    format: str = ""                         # "docker-archive", "oci-layout", "layer-tars", "registry"
    repo_digests: list[str] = field(default_factory=list)   # "host/repo@sha256:..." of a pulled manifest
    config_blob: bytes | None = None         # the config's bytes as stored, so a push keeps its digest
    origin: str | None = None                # "host/repo" a registry image came from (cross-repo mounts)

    @property
    def platform(self) -> str:
        parts = [self.config.get("os", ""), self.config.get("architecture", "")]
        if self.config.get("variant"):
            parts.append(self.config["variant"])
        return "/".join(p for p in parts if p)

    @property
    def id(self) -> str:
        """A stable identity: the config digest, or a hash of the layer chain."""
        if self.config_digest:
            return self.config_digest
        chain = "\n".join(layer.diff_id or layer.digest or layer.name for layer in self.layers)
        return "sha256:" + hashlib.sha256(chain.encode()).hexdigest()

    def history(self) -> list[dict]:
        """The config's history entries, including empty_layer ones (ENV, CMD ...)."""
        return list(self.config.get("history") or [])

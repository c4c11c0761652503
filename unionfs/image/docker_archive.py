"""docker save archives, both generations, read through their manifest.json.

Classic archives (docker < 25) hold ``<id>/layer.tar`` files, often links to
one another, and a ``<sha256>.json`` config; docker 25 and later put the same
manifest.json beside an OCI layout, pointing into ``blobs/sha256``. The
classic format records no digest of a stored layer file, only diff_ids.
"""

from __future__ import annotations

import posixpath
import re

from ..errors import DigestMismatch, ImageError
from .compression import HEAD_SIZE, detect_compression
from .fields import ARCHIVE_ENTRY, check_config, check_descriptor, check_fields
from .model import Image
from .oci_layout import (Blobs, Platform, config_diff_ids, layer_media_type, layer_ref, select_by_ref,
                         sha256_digest)

MANIFEST_FILE = "manifest.json"
_BLOB_NAME = re.compile(r"blobs/sha256/([0-9a-f]{64})")
_CLASSIC_CONFIG_NAME = re.compile(r"([0-9a-f]{64})\.json")


def read_docker_archive(blobs: Blobs, source: str, *, platform: Platform | None, ref: str | None) -> Image:
    """The image manifest.json describes, chosen among several by ``ref`` (one of its RepoTags)."""
    label = blobs.label
    entries = blobs.read_json(MANIFEST_FILE)
    if not isinstance(entries, list) or not entries or not all(_is_entry(entry) for entry in entries):
        raise ImageError(f"{label}: {MANIFEST_FILE} is not a docker save manifest (a list of Config and Layers)")
    for number, entry in enumerate(entries, 1):
        check_fields(label, f"{MANIFEST_FILE} entry {number}", entry, ARCHIVE_ENTRY)
    entry = select_by_ref(label, entries, _repo_tags, ref, lambda first, other: first["Config"] == other["Config"])[0]
    config_name = posixpath.normpath(entry["Config"])
    config_bytes = blobs.read(config_name)
    config_digest = sha256_digest(config_bytes)
    named = _digest_in_name(config_name)
    if named is not None and named != config_digest:
        raise DigestMismatch(f"{label}: config {config_name} does not match its name: content is {config_digest}")
    config = check_config(label, blobs.read_json(config_name, config_bytes))
    if platform is not None:
        platform.check(label, config)
    diff_ids = config_diff_ids(label, config, len(entry["Layers"]))
    sources = entry.get("LayerSources") if isinstance(entry.get("LayerSources"), dict) else {}
    layers = []
    for name, diff_id in zip(entry["Layers"], diff_ids):
        name = posixpath.normpath(name)
        if not blobs.exists(name):
            raise ImageError(f"{label}: missing layer file {name}")
        source_descriptor = sources.get(diff_id)
        if source_descriptor is not None:
            check_descriptor(label, f"{MANIFEST_FILE}: LayerSources {diff_id}", source_descriptor)
        media_type = (source_descriptor.get("mediaType") if isinstance(source_descriptor, dict) else None) \
            or _sniffed_media_type(blobs, name)
        layers.append(layer_ref(blobs, name, digest=_digest_in_name(name), diff_id=diff_id, size=None,
                                media_type=media_type))
    return Image(source=source, layers=layers, config=config, config_digest=config_digest,
                 repo_tags=_repo_tags(entry), format="docker-archive", config_blob=config_bytes)


def _is_entry(entry: object) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("Config"), str)
            and isinstance(entry.get("Layers"), list) and all(isinstance(name, str) for name in entry["Layers"]))


def _repo_tags(entry: dict) -> list[str]:
    return [tag for tag in entry.get("RepoTags") or [] if isinstance(tag, str)]


def _digest_in_name(name: str) -> str | None:
    """The digest a content-addressed name (blobs/sha256/<hex>, <hex>.json) promises, if it is one."""
    match = _BLOB_NAME.fullmatch(name) or _CLASSIC_CONFIG_NAME.fullmatch(name)
    return "sha256:" + match.group(1) if match else None


def _sniffed_media_type(blobs: Blobs, name: str) -> str:
    """The layer's media type from its first bytes: docker writes layer.tar compressed or not."""
    try:
        with blobs.opener(name)() as stream:
            head = stream.read(HEAD_SIZE)
    except OSError as exc:
        raise ImageError(f"{blobs.label}: cannot read layer file {name}: {exc.strerror or exc}") from None
    return layer_media_type(detect_compression(head))

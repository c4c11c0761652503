"""Write images: docker save archives (classic and docker 25), OCI layouts as a tar or a directory.

Used by commit, by the built-in demo image and by test fixtures. Output is
deterministic (fixed times and ordering), so the same layers and config give
the same digests; it appears at its path complete or not at all.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Iterable, Union

import zstandard

from ..errors import LayermountError, UsageError
from ..layerform import OPAQUE_MARKER as OPAQUE_NAME, WHITEOUT_PREFIX
from .compression import CHUNK
from .oci_layout import (CONTAINERD_NAME, DOCKER_CONFIG, DOCKER_LAYER, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST,
                         INDEX_FILE, LAYOUT_FILE, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, REF_NAME, Platform,
                         blob_path, layer_media_type, normalize_ref, sha256_digest)

FIXED_MTIME = 946684800        # 2000-01-01T00:00:00Z: any fixed time keeps output reproducible
FORMATS = ("docker", "docker-oci", "oci", "oci-dir")
COMPRESSIONS = ("none", "gzip", "zstd")
GZIP_LEVEL = 6
ZSTD_LEVEL = 3


# ---- layer tars from simple specs ------------------------------------------

@dataclass(frozen=True)
class _Entry:
    path: str
    _: KW_ONLY
    uid: int = 0
    gid: int = 0
    mtime: int = FIXED_MTIME
    xattrs: dict = field(default_factory=dict)   # name -> bytes or str, e.g. {"user.note": b"x"}


@dataclass(frozen=True)
class File(_Entry):
    data: bytes = b""
    _: KW_ONLY
    mode: int = 0o644


@dataclass(frozen=True)
class Dir(_Entry):
    _: KW_ONLY
    mode: int = 0o755


@dataclass(frozen=True)
class Symlink(_Entry):
    target: str


@dataclass(frozen=True)
class Hardlink(_Entry):
    target: str            # the path of a file earlier in the same layer


@dataclass(frozen=True)
class Whiteout(_Entry):
    """Deletes ``path`` from the layers below (an OCI ``.wh.<name>`` marker)."""


@dataclass(frozen=True)
class Opaque(_Entry):
    """Hides what the layers below hold in the directory ``path`` (``.wh..wh..opq``)."""


@dataclass(frozen=True)
class Device(_Entry):
    kind: str              # "char" or "block"
    major: int
    minor: int
    _: KW_ONLY
    mode: int = 0o600


@dataclass(frozen=True)
class Fifo(_Entry):
    _: KW_ONLY
    mode: int = 0o644


LayerEntry = Union[File, Dir, Symlink, Hardlink, Whiteout, Opaque, Device, Fifo]


def layer_tar(entries: Iterable[LayerEntry]) -> bytes:
    """An uncompressed layer tar (PAX, so xattrs and long names fit) holding ``entries`` in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = _tar_info(entry)
            data = entry.data if isinstance(entry, File) else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _member_name(path: str) -> str:
    return path.strip("/")


def _tar_info(entry: LayerEntry) -> tarfile.TarInfo:
    name = _member_name(entry.path)
    if isinstance(entry, Whiteout):
        head, _, tail = name.rpartition("/")
        name = posixpath.join(head, WHITEOUT_PREFIX + tail)
    elif isinstance(entry, Opaque):
        name = posixpath.join(name, OPAQUE_NAME)
    info = tarfile.TarInfo(name)
    info.uid, info.gid, info.mtime = entry.uid, entry.gid, entry.mtime
    info.mode = getattr(entry, "mode", 0o644)
    if isinstance(entry, Dir):
        info.type = tarfile.DIRTYPE
    elif isinstance(entry, Symlink):
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, entry.target, 0o777
    elif isinstance(entry, Hardlink):
        info.type, info.linkname = tarfile.LNKTYPE, _member_name(entry.target)
    elif isinstance(entry, Device):
        if entry.kind not in ("char", "block"):
            raise ValueError(f"device {entry.path}: kind must be 'char' or 'block', not {entry.kind!r}")
        info.type = tarfile.CHRTYPE if entry.kind == "char" else tarfile.BLKTYPE
        info.devmajor, info.devminor = entry.major, entry.minor
    elif isinstance(entry, Fifo):
        info.type = tarfile.FIFOTYPE
    for key, value in entry.xattrs.items():
        # tarfile writes str values; surrogateescape carries arbitrary bytes through (hdrcharset=BINARY).
        text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
        info.pax_headers["SCHILY.xattr." + key] = text
    return info


def new_config(created_by: list[str], *, platform: Platform | None = None) -> dict:
    """A minimal image config for the host (or ``platform``), one history entry per layer."""
    platform = platform or Platform.host()
    config = {"architecture": platform.architecture, "os": platform.os}
    if platform.variant:
        config["variant"] = platform.variant
    config["rootfs"] = {"type": "layers", "diff_ids": []}
    config["history"] = [{"created_by": line} for line in created_by]
    return config


# ---- images -----------------------------------------------------------------

Layer = Union[bytes, str, os.PathLike]     # an uncompressed layer tar, in memory or in a file


@dataclass
class ImageSpec:
    """One image to write: uncompressed layer tars bottom first, a config, maybe a tag."""

    layers: list[Layer]
    config: dict
    repo_tag: str | None = None


def write_image(out, layers: list[Layer], config: dict, *, format: str = "docker", repo_tag: str | None = None,
                compression: str = "none", media_types: str = "oci") -> str:
    """Write one image to ``out``; return its config digest (the image id).

    ``format``: "docker" (classic docker save), "docker-oci" (docker 25 save),
    "oci" (OCI layout tar), "oci-dir" (OCI layout directory). Layers are
    compressed as ``compression``; ``media_types`` "docker" writes docker's
    manifest media types instead of OCI's. The config's rootfs.diff_ids are
    filled in; everything else in it is written as given.
    """
    return write_images(out, [ImageSpec(layers, config, repo_tag)], format=format, compression=compression,
                        media_types=media_types)[0]


def write_images(out, images: list[ImageSpec], *, format: str = "docker", compression: str = "none",
                 media_types: str = "oci") -> list[str]:
    """Write several images into one archive (e.g. differently tagged); return their config digests."""
    with _Builder(out, format, compression, media_types) as builder:
        built = [builder.add_image(spec) for spec in images]
        builder.finish(built, [_tagged_descriptor(image, format) for image in built])
    return [image.config_digest for image in built]


def write_index(out, images: list[ImageSpec], *, format: str = "oci", repo_tag: str | None = None,
                compression: str = "none", media_types: str = "oci", nested: bool = False) -> list[str]:
    """Write one image for several platforms, each taken from its config; return the config digests.

    The platform manifests are listed in index.json itself, or with
    ``nested`` in an image index blob that index.json points to (as
    containerd and docker 25 save a multi-platform image). OCI formats only.
    """
    if format not in ("oci", "oci-dir"):
        raise UsageError(f"a multi-platform index is written as oci or oci-dir, not {format}")
    with _Builder(out, format, compression, media_types) as builder:
        built = [builder.add_image(spec) for spec in images]
        platform_manifests = [dict(image.descriptor, platform=_platform_of(image.config)) for image in built]
        annotations = {REF_NAME: repo_tag} if repo_tag else {}
        if nested:
            index_type = OCI_INDEX if media_types == "oci" else DOCKER_MANIFEST_LIST
            document = {"schemaVersion": 2, "mediaType": index_type, "manifests": platform_manifests}
            top = [dict(builder.add_json(document, index_type), **_annotated(annotations))]
        else:
            top = [dict(descriptor, **_annotated(annotations)) for descriptor in platform_manifests]
        builder.finish(built, top)
    return [image.config_digest for image in built]


def _platform_of(config: dict) -> dict:
    platform = {"architecture": config.get("architecture", ""), "os": config.get("os", "")}
    if config.get("variant"):
        platform["variant"] = config["variant"]
    return platform


def _annotated(annotations: dict) -> dict:
    return {"annotations": annotations} if annotations else {}


def _tagged_descriptor(image: "_BuiltImage", format: str) -> dict:
    """index.json's entry for an image: docker 25 names it as containerd does, OCI by the tag given."""
    if not image.repo_tag:
        return image.descriptor
    if format == "docker-oci":
        full = normalize_ref(image.repo_tag)
        annotations = {CONTAINERD_NAME: full, REF_NAME: full.rsplit(":", 1)[1]}
    else:
        annotations = {REF_NAME: image.repo_tag}
    return dict(image.descriptor, annotations=annotations)


def _docker_tag(repo_tag: str) -> str:
    """A tag as docker save records it: with an explicit tag, ``:latest`` when none is given."""
    return repo_tag if ":" in repo_tag.rsplit("/", 1)[-1] else repo_tag + ":latest"


@dataclass
class _BuiltImage:
    config: dict
    config_digest: str
    descriptor: dict                    # of its manifest
    layers: list[tuple[str, str]]       # (blob digest, diff_id), bottom first
    repo_tag: str | None


class _Builder:
    """Collects blobs in a staging directory beside ``out``, then lays them out in one format."""

    def __init__(self, out, format: str, compression: str, media_types: str):
        if format not in FORMATS:
            raise UsageError(f"unknown image format {format!r} (one of {', '.join(FORMATS)})")
        if compression not in COMPRESSIONS:
            raise UsageError(f"unknown compression {compression!r} (one of {', '.join(COMPRESSIONS)})")
        if media_types not in ("oci", "docker"):
            raise UsageError(f"unknown media types {media_types!r} (oci or docker)")
        if media_types == "docker" and compression == "zstd":
            raise UsageError("docker media types have no zstd layer type; use OCI media types")
        self.out = Path(out)
        self.format = format
        self.compression = compression
        self.docker_types = media_types == "docker"
        self.blobs: dict[str, Path] = {}    # digest -> a file holding the blob

    def __enter__(self) -> "_Builder":
        try:
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
        except OSError as exc:
            raise LayermountError(f"{self.out}: cannot write image: {exc.strerror or exc}") from None
        self.blob_dir = self.staging / "blobs" / "sha256"
        self.blob_dir.mkdir(parents=True)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        if isinstance(error, OSError):
            culprit = f"{error.filename}: " if error.filename else ""
            raise LayermountError(f"{self.out}: cannot write image: {culprit}{error.strerror or error}") from None

    # -- blobs
    def add_bytes(self, data: bytes) -> tuple[str, int]:
        digest = sha256_digest(data)
        if digest not in self.blobs:
            path = self.blob_dir / digest.split(":", 1)[1]
            path.write_bytes(data)
            self.blobs[digest] = path
        return digest, len(data)

    def add_json(self, document: dict, media_type: str) -> dict:
        """Store ``document`` as a blob; return its descriptor."""
        digest, size = self.add_bytes(json.dumps(document, separators=(",", ":")).encode())
        return {"mediaType": media_type, "digest": digest, "size": size}

    def add_layer(self, layer: Layer) -> tuple[str, int, str]:
        """Store a layer blob; return (blob digest, blob size, diff_id)."""
        if isinstance(layer, bytes):
            if self.compression == "none":
                digest, size = self.add_bytes(layer)
                return digest, size, digest
            source = io.BytesIO(layer)
        else:
            source = open(layer, "rb")
        with source:
            if self.compression == "none":
                diff = hashlib.sha256()
                while chunk := source.read(CHUNK):
                    diff.update(chunk)
                digest = "sha256:" + diff.hexdigest()
                self.blobs.setdefault(digest, Path(layer))
                return digest, os.path.getsize(layer), digest
            return self._add_compressed(source)

    def _add_compressed(self, source) -> tuple[str, int, str]:
        if self.compression == "gzip":
            compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        else:
            compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
        diff, blob, size = hashlib.sha256(), hashlib.sha256(), 0
        spool = self.staging / f"layer-{len(self.blobs)}.partial"
        with open(spool, "wb") as sink:
            while True:
                chunk = source.read(CHUNK)
                diff.update(chunk)
                packed = compressor.compress(chunk) if chunk else compressor.flush()
                blob.update(packed)
                sink.write(packed)
                size += len(packed)
                if not chunk:
                    break
        digest = "sha256:" + blob.hexdigest()
        path = self.blob_dir / blob.hexdigest()
        os.replace(spool, path)
        self.blobs[digest] = path
        return digest, size, "sha256:" + diff.hexdigest()

    # -- images
    def add_image(self, spec: ImageSpec) -> _BuiltImage:
        layers = [self.add_layer(layer) for layer in spec.layers]
        config = copy.deepcopy(spec.config)
        config["rootfs"] = {"type": "layers", "diff_ids": [diff_id for _, _, diff_id in layers]}
        config_descriptor = self.add_json(config, DOCKER_CONFIG if self.docker_types else OCI_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST if self.docker_types else OCI_MANIFEST,
            "config": config_descriptor,
            "layers": [{"mediaType": self._layer_type(), "digest": digest, "size": size}
                       for digest, size, _ in layers],
        }
        return _BuiltImage(config=config, config_digest=config_descriptor["digest"],
                           descriptor=self.add_json(manifest, manifest["mediaType"]),
                           layers=[(digest, diff_id) for digest, _, diff_id in layers], repo_tag=spec.repo_tag)

    def _layer_type(self) -> str:
        if not self.docker_types:
            return layer_media_type(self.compression)
        return DOCKER_LAYER + (".gzip" if self.compression == "gzip" else "")

    # -- output
    def finish(self, images: list[_BuiltImage], index_manifests: list[dict]) -> None:
        """Lay the blobs out in the format asked for and move the result to ``out``."""
        layout = {"imageLayoutVersion": "1.0.0"}
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index_manifests}
        if self.format == "oci-dir":
            self._finish_directory(layout, index)
            return
        archive = self.staging / "archive.tar"
        with open(archive, "wb") as file:
            with tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as tar:
                if self.format == "docker":
                    self._classic_docker(tar, images)
                else:
                    self._oci_members(tar, layout, index)
                    if self.format == "docker-oci":
                        _add_json_member(tar, "manifest.json", [_docker_oci_entry(image) for image in images])
            file.flush()
            os.fsync(file.fileno())
        os.replace(archive, self.out)

    def _oci_members(self, tar: tarfile.TarFile, layout: dict, index: dict) -> None:
        _add_directory_member(tar, "blobs")
        _add_directory_member(tar, "blobs/sha256")
        for digest, path in self.blobs.items():
            _add_file_member(tar, blob_path(digest), path)
        _add_json_member(tar, LAYOUT_FILE, layout)
        _add_json_member(tar, INDEX_FILE, index)

    def _classic_docker(self, tar: tarfile.TarFile, images: list[_BuiltImage]) -> None:
        """docker save before 25: a directory per layer, named by a v1 id that hashes the chain below it."""
        written, entries, repositories = set(), [], {}
        for image in images:
            parent, layer_files = "", []
            for number, (digest, diff_id) in enumerate(image.layers):
                chain = [diff for _, diff in image.layers[:number + 1]]
                layer_id = hashlib.sha256(json.dumps({"parent": parent, "chain": chain}).encode()).hexdigest()
                if layer_id not in written:
                    written.add(layer_id)
                    _add_directory_member(tar, layer_id)
                    _add_bytes_member(tar, f"{layer_id}/VERSION", b"1.0")
                    legacy = {"id": layer_id, **({"parent": parent} if parent else {}),
                              "created": image.config.get("created", "1970-01-01T00:00:00Z"),
                              "os": image.config.get("os", "linux")}
                    _add_json_member(tar, f"{layer_id}/json", legacy)
                    _add_file_member(tar, f"{layer_id}/layer.tar", self.blobs[digest])
                layer_files.append(f"{layer_id}/layer.tar")
                parent = layer_id
            config_name = image.config_digest.split(":", 1)[1] + ".json"
            if config_name not in written:
                written.add(config_name)
                _add_file_member(tar, config_name, self.blobs[image.config_digest])
            tags = [_docker_tag(image.repo_tag)] if image.repo_tag else None
            entries.append({"Config": config_name, "RepoTags": tags, "Layers": layer_files})
            if tags:
                repository, _, tag = tags[0].rpartition(":")
                repositories.setdefault(repository, {})[tag] = parent
        _add_json_member(tar, "manifest.json", entries)
        if repositories:
            _add_json_member(tar, "repositories", repositories)

    def _finish_directory(self, layout: dict, index: dict) -> None:
        for digest, path in self.blobs.items():
            if path.parent != self.blob_dir:
                shutil.copyfile(path, self.blob_dir / digest.split(":", 1)[1])
        (self.staging / LAYOUT_FILE).write_text(json.dumps(layout))
        (self.staging / INDEX_FILE).write_text(json.dumps(index, separators=(",", ":")))
        os.chmod(self.staging, 0o755)
        if self.out.exists():
            previous = self.out.with_name(self.staging.name + ".old")
            os.rename(self.out, previous)
            os.rename(self.staging, self.out)
            if previous.is_dir():
                shutil.rmtree(previous)
            else:
                previous.unlink()
        else:
            os.rename(self.staging, self.out)


def _docker_oci_entry(image: _BuiltImage) -> dict:
    return {"Config": blob_path(image.config_digest),
            "RepoTags": [_docker_tag(image.repo_tag)] if image.repo_tag else None,
            "Layers": [blob_path(digest) for digest, _ in image.layers]}


def _member(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, FIXED_MTIME
    return info


def _add_directory_member(tar: tarfile.TarFile, name: str) -> None:
    tar.addfile(_member(name, tarfile.DIRTYPE, 0o755))


def _add_bytes_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = _member(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_json_member(tar: tarfile.TarFile, name: str, document) -> None:
    _add_bytes_member(tar, name, json.dumps(document, separators=(",", ":")).encode())


def _add_file_member(tar: tarfile.TarFile, name: str, path: Path) -> None:
    info = _member(name)
    info.size = path.stat().st_size
    with open(path, "rb") as source:
        tar.addfile(info, source)

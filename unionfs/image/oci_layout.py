"""OCI image layouts (image-layout.md), in a directory or a tar, and the blob access both archive formats share.

The same reader serves a layout directory, an OCI archive and the OCI layout
that docker save embeds since 25, because all it needs from its ``Blobs`` is
"read this small file" and "open this big one".
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import stat
import platform as host
import posixpath
import re
import tarfile
import tempfile
import weakref
from dataclasses import dataclass
from typing import BinaryIO, Callable

from ..errors import DigestMismatch, ImageError, UsageError
from ..safepath import open_beneath
from .compression import CHUNK, detect_compression, open_decompressed
from .fields import MANIFEST, check_config, check_depth, check_descriptor, check_fields
from .model import Image, LayerRef

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MANIFEST_TYPES = {OCI_MANIFEST, DOCKER_MANIFEST}
INDEX_TYPES = {OCI_INDEX, DOCKER_MANIFEST_LIST}
# Layer media types are these plus a compression suffix (+gzip, +zstd, .gzip);
# the nondistributable and foreign variants are layers too.
LAYER_TYPE_PREFIXES = ("application/vnd.oci.image.layer.", "application/vnd.docker.image.rootfs.")
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
MAX_JSON_BYTES = 64 << 20     # manifests and configs; anything bigger is not one
MAX_INDEX_DEPTH = 8
# Descriptors listed by all the indexes of one layout together: real ones list
# tens (platforms, attestations), a layout synced from a registry a few thousand.
MAX_DESCRIPTORS = 10_000
# A compressed outer archive is spooled to TMPDIR, which must keep this much free
# afterwards, and may grow to at most this ratio of the compressed size (beyond a floor).
SPOOL_RESERVE_FRACTION = 0.05
SPOOL_RESERVE_BYTES = 64 << 20
MAX_SPOOL_RATIO = 1000
SPOOL_RATIO_FLOOR = 1 << 30
MAX_LINK_HOPS = 40
TAR_BLOCK = 512


def blob_path(digest: str) -> str:
    """Where a blob lives in a layout: blobs/<algorithm>/<hex>."""
    return "blobs/" + digest.replace(":", "/", 1)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_media_type(compression: str) -> str:
    """The OCI layer media type for a blob compressed as ``compression`` ("none", "gzip", "zstd")."""
    return OCI_LAYER if compression == "none" else f"{OCI_LAYER}+{compression}"


# ---- blob access ------------------------------------------------------------

class Blobs:
    """Files of an image source, by slash-separated name relative to its root."""

    label: str   # the source path, for messages

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError

    def opener(self, name: str) -> Callable[[], BinaryIO]:
        """A function that opens a fresh stream of the file each time it is called."""
        raise NotImplementedError

    def read(self, name: str, limit: int = MAX_JSON_BYTES) -> bytes:
        if not self.exists(name):
            raise ImageError(f"{self.label}: missing {name}")
        if self.size(name) > limit:
            raise ImageError(f"{self.label}: {name} is too large ({self.size(name)} bytes) for what it should hold")
        try:
            with self.opener(name)() as stream:
                return stream.read()
        except OSError as exc:
            raise ImageError(f"{self.label}: cannot read {name}: {exc.strerror or exc}") from None

    def read_json(self, name: str, data: bytes | None = None) -> dict | list:
        try:
            document = json.loads(self.read(name) if data is None else data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ImageError(f"{self.label}: {name} is not valid JSON: {exc}") from None
        except RecursionError:
            raise ImageError(f"{self.label}: {name} nests too deep to be an image document") from None
        check_depth(self.label, name, document)
        return document


def _safe_name(label: str, name: str) -> str:
    """``name`` normalized; an absolute name or one climbing out with .. is refused."""
    normalized = posixpath.normpath(name)
    if name.startswith("/") or normalized == ".." or normalized.startswith("../"):
        raise ImageError(f"{label}: {name!r} points outside the image")
    return normalized


class DirectoryBlobs(Blobs):
    """An image unpacked into a directory (an OCI layout, or an extracted docker save).

    Every file is opened beneath the directory with openat2, refusing a
    symlink anywhere on its path and anything but a regular file, as
    go-containerregistry's layout does: a blob planted as a link to
    /etc/shadow is neither read nor has its size told in an error.
    """

    def __init__(self, root: str):
        self.root = root
        self.label = root
        try:
            self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageError(f"{root}: cannot open: {exc.strerror or exc}") from None
        weakref.finalize(self, os.close, self._root_fd)

    def _open(self, name: str) -> int | None:
        """A descriptor of the regular file ``name``; None if there is no file (or a directory) there."""
        relative = os.fsencode(_safe_name(self.label, name))
        try:
            fd = open_beneath(self._root_fd, relative, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EXDEV):
                raise ImageError(f"{self.label}: {name} is or passes through a symlink, "
                                 "which an image directory may not hold") from None
            raise ImageError(f"{self.label}: cannot open {name}: {exc.strerror or exc}") from None
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            return fd
        os.close(fd)
        if stat.S_ISDIR(mode):
            return None
        raise ImageError(f"{self.label}: {name} is not a regular file")

    def exists(self, name: str) -> bool:
        fd = self._open(name)
        if fd is not None:
            os.close(fd)
        return fd is not None

    def size(self, name: str) -> int:
        fd = self._open(name)
        if fd is None:
            raise ImageError(f"{self.label}: missing {name}")
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def opener(self, name: str) -> Callable[[], BinaryIO]:
        def open_blob() -> BinaryIO:
            fd = self._open(name)
            if fd is None:
                raise ImageError(f"{self.label}: missing {name}")
            return os.fdopen(fd, "rb")
        return open_blob


class TarBlobs(Blobs):
    """The members of a tar archive, read in place through ``pread``.

    A compressed archive is first decompressed into an anonymous temporary
    file, because layers are read at their offsets, in parallel. Every
    stream gets its own duplicate of one descriptor, so all of them read the
    archive that was opened even if the path is replaced meanwhile.
    """

    def __init__(self, label: str, fd: int):
        self.label = label
        self._fd = fd
        weakref.finalize(self, os.close, fd)
        try:
            if not _is_tar_header(os.pread(fd, TAR_BLOCK, 0)):
                raise ImageError(f"{label}: not a container image: neither a tar archive nor an image directory")
            with os.fdopen(os.dup(fd), "rb") as archive:
                archive.seek(0)      # the descriptor's offset is shared with whoever peeked at it
                with tarfile.open(fileobj=archive, mode="r:") as tar:
                    members = tar.getmembers()
        except tarfile.TarError as exc:
            raise ImageError(f"{label}: damaged tar archive: {exc}") from None
        except OSError as exc:
            raise ImageError(f"{label}: cannot read: {exc.strerror or exc}") from None
        self._members: dict[str, tarfile.TarInfo] = {}
        for member in members:
            if member.isfile() or member.issym() or member.islnk():
                name = posixpath.normpath(member.name.lstrip("/"))
                if name != ".." and not name.startswith("../"):
                    self._members[name] = member    # a later member replaces an earlier one, as tar does

    @classmethod
    def open_path(cls, path: str) -> "TarBlobs":
        """The archive at ``path``, plain or gzip/zstd compressed; ImageError if it is not a tar."""
        try:
            with open(path, "rb") as file:
                if detect_compression(file.read(4)) == "none":
                    fd = os.dup(file.fileno())
                else:
                    fd = _decompress_to_temporary(path, file)
        except OSError as exc:
            raise ImageError(f"{path}: cannot read: {exc.strerror or exc}") from None
        return cls(path, fd)

    def _resolve(self, name: str) -> tarfile.TarInfo | None:
        """The regular member ``name`` stands for, following symlinks and hardlinks inside the archive."""
        member = self._members.get(_safe_name(self.label, name))
        for _ in range(MAX_LINK_HOPS):
            if member is None or member.isfile():
                return member
            if member.islnk() or member.linkname.startswith("/"):
                target = member.linkname.lstrip("/")     # hardlinks, like absolute symlinks, name from the root
            else:
                target = posixpath.join(posixpath.dirname(member.name.lstrip("/")), member.linkname)
            member = self._members.get(_safe_name(self.label, target))
        raise ImageError(f"{self.label}: {name}: too many levels of links")

    def exists(self, name: str) -> bool:
        return self._resolve(name) is not None

    def size(self, name: str) -> int:
        return self._resolve(name).size

    def opener(self, name: str) -> Callable[[], BinaryIO]:
        member = self._resolve(name)
        label = f"{self.label}: {name}"
        return lambda: _MemberReader(os.dup(self._fd), member.offset_data, member.size, label)


def _is_tar_header(block: bytes) -> bool:
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _decompress_to_temporary(path: str, compressed: BinaryIO) -> int:
    """Decompress all of ``compressed`` into an unnamed file; return a descriptor of it.

    The spool is bounded, so that a small bomb cannot fill TMPDIR for every
    other user of it: by the space free when it starts (less a reserve) and
    by a ratio to the compressed size. Being unnamed, it goes with any failure.
    """
    compressed.seek(0)
    stream = open_decompressed(compressed)
    try:
        head = stream.read(TAR_BLOCK)
        if not _is_tar_header(head):
            raise ImageError("not a container image: compressed, but not a tar archive")
        with tempfile.TemporaryFile() as spool:
            limit, reason = _spool_limit(spool.fileno(), os.fstat(compressed.fileno()).st_size)
            written = spool.write(head)
            while data := stream.read(CHUNK):
                written += len(data)
                if written > limit:
                    raise ImageError(f"decompresses to more than {limit} bytes, {reason}; refused as a "
                                     "decompression bomb (decompress it elsewhere and give the .tar)")
                spool.write(data)
            spool.flush()
            return os.dup(spool.fileno())
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot decompress into a temporary file: {exc.strerror or exc}") from None


def _spool_limit(spool_fd: int, compressed_size: int) -> tuple[int, str]:
    """How many bytes the spool may grow to, and what sets that bound (for the message)."""
    fs = os.fstatvfs(spool_fd)
    reserve = max(SPOOL_RESERVE_BYTES, int(fs.f_blocks * fs.f_frsize * SPOOL_RESERVE_FRACTION))
    by_space = max(0, fs.f_bavail * fs.f_frsize - reserve)
    by_ratio = max(SPOOL_RATIO_FLOOR, compressed_size * MAX_SPOOL_RATIO)
    if by_space < by_ratio:
        return by_space, f"more than the temporary directory {tempfile.gettempdir()} can spare"
    return by_ratio, f"over {MAX_SPOOL_RATIO} times its compressed size"


class _MemberReader(io.RawIOBase):
    """A stream of one tar member's bytes, owning its descriptor; a cut-off archive shows as ImageError."""

    def __init__(self, fd: int, offset: int, size: int, label: str):
        super().__init__()
        self._fd = fd
        self._position = offset
        self._end = offset + size
        self._label = label

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while part := self.read(CHUNK):
                parts.append(part)
            return b"".join(parts)
        wanted = min(size, self._end - self._position)
        if wanted <= 0:
            return b""
        data = os.pread(self._fd, wanted, self._position)
        if not data:
            raise ImageError(f"{self._label}: the archive ends inside this member (truncated)")
        self._position += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


# ---- platforms --------------------------------------------------------------

_MACHINE_PLATFORMS = {
    "x86_64": ("amd64", ""), "amd64": ("amd64", ""), "i386": ("386", ""), "i686": ("386", ""),
    "aarch64": ("arm64", ""), "arm64": ("arm64", ""), "armv8l": ("arm", "v7"),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "armv5tel": ("arm", "v5"),
    "ppc64le": ("ppc64le", ""), "s390x": ("s390x", ""), "riscv64": ("riscv64", ""),
    "mips64": ("mips64le", ""), "loongarch64": ("loong64", ""),
}


@dataclass(frozen=True)
class Platform:
    """os/architecture[/variant] as image indexes and configs name them."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> "Platform":
        parts = text.split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise UsageError(f"platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/arm64")
        return cls(*parts)

    @classmethod
    def host(cls) -> "Platform":
        machine = host.machine()
        architecture, variant = _MACHINE_PLATFORMS.get(machine, (machine, ""))
        return cls("linux", architecture, variant)

    @classmethod
    def of(cls, entry: dict) -> "Platform":
        """The platform an index descriptor's ``platform`` or an image config states."""
        return cls(str(entry.get("os", "")), str(entry.get("architecture", "")), str(entry.get("variant") or ""))

    def _normal_variant(self) -> str:
        # An arm64 without variant is v8 and an arm without one v7 (containerd's reading).
        return self.variant or {"arm64": "v8", "arm": "v7"}.get(self.architecture, "")

    def matches(self, offered: "Platform") -> bool:
        """Whether an image made for ``offered`` is what a request for this platform wants."""
        if (self.os, self.architecture) != (offered.os, offered.architecture):
            return False
        if not self._normal_variant():
            return True        # amd64 asks for no variant and takes any
        return self._normal_variant() == offered._normal_variant()

    def check(self, label: str, config: dict) -> None:
        """ImageError unless the image whose config this is was made for this platform."""
        if not self.matches(Platform.of(config)):
            raise ImageError(f"{label}: the image is for {Platform.of(config)}, not {self}")

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)


# ---- references -------------------------------------------------------------

def normalize_ref(ref: str) -> str:
    """A reference in full form: alpine → docker.io/library/alpine:latest, as docker reads it."""
    name, at, digest = ref.partition("@")
    if not at and ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    first, slash, _ = name.partition("/")
    if not slash:
        name = "docker.io/library/" + name
    elif "." not in first and ":" not in first and first != "localhost":
        name = "docker.io/" + name
    return name + at + digest


def same_ref(wanted: str, name: str) -> bool:
    return wanted == name or normalize_ref(wanted) == normalize_ref(name)


def select_by_ref(label: str, images: list, names_of: Callable[[object], list[str]], ref: str | None,
                  same_image: Callable[[object, object], bool]) -> list:
    """The entries of ``images`` that ``ref`` names (all of them when they are one image and no ref is given)."""
    if ref is not None:
        chosen = [image for image in images if any(same_ref(ref, name) for name in names_of(image))]
        if not chosen:
            raise ImageError(f"{label}: no image {ref!r} in it; it holds {_listing(images, names_of)}")
        return chosen
    if all(same_image(images[0], image) for image in images[1:]):
        return images
    raise ImageError(f"{label}: holds several images ({_listing(images, names_of)}); choose one with --image REF")


def _listing(images: list, names_of: Callable[[object], list[str]]) -> str:
    names = [name for image in images for name in names_of(image)]
    unnamed = sum(1 for image in images if not names_of(image))
    if unnamed:
        names.append(f"{unnamed} untagged")
    return ", ".join(names) or "no images"


# ---- the reader -------------------------------------------------------------

def read_oci_layout(blobs: Blobs, source: str, *, platform: Platform | None, ref: str | None) -> Image:
    """The image an OCI layout's index.json leads to, for ``ref`` and ``platform``."""
    layout = blobs.read_json(LAYOUT_FILE)
    if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
        raise ImageError(f"{blobs.label}: {LAYOUT_FILE} has no imageLayoutVersion: not an OCI layout")
    reader = _LayoutReader(blobs)
    index = blobs.read_json(INDEX_FILE)
    descriptors = reader.descriptors(index, INDEX_FILE)
    if not descriptors:
        raise ImageError(f"{blobs.label}: {INDEX_FILE} lists no images")
    # Entries under one name (or all unnamed) are one image for several platforms.
    chosen = select_by_ref(blobs.label, descriptors, _ref_names, ref,
                           lambda first, other: first["digest"] == other["digest"]
                           or _ref_names(first) == _ref_names(other))
    manifest_descriptor, manifest = reader.pick_platform(chosen, platform)
    repo_tags = list(dict.fromkeys(name for descriptor in chosen for name in _ref_names(descriptor)[:1]))
    return reader.image(manifest_descriptor, manifest, source, repo_tags=repo_tags, format="oci-layout")


def _ref_names(descriptor: dict) -> list[str]:
    """The names a descriptor in index.json goes by, most complete first."""
    annotations = descriptor.get("annotations") or {}
    return [name for name in (annotations.get(CONTAINERD_NAME), annotations.get(REF_NAME)) if name]


class _LayoutReader:
    """Follows descriptors through a layout, verifying every manifest and config it reads."""

    def __init__(self, blobs: Blobs):
        self.blobs = blobs
        self.label = blobs.label
        self.listed = 0                           # descriptors met in all indexes so far
        self.documents: dict[str, dict] = {}      # manifests and indexes read, by digest

    def descriptors(self, index: object, where: str) -> list[dict]:
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list):
            raise ImageError(f"{self.label}: {where} is not an image index (no manifests list)")
        self.listed += len(manifests)
        if self.listed > MAX_DESCRIPTORS:
            raise ImageError(f"{self.label}: its indexes list more than {MAX_DESCRIPTORS} descriptors in all; "
                             "refused as a hostile layout")
        for number, entry in enumerate(manifests, 1):
            check_descriptor(self.label, f"{where}: descriptor {number}", entry)
            self._check_digest(entry, where)
        return manifests

    def _check_digest(self, descriptor: object, where: str) -> str:
        digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
        if not isinstance(digest, str) or not SHA256_DIGEST.fullmatch(digest):
            raise ImageError(f"{self.label}: {where}: descriptor without a sha256 digest ({digest!r})")
        return digest

    def read_verified(self, descriptor: dict, what: str) -> bytes:
        """A small blob's bytes, after checking them against the descriptor's size and digest."""
        digest = self._check_digest(descriptor, what)
        name = blob_path(digest)
        if not self.blobs.exists(name):
            raise ImageError(f"{self.label}: missing blob {name} ({what})")
        data = self.blobs.read(name)
        actual = sha256_digest(data)
        if actual != digest:
            raise DigestMismatch(f"{self.label}: {what} blob {name} does not match its digest: content is {actual}")
        if descriptor.get("size") not in (None, len(data)):
            raise DigestMismatch(f"{self.label}: {what} blob {name} is {len(data)} bytes, "
                                 f"its descriptor says {descriptor.get('size')}")
        return data

    def read_json(self, descriptor: dict, what: str, data: bytes | None = None) -> dict:
        data = self.read_verified(descriptor, what) if data is None else data
        document = self.blobs.read_json(blob_path(descriptor["digest"]), data)
        if not isinstance(document, dict):
            raise ImageError(f"{self.label}: {what} blob {blob_path(descriptor['digest'])} is not a JSON object")
        return document

    def manifests_under(self, descriptors: list[dict]) -> list[tuple[dict, dict]]:
        """(descriptor, manifest) of every image manifest reachable through nested indexes, each once.

        Every index is walked and every document read once however often it
        is listed, and ``descriptors`` caps how many may be listed in all: a
        few KB of indexes that each list the one below 200 times must not
        make the walk exponential. (That also ends any cycle, which verified
        digests make impossible to build anyway.)
        """
        found: dict[tuple, tuple[dict, dict]] = {}
        walked: set[str] = set()
        pending = [(descriptor, 0) for descriptor in reversed(descriptors)]
        while pending:
            descriptor, depth = pending.pop()
            digest = descriptor["digest"]
            document = self.documents.get(digest)
            if document is None:
                document = self.read_json(descriptor, "manifest")
                check_fields(self.label, f"manifest {blob_path(digest)}", document, MANIFEST)
                self.documents[digest] = document
            media_type = descriptor.get("mediaType") or document.get("mediaType") or ""
            if media_type in INDEX_TYPES or (not media_type and "manifests" in document):
                if digest in walked:
                    continue
                walked.add(digest)
                if depth >= MAX_INDEX_DEPTH:
                    raise ImageError(f"{self.label}: image indexes nested more than {MAX_INDEX_DEPTH} deep")
                nested = self.descriptors(document, f"index {blob_path(digest)}")
                pending.extend((entry, depth + 1) for entry in reversed(nested))
            elif document.get("schemaVersion") == 1:
                raise ImageError(f"{self.label}: {blob_path(descriptor['digest'])} is a docker schema 1 "
                                 "manifest, which is not supported")
            elif media_type in MANIFEST_TYPES or (not media_type and "layers" in document):
                platform = descriptor.get("platform") or {}
                found.setdefault((digest, json.dumps(platform, sort_keys=True)), (descriptor, document))
            else:
                raise ImageError(f"{self.label}: {blob_path(descriptor['digest'])}: unsupported manifest "
                                 f"media type {media_type!r}")
        return list(found.values())

    def platform_of(self, descriptor: dict, manifest: dict) -> Platform:
        if isinstance(descriptor.get("platform"), dict):
            return Platform.of(descriptor["platform"])
        return Platform.of(check_config(self.label, self.read_json(self._config_descriptor(manifest, descriptor),
                                                                   "config")))

    def pick_platform(self, descriptors: list[dict], wanted: Platform | None) -> tuple[dict, dict]:
        candidates = [(descriptor, manifest) for descriptor, manifest in self.manifests_under(descriptors)
                      if not _is_attestation(descriptor)]
        if not candidates:
            raise ImageError(f"{self.label}: no image manifest in it")
        if len(candidates) == 1 and wanted is None:
            return candidates[0]
        target = wanted or Platform.host()
        offered = [(self.platform_of(descriptor, manifest), descriptor, manifest)
                   for descriptor, manifest in candidates]
        for platform, descriptor, manifest in offered:
            if target.matches(platform):
                return descriptor, manifest
        present = ", ".join(str(platform) for platform, _, _ in offered)
        raise ImageError(f"{self.label}: no image for platform {target}; it has {present}")

    def _config_descriptor(self, manifest: dict, descriptor: dict) -> dict:
        config = manifest.get("config")
        if not isinstance(config, dict):
            raise ImageError(f"{self.label}: manifest {blob_path(descriptor['digest'])} names no config")
        return check_descriptor(self.label, f"manifest {blob_path(descriptor['digest'])}: config", config)

    def image(self, descriptor: dict, manifest: dict, source: str, *, repo_tags: list[str], format: str) -> Image:
        config_descriptor = self._config_descriptor(manifest, descriptor)
        config_blob = self.read_verified(config_descriptor, "config")
        config = check_config(self.label, self.read_json(config_descriptor, "config", config_blob))
        layer_descriptors = manifest.get("layers")
        if not isinstance(layer_descriptors, list):
            raise ImageError(f"{self.label}: manifest {blob_path(descriptor['digest'])} has no layers list")
        diff_ids = config_diff_ids(self.label, config, len(layer_descriptors))
        layers = []
        for number, (layer, diff_id) in enumerate(zip(layer_descriptors, diff_ids), 1):
            check_descriptor(self.label, f"layer {number}", layer)
            media_type = str(layer.get("mediaType", "")) if isinstance(layer, dict) else ""
            if not media_type.startswith(LAYER_TYPE_PREFIXES) or "encrypted" in media_type:
                raise ImageError(f"{self.label}: layer {number} has unsupported media type {media_type!r}")
            digest = self._check_digest(layer, f"layer {number}")
            layers.append(layer_ref(self.blobs, blob_path(digest), digest=digest, diff_id=diff_id,
                                    size=layer.get("size"), media_type=media_type))
        return Image(source=source, layers=layers, config=config, config_digest=config_descriptor["digest"],
                     repo_tags=repo_tags, format=format, config_blob=config_blob)



def layer_ref(blobs: Blobs, name: str, *, digest: str | None, diff_id: str, size: int | None,
              media_type: str) -> LayerRef:
    """A reference to the layer blob ``name``, which must be there and of the size promised."""
    if not blobs.exists(name):
        raise ImageError(f"{blobs.label}: missing blob {name} (layer)")
    actual = blobs.size(name)
    if size is not None and size != actual:
        raise DigestMismatch(f"{blobs.label}: layer blob {name} is {actual} bytes, its descriptor says {size}")
    return LayerRef(name=name, open=blobs.opener(name), digest=digest, diff_id=diff_id,
                    size=actual, media_type=media_type)

def _is_attestation(descriptor: dict) -> bool:
    """Build attestations (SBOM, provenance) ride in indexes as unknown/unknown manifests."""
    annotations = descriptor.get("annotations") or {}
    platform = descriptor.get("platform") or {}
    return (annotations.get("vnd.docker.reference.type") == "attestation-manifest"
            or (platform.get("os"), platform.get("architecture")) == ("unknown", "unknown"))


def config_diff_ids(label: str, config: dict, layer_count: int) -> list[str]:
    """The config's rootfs.diff_ids, one per layer and each a sha256 digest."""
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise ImageError(f"{label}: image config has no rootfs.diff_ids")
    if len(diff_ids) != layer_count:
        raise ImageError(f"{label}: image config lists {len(diff_ids)} diff_ids for {layer_count} layers")
    for diff_id in diff_ids:
        if not isinstance(diff_id, str) or not SHA256_DIGEST.fullmatch(diff_id):
            raise ImageError(f"{label}: image config has a malformed diff_id {diff_id!r}")
    return diff_ids

"""Image references as the user types them: skopeo's transports, docker's short names.

``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`` names an image in a registry,
``docker-archive:PATH``, ``oci:DIR[:TAG]`` and ``oci-archive:PATH[:TAG]`` name
files, and a bare argument is a file when one of that name exists, else a
registry reference read the way docker reads it (``nginx`` is
``docker.io/library/nginx:latest``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from ..errors import UsageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

# The distribution reference grammar (distribution/reference/regexp.go), written out.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                   r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
# What looks like a file name rather than an image name, when no such file exists.
_FILE_LIKE = re.compile(r"(?:^[./~]|\.(?:tar|tgz|tar\.gz|tar\.zst|tzst|oci|img)$)")


@dataclass(frozen=True)
class RegistryRef:
    """One image in a registry: where (registry host[:port]), which repository, which tag or digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes into /v2/<repository>/manifests/<reference>."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def with_digest(self, digest: str) -> "RegistryRef":
        return RegistryRef(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    def allows_plain_http(self) -> bool:
        """localhost and 127.0.0.0/8 may speak plain HTTP without --tls-verify=false, as docker allows."""
        host = self.api_host.rsplit(":", 1)[0] if not self.api_host.startswith("[") else \
            self.api_host[1:].split("]", 1)[0]
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def parse_registry_ref(text: str, *, given: str | None = None) -> RegistryRef:
    """``[HOST[:PORT]/]REPO[:TAG][@DIGEST]`` in docker's reading; UsageError naming ``given`` when malformed."""
    shown = given or text
    name, at, digest = text.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise UsageError(f"{shown}: not an image reference: digest {digest!r} is not sha256:<64 hex digits>")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise UsageError(f"{shown}: not an image reference: bad tag {tag!r}")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, repository = first, rest
        if not _HOST.fullmatch(registry):
            raise UsageError(f"{shown}: not an image reference: bad registry host {registry!r}")
    else:
        registry, repository = DOCKER_HUB, name
    if registry in (DOCKER_HUB, "index.docker.io") and "/" not in repository:
        registry, repository = DOCKER_HUB, "library/" + repository
    if not _REPOSITORY.fullmatch(repository) or len(repository) > 255:
        raise UsageError(f"{shown}: not an image reference: bad repository name {repository!r} "
                         "(lower-case letters, digits and . _ - separators)")
    if tag is None and not at:
        tag = DEFAULT_TAG
    return RegistryRef(registry, repository, tag, digest or None)


@dataclass(frozen=True)
class Source:
    """Where an image comes from: a file (``path``, maybe a ``ref`` inside it) or a registry (``registry``)."""

    path: str | None = None
    ref: str | None = None
    registry: RegistryRef | None = None


def parse_source(text: str) -> Source:
    """Tell apart a registry reference, a transport-prefixed file and a plain path."""
    if text.startswith("docker://"):
        return Source(registry=parse_registry_ref(text[len("docker://"):], given=text))
    if text.startswith("docker-archive:"):
        return Source(path=_required(text, text[len("docker-archive:"):]))
    for transport in ("oci:", "oci-archive:"):
        if text.startswith(transport):
            path, ref = _split_tag(text[len(transport):])
            return Source(path=_required(text, path), ref=ref)
    if os.path.lexists(text) or _FILE_LIKE.search(text) or text != text.lower():
        return Source(path=text)
    try:
        return Source(registry=parse_registry_ref(text))
    except UsageError:
        return Source(path=text)      # neither an image name nor a file: "no such file" says it best


def _required(text: str, path: str) -> str:
    if not path:
        raise UsageError(f"{text}: names no path")
    return path


def _split_tag(rest: str) -> tuple[str, str | None]:
    """``DIR[:TAG]``: the last colon starts a tag unless a file of the whole name exists."""
    if os.path.lexists(rest) or ":" not in rest:
        return rest, None
    path, tag = rest.rsplit(":", 1)
    return path, tag or None

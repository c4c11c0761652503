"""OCI distribution: pull an image's manifests, config and layer streams from a registry, and push one.

Written on httpx (sync: the store streams each layer in a forked worker, so
blocking file-like reads are what it needs). Everything a registry sends is
untrusted: manifests are capped at 4 MiB and checked against their digests,
blobs are cut off at the size their descriptor gives, error messages are
escaped before they reach a terminal, and a redirect never carries our
Authorization header to another origin.

A layer stream survives dropped connections: it asks for the rest with
``Range: bytes=N-`` and appends only a 206 whose Content-Range starts at N,
so an interrupted download costs what was left, not the whole blob again.
What it received is also appended to a partial file in the store, so a pull
that was killed or gave up resumes there the next time.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import stat
import time
import urllib.parse
from contextlib import closing
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator

import httpx

from .. import textsafe
from ..errors import (
    DigestMismatch,
    ImageError,
    LayermountError,
    NetworkError,
    UsageError,
)
from .auth import Challenge, RegistryOptions, find_credentials, parse_challenges
from .fields import check_config, check_depth, check_descriptor
from .model import Image, LayerRef
from .oci_layout import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_TYPES,
    LAYER_TYPE_PREFIXES,
    MANIFEST_TYPES,
    MAX_INDEX_DEPTH,
    MAX_JSON_BYTES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    SHA256_DIGEST,
    Platform,
    _is_attestation,
    config_diff_ids,
    sha256_digest,
)
from .reference import RegistryRef

MANIFEST_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST))
MAX_MANIFEST_BYTES = 4 << 20        # containerd's cap: nothing real comes near it
MAX_SMALL_BODY = 64 << 10           # error bodies and token answers
MAX_REDIRECTS = 5
RETRIES = 5                         # consecutive failed attempts of one blob before giving up
MAX_RECONNECTS = 20                 # attempts of one blob in all, so a trickling server cannot keep us forever
BACKOFF = 0.25                      # seconds before the first retry, doubled for each next one
STREAM_CHUNK = 1 << 18
TIMEOUT = httpx.Timeout(30.0, connect=10.0)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_RETRYABLE_STATUS = {500, 502, 503, 504}


def shown(text: object) -> str:
    """A registry-supplied string made safe for a one-line message (control characters escaped)."""
    return textsafe.shown(str(text))


class RegistryError(ImageError):
    """The registry refused: a missing or bad image, or no access to it (exit 3)."""


@dataclass
class _Token:
    value: str
    expires: float


@dataclass
class Registry:
    """One repository on one registry, with its authentication state.

    The httpx client is made per process: forked unpack workers must not
    share the parent's connections.
    """

    ref: RegistryRef
    options: RegistryOptions = field(default_factory=RegistryOptions)
    actions: str = "pull"
    extra_scopes: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.label = str(self.ref)
        self._base: str | None = None
        self._challenge: Challenge | None = None
        self._tokens: dict[tuple, _Token] = {}
        self._client_pid = None
        self._client: httpx.Client | None = None
        self._creds = self.options.creds or find_credentials(self.ref.registry, self.ref.repository)

    # ---- connection --------------------------------------------------------
    def _http(self) -> httpx.Client:
        if self._client is None or self._client_pid != os.getpid():
            self._client = httpx.Client(verify=self.options.tls_verify, timeout=TIMEOUT, follow_redirects=False,
                                        trust_env=False)
            self._client_pid = os.getpid()
        return self._client

    def probe(self) -> None:
        """GET /v2/: find the scheme that answers and the authentication the registry wants."""
        schemes = ["https"]
        if not self.options.tls_verify or self.ref.allows_plain_http():
            schemes.append("http")
        last = None
        for scheme in schemes:
            base = f"{scheme}://{self.ref.api_host}"
            try:
                response = self._http().get(base + "/v2/")
            except httpx.HTTPError as exc:
                last = exc
                continue
            with closing(response):
                self._base = base
                if response.status_code == 401:
                    self._learn_challenge(response)
                elif response.status_code != 200:
                    self._fail(response, "registry API check (GET /v2/)")
            return
        raise NetworkError(f"{self.label}: cannot reach registry {self.ref.api_host}: {_describe(last)}")

    def _learn_challenge(self, response: httpx.Response) -> None:
        offered = parse_challenges(response.headers.get("www-authenticate", ""))
        for scheme in ("bearer", "basic"):
            for challenge in offered:
                if challenge.scheme == scheme:
                    self._challenge = challenge
                    return
        raise RegistryError(f"{self.label}: UNAUTHORIZED: the registry asks for an authentication scheme "
                            f"layermount does not speak ({shown(response.headers.get('www-authenticate', ''))[:80]})")

    def _scopes(self) -> tuple[str, ...]:
        scopes = [f"repository:{self.ref.repository}:{self.actions}", *self.extra_scopes]
        if self._challenge is not None and (asked := self._challenge.params.get("scope")):
            scopes += [scope for scope in asked.split(" ") if scope and scope not in scopes]
        return tuple(scopes)

    def _authorization(self) -> str | None:
        if self._challenge is None:
            return None
        if self._challenge.scheme == "basic":
            return self._creds.basic_header() if self._creds else None
        scopes = self._scopes()
        token = self._tokens.get(scopes)
        if token is None or token.expires <= time.time():
            token = self._fetch_token(scopes)
            self._tokens[scopes] = token
        return f"Bearer {token.value}"

    def _fetch_token(self, scopes: tuple[str, ...]) -> _Token:
        """A token from the challenge's realm (docker's token auth spec), sent our credentials if we have any."""
        realm = self._challenge.params.get("realm", "")
        if urllib.parse.urlsplit(realm).scheme not in ("http", "https"):
            raise RegistryError(f"{self.label}: UNAUTHORIZED: the registry names no usable token realm "
                                f"({shown(realm)[:80]!s})")
        params = [("scope", scope) for scope in scopes]
        if service := self._challenge.params.get("service"):
            params.insert(0, ("service", service))
        headers = {"Authorization": self._creds.basic_header()} if self._creds else {}
        try:
            with self._http().stream("GET", realm, params=params, headers=headers) as response:
                body = _read_capped(response, MAX_SMALL_BODY, f"{self.label}: token answer")
                if response.status_code != 200:
                    raise RegistryError(f"{self.label}: {_error_text(body, response.status_code)}: "
                                        f"the token server refused{self._creds_hint()}")
        except httpx.HTTPError as exc:
            raise NetworkError(f"{self.label}: cannot reach the token server: {_describe(exc)}") from None
        try:
            answer = json.loads(body)
            value = answer.get("token") or answer.get("access_token")
            lifetime = answer.get("expires_in", 60)
        except (ValueError, AttributeError):
            answer, value, lifetime = None, None, 0
        if not isinstance(value, str) or not value or not value.isprintable():
            raise RegistryError(f"{self.label}: the token server's answer holds no token")
        if not isinstance(lifetime, (int, float)) or lifetime <= 0:
            lifetime = 60
        return _Token(value, time.time() + max(float(lifetime) - 10, 1))

    def _creds_hint(self) -> str:
        if self._creds is None:
            return (f" (no credentials for {self.ref.registry}: give --creds USER:PASSWORD or log in with "
                    "podman login / docker login)")
        return f" (as user {shown(self._creds.username)})"

    def _url(self, path: str) -> str:
        if self._base is None:
            self.probe()
        return urllib.parse.urljoin(self._base + "/", path)

    def request(self, method: str, path: str, *, what: str, expect: tuple[int, ...] = (200,),
                headers: dict | None = None, content=None, replayable: bool = True) -> httpx.Response:
        """A streamed response with a status in ``expect``; the caller closes it.

        A 401 renews the token once (the registry may want more scope);
        redirects are followed by hand, dropping Authorization across origins.
        """
        url = self._url(path)
        for attempt in range(2):
            response = self._send(method, url, dict(headers or {}), self._authorization(), content)
            basic_refused = self._challenge is not None and self._challenge.scheme == "basic"
            if response.status_code == 401 and attempt == 0 and replayable and not basic_refused:
                self._learn_challenge(response)     # a first challenge, or a token wanting more scope
                response.close()
                self._tokens.clear()
                continue
            break
        if response.status_code not in expect:
            self._fail(response, what)
        return response

    def _send(self, method: str, url: str, headers: dict, authorization: str | None, content) -> httpx.Response:
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            if authorization and _origin(url) == origin:
                headers["Authorization"] = authorization
            else:
                headers.pop("Authorization", None)
            try:
                request = self._http().build_request(method, url, headers=headers, content=content)
                response = self._http().send(request, stream=True)
            except httpx.HTTPError as exc:
                raise NetworkError(f"{self.label}: {method} {_path_of(url)}: {_describe(exc)}") from None
            location = response.headers.get("location")
            if response.status_code not in (301, 302, 303, 307, 308) or not location:
                return response
            response.close()
            url = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                raise RegistryError(f"{self.label}: redirected to a non-HTTP address")
            if response.status_code == 303:
                method, content = "GET", None
        raise RegistryError(f"{self.label}: more than {MAX_REDIRECTS} redirects")

    def _fail(self, response: httpx.Response, what: str):
        try:
            body = _read_capped(response, MAX_SMALL_BODY, what)
        except LayermountError:
            body = b""
        finally:
            response.close()
        status = response.status_code
        text = f"{self.label}: {what}: {_error_text(body, status)}"
        if status == 401:
            text += self._creds_hint()
        if status in _RETRYABLE_STATUS or status == 429:
            raise NetworkError(text)
        raise RegistryError(text)

    # ---- reading -----------------------------------------------------------
    def manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest or index; one pulled by digest must match it."""
        path = f"/v2/{self.ref.repository}/manifests/{reference}"
        with closing(self.request("GET", path, what=f"manifest {shown(reference)}",
                          headers={"Accept": MANIFEST_ACCEPT})) as response:
            body = _read_capped(response, MAX_MANIFEST_BYTES, f"{self.label}: manifest {shown(reference)}")
            media_type = response.headers.get("content-type", "").split(";")[0].strip()
            claimed = response.headers.get("docker-content-digest")
        digest = sha256_digest(body)
        if SHA256_DIGEST.fullmatch(reference) and digest != reference:
            raise DigestMismatch(f"{self.label}: manifest {reference} does not match its digest: content is {digest}")
        if claimed and SHA256_DIGEST.fullmatch(claimed) and claimed != digest:
            raise DigestMismatch(f"{self.label}: manifest digest mismatch: the registry says {claimed}, "
                                 f"content is {digest}")
        return body, media_type, digest

    def blob_bytes(self, digest: str, limit: int, what: str) -> bytes:
        with closing(self.request("GET", f"/v2/{self.ref.repository}/blobs/{digest}", what=f"{what} blob {digest}",
                          headers={"Accept-Encoding": "identity"})) as response:
            body = _read_capped(response, limit, f"{self.label}: {what} blob {digest}", raw=True)
        if sha256_digest(body) != digest:
            raise DigestMismatch(f"{self.label}: {what} blob {digest} does not match its digest: "
                                 f"content is {sha256_digest(body)}")
        return body

    def open_blob(self, digest: str, size: int, partial_dir: str | os.PathLike | None = None) -> "BlobStream":
        return BlobStream(self, digest, size, partial_dir)

    # ---- writing -----------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        with closing(self.request("HEAD", f"/v2/{self.ref.repository}/blobs/{digest}", what=f"blob {digest}",
                          expect=(200, 404))) as response:
            return response.status_code == 200

    def mount_blob(self, digest: str, from_repository: str) -> bool:
        """Cross-repository mount: True if the registry linked the blob without an upload."""
        query = urllib.parse.urlencode({"mount": digest, "from": from_repository})
        with closing(self.request("POST", f"/v2/{self.ref.repository}/blobs/uploads/?{query}", what=f"mount of {digest}",
                          expect=(201, 202))) as response:
            if response.status_code == 202:
                self._cancel_upload(response)
            return response.status_code == 201

    def _cancel_upload(self, response: httpx.Response) -> None:
        if location := response.headers.get("location"):
            try:
                self.request("DELETE", location, what="cancel of an upload", expect=(204, 404, 200, 202)).close()
            except LayermountError:
                pass     # an upload session left open expires on the registry by itself

    def upload_blob(self, digest: str, size: int, open_blob: Callable[[], BinaryIO]) -> None:
        """POST for an upload session, then one PUT of the whole blob with its digest."""
        with closing(self.request("POST", f"/v2/{self.ref.repository}/blobs/uploads/", what=f"upload of {digest}",
                          expect=(202,), headers={"Content-Length": "0"})) as response:
            location = response.headers.get("location")
        if not location:
            raise RegistryError(f"{self.label}: the registry started an upload of {digest} without a Location")
        separator = "&" if "?" in location else "?"
        target = location + separator + urllib.parse.urlencode({"digest": digest})
        with open_blob() as stream:
            self.request("PUT", target, what=f"upload of {digest}", expect=(201,), replayable=False,
                         headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
                         content=_chunks(stream)).close()

    def put_manifest(self, reference: str, body: bytes, media_type: str) -> None:
        self.request("PUT", f"/v2/{self.ref.repository}/manifests/{reference}", what=f"manifest {reference}",
                     expect=(201,), headers={"Content-Type": media_type}, content=body).close()


class BlobStream(io.RawIOBase):
    """A layer blob as a forward-only stream that resumes with Range after a dropped connection."""

    def __init__(self, registry: Registry, digest: str, size: int, partial_dir: str | os.PathLike | None = None):
        super().__init__()
        self._registry = registry
        self._digest = digest
        self._size = size
        self._label = f"{registry.label}: blob {digest}"
        self._offset = 0
        self._response: httpx.Response | None = None
        self._chunks: Iterator[bytes] | None = None
        self._pending = b""
        self._failures = 0
        self._attempts = 0
        self._replay = self._partial = None
        self._keep_partial = False
        if partial_dir is not None:
            self._open_partial(os.path.join(partial_dir, digest.split(":", 1)[1]))

    def _open_partial(self, path: str) -> None:
        """Replay what an earlier pull received (the caller holds the layer's lock), then append to it."""
        self._partial_path = path
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError:
            fd = None          # a symlink (or worse) where our partial file goes
        if fd is not None and not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            fd = None
        if fd is None:         # replaced by a fresh regular file, never followed or read
            os.unlink(path)
            fd = os.open(path, flags | os.O_EXCL, 0o600)
        if os.fstat(fd).st_size > self._size:
            os.ftruncate(fd, 0)
        self._partial = os.fdopen(fd, "ab", buffering=0)
        self._replay = open(f"/proc/self/fd/{fd}", "rb", buffering=0)     # the same file, read from its start

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while part := self.read(STREAM_CHUNK):
                parts.append(part)
            return b"".join(parts)
        if self._replay is not None:
            data = self._replay.read(min(size, STREAM_CHUNK, self._size - self._offset))
            if data:
                self._offset += len(data)
                self._finish_if_complete()
                return data
            self._replay.close()
            self._replay = None
        while not self._pending:
            if self._offset >= self._size:
                return b""
            self._next_chunk()
        if len(self._pending) <= size:
            data, self._pending = self._pending, b""
        else:
            data, self._pending = self._pending[:size], self._pending[size:]
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def _next_chunk(self) -> None:
        if self._chunks is None:
            self._connect()
            if self._chunks is None:
                return
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self._retry("the connection closed early")
            return
        except httpx.HTTPError as exc:
            self._retry(_describe(exc))
            return
        if self._offset + len(chunk) > self._size:
            raise ImageError(f"the registry sends more than the {self._size} bytes its descriptor gives")
        if chunk:
            self._failures = 0
            if self._partial is not None:
                self._partial.write(chunk)
        self._offset += len(chunk)
        self._pending = chunk
        self._finish_if_complete()

    def _finish_if_complete(self) -> None:
        """All of it arrived: the store verifies it now, and a partial file has nothing left to resume."""
        if self._offset >= self._size and self._partial is not None:
            self._discard_partial()

    def _discard_partial(self) -> None:
        for stream in (self._replay, self._partial):
            if stream is not None:
                stream.close()
        self._replay = self._partial = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._partial_path)

    def _connect(self) -> None:
        self._attempts += 1
        headers = {"Accept-Encoding": "identity"}
        if self._offset:
            headers["Range"] = f"bytes={self._offset}-"
        try:
            response = self._registry.request("GET", f"/v2/{self._registry.ref.repository}/blobs/{self._digest}",
                                              what=f"blob {self._digest}", expect=(200, 206), headers=headers)
        except NetworkError as exc:
            self._retry(str(exc).rsplit(": ", 1)[-1])
            return
        chunks = response.iter_raw()     # as the bytes arrive: a cut loses nothing already received
        if self._offset and response.status_code == 206:
            if not _range_starts_at(response.headers.get("content-range", ""), self._offset, self._size):
                response.close()
                raise ImageError("the registry answered a resumed download with the wrong range "
                                 f"({shown(response.headers.get('content-range', ''))[:60]})")
        elif self._offset:
            chunks = _skip(chunks, self._offset)    # no Range support: fetch again, drop what we have
        self._response, self._chunks = response, chunks

    def _retry(self, reason: str) -> None:
        self._drop()
        self._failures += 1
        if self._failures > RETRIES or self._attempts >= MAX_RECONNECTS:
            self._keep_partial = True      # the bytes were fine, the network was not: resume from them later
            raise NetworkError(f"{self._label}: download failed after {self._attempts} attempts "
                               f"at byte {self._offset} of {self._size}: {reason}")
        time.sleep(BACKOFF * 2 ** (self._failures - 1))

    def _drop(self) -> None:
        if self._response is not None:
            self._response.close()
        self._response = self._chunks = None

    def close(self) -> None:
        """A stream abandoned for any reason but the network (bad content, an unpack that failed)
        leaves no partial file to resume from."""
        self._drop()
        if self._partial is not None:
            if self._keep_partial:
                self._partial.close()
                if self._replay is not None:
                    self._replay.close()
            else:
                self._discard_partial()
        super().close()


# ---- reading an image ---------------------------------------------------------

def open_registry_image(ref: RegistryRef, options: RegistryOptions, *, platform: Platform | None) -> Image:
    """The image ``ref`` names, its layers left as streams for the store to pull."""
    registry = Registry(ref, options)
    registry.probe()
    body, media_type, digest = registry.manifest(ref.reference)
    repo_digest = digest
    for _ in range(MAX_INDEX_DEPTH):
        document = _json_object(registry.label, body, "manifest")
        media_type = media_type if media_type in MANIFEST_TYPES | INDEX_TYPES else document.get("mediaType", "")
        if media_type in INDEX_TYPES or (not media_type and "manifests" in document):
            chosen = _choose_platform(registry.label, document, platform)
            body, media_type, digest = registry.manifest(chosen["digest"])
            if chosen.get("mediaType") in MANIFEST_TYPES | INDEX_TYPES:
                media_type = chosen["mediaType"]
            continue
        if document.get("schemaVersion") == 1:
            raise ImageError(f"{registry.label}: a docker schema 1 manifest, which is not supported")
        if media_type not in MANIFEST_TYPES and not (not media_type and "layers" in document):
            raise ImageError(f"{registry.label}: unsupported manifest media type {shown(media_type)!s}")
        return _image(registry, document, platform, repo_digest)
    raise ImageError(f"{registry.label}: image indexes nested more than {MAX_INDEX_DEPTH} deep")


def _choose_platform(label: str, index: dict, wanted: Platform | None) -> dict:
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not all(isinstance(entry, dict) for entry in manifests):
        raise ImageError(f"{label}: the image index has no manifests list")
    for number, entry in enumerate(manifests, 1):
        check_descriptor(label, f"image index entry {number}", entry)
    candidates = [entry for entry in manifests if not _is_attestation(entry)]
    for entry in candidates:
        if not isinstance(entry.get("digest"), str) or not SHA256_DIGEST.fullmatch(entry["digest"]):
            raise ImageError(f"{label}: the image index has an entry without a sha256 digest")
    if not candidates:
        raise ImageError(f"{label}: the image index lists no image")
    if len(candidates) == 1 and wanted is None:
        return candidates[0]
    target = wanted or Platform.host()
    offered = [(Platform.of(entry["platform"]) if isinstance(entry.get("platform"), dict) else None, entry)
               for entry in candidates]
    for platform, entry in offered:
        if platform is not None and target.matches(platform):
            return entry
    present = ", ".join(shown(platform) for platform, _ in offered if platform is not None) or "no platforms named"
    raise ImageError(f"{label}: no image for platform {target}; it has {present}")


def _image(registry: Registry, manifest: dict, platform: Platform | None, repo_digest: str) -> Image:
    label = registry.label
    config_descriptor = manifest.get("config")
    if not isinstance(config_descriptor, dict) or not isinstance(config_descriptor.get("digest"), str) \
            or not SHA256_DIGEST.fullmatch(config_descriptor["digest"]):
        raise ImageError(f"{label}: the manifest names no config by sha256 digest")
    config_blob = registry.blob_bytes(config_descriptor["digest"], MAX_JSON_BYTES, "config")
    config = check_config(label, _json_object(label, config_blob, "config"))
    if platform is not None:
        platform.check(label, config)
    descriptors = manifest.get("layers")
    if not isinstance(descriptors, list) or not all(isinstance(entry, dict) for entry in descriptors):
        raise ImageError(f"{label}: the manifest has no layers list")
    diff_ids = config_diff_ids(label, config, len(descriptors))
    layers = []
    for number, (descriptor, diff_id) in enumerate(zip(descriptors, diff_ids), 1):
        media_type, digest, size = descriptor.get("mediaType"), descriptor.get("digest"), descriptor.get("size")
        if not isinstance(media_type, str) or not media_type.startswith(LAYER_TYPE_PREFIXES) \
                or "encrypted" in media_type:
            raise ImageError(f"{label}: layer {number} has unsupported media type {shown(media_type)}")
        if not isinstance(digest, str) or not SHA256_DIGEST.fullmatch(digest):
            raise ImageError(f"{label}: layer {number} has no sha256 digest")
        if type(size) is not int or size < 0:
            raise ImageError(f"{label}: layer {number} has no valid size")
        layers.append(LayerRef(name=digest, open=_opener(registry, digest, size), digest=digest, diff_id=diff_id,
                               size=size, media_type=media_type, remote=True))
    ref = registry.ref
    return Image(source=str(ref), layers=layers, config=config, config_digest=config_descriptor["digest"],
                 repo_tags=[f"{ref.name}:{ref.tag}"] if ref.tag else [],
                 repo_digests=[f"{ref.name}@{repo_digest}"], format="registry", config_blob=config_blob,
                 origin=ref.name)


def _opener(registry: Registry, digest: str, size: int) -> Callable[..., BinaryIO]:
    return lambda partial_dir=None: registry.open_blob(digest, size, partial_dir)


def _json_object(label: str, body: bytes, what: str) -> dict:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"{label}: the {what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ImageError(f"{label}: the {what} nests too deep to be an image document") from None
    if not isinstance(document, dict):
        raise ImageError(f"{label}: the {what} is not a JSON object")
    check_depth(label, f"the {what}", document)
    return document


# ---- pushing --------------------------------------------------------------------

_DOCKER_TO_OCI_LAYER = {
    "application/vnd.docker.image.rootfs.diff.tar": OCI_LAYER,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": OCI_LAYER + "+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": OCI_LAYER + "+zstd",
}


def push_image(image: Image, ref: RegistryRef, options: RegistryOptions,
               say: Callable[[str], None] = lambda line: None) -> str:
    """Upload what the registry lacks (HEAD first, cross-repository mount where offered),
    then the config, then the manifest; return the manifest digest."""
    if ref.digest or not ref.tag:
        raise UsageError(f"{ref}: push to a tag (REPO:TAG), not to a digest")
    mount_from = None
    if image.origin and image.origin != ref.name and image.origin.startswith(ref.registry + "/"):
        mount_from = image.origin[len(ref.registry) + 1:]
    registry = Registry(ref, options, actions="pull,push",
                        extra_scopes=[f"repository:{mount_from}:pull"] if mount_from else [])
    registry.probe()
    descriptors = []
    for ref_layer in image.layers:
        digest, size = _blob_identity(image, ref_layer)
        short = digest[len("sha256:"):][:12]
        say(f"{short}: Preparing")
        if registry.has_blob(digest):
            say(f"{short}: Layer already exists")
        elif mount_from and registry.mount_blob(digest, mount_from):
            say(f"{short}: Mounted from {mount_from}")
        else:
            say(f"{short}: Pushing")
            registry.upload_blob(digest, size, ref_layer.open)
            say(f"{short}: Pushed")
        media_type = _DOCKER_TO_OCI_LAYER.get(ref_layer.media_type, ref_layer.media_type) or OCI_LAYER
        descriptors.append({"mediaType": media_type, "digest": digest, "size": size})
    config_blob = image.config_blob or json.dumps(image.config).encode()
    config_digest = sha256_digest(config_blob)
    if not registry.has_blob(config_digest):
        registry.upload_blob(config_digest, len(config_blob), lambda: io.BytesIO(config_blob))
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_blob)},
                "layers": descriptors}
    body = json.dumps(manifest, indent=2).encode()
    registry.put_manifest(ref.tag, body, OCI_MANIFEST)
    digest = sha256_digest(body)
    say(f"{ref.tag}: digest: {digest} size: {len(body)}")
    return digest


def _blob_identity(image: Image, layer: LayerRef) -> tuple[str, int]:
    """The blob's digest and size: as recorded, or (an uncompressed classic docker layer) its diff_id,
    or else hashed from the bytes."""
    if layer.digest and layer.size is not None:
        return layer.digest, layer.size
    if layer.diff_id and layer.media_type in (OCI_LAYER, "application/vnd.docker.image.rootfs.diff.tar") \
            and layer.size is not None:
        return layer.diff_id, layer.size
    hasher, size = hashlib.sha256(), 0
    try:
        with layer.open() as stream:
            while data := stream.read(STREAM_CHUNK):
                hasher.update(data)
                size += len(data)
    except OSError as exc:
        raise ImageError(f"{image.source}: layer {layer.name}: cannot read: {exc.strerror or exc}") from None
    return "sha256:" + hasher.hexdigest(), size


# ---- helpers -----------------------------------------------------------------

def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    while data := stream.read(STREAM_CHUNK):
        yield data


def _skip(chunks: Iterator[bytes], count: int) -> Iterator[bytes]:
    for chunk in chunks:
        if count >= len(chunk):
            count -= len(chunk)
            continue
        yield chunk[count:]
        count = 0
        yield from chunks


def _range_starts_at(header: str, offset: int, size: int) -> bool:
    match = _CONTENT_RANGE.fullmatch(header.strip())
    return bool(match) and int(match.group(1)) == offset and int(match.group(2)) == size - 1 \
        and match.group(3) in ("*", str(size))


def _read_capped(response: httpx.Response, limit: int, what: str, *, raw: bool = False) -> bytes:
    """The whole body, refused once it passes ``limit`` (whatever Content-Length claims)."""
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ImageError(f"{what} is larger than {limit} bytes ({length} announced)")
    parts, total = [], 0
    try:
        for chunk in (response.iter_raw() if raw else response.iter_bytes()):
            total += len(chunk)
            if total > limit:
                raise ImageError(f"{what} is larger than {limit} bytes")
            parts.append(chunk)
    except httpx.HTTPError as exc:
        raise NetworkError(f"{what}: {_describe(exc)}") from None
    return b"".join(parts)


def _error_text(body: bytes, status: int) -> str:
    """The registry's own error codes and messages (distribution-spec's errors list), escaped."""
    try:
        errors = json.loads(body).get("errors")
    except (ValueError, AttributeError, UnicodeDecodeError):
        errors = None
    if isinstance(errors, list):
        parts = []
        for error in errors[:3]:
            if isinstance(error, dict):
                code, message = shown(error.get("code", "")), shown(error.get("message", ""))
                parts.append(f"{code}: {message}" if message else code)
        if parts:
            return "; ".join(parts)[:300]
    return f"HTTP {status}" + {401: " UNAUTHORIZED", 403: " DENIED", 404: " NOT FOUND"}.get(status, "")


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def _path_of(url: str) -> str:
    return shown(urllib.parse.urlsplit(url).path)[:120]


def _describe(exc: Exception | None) -> str:
    if exc is None:
        return "no answer"
    text = str(exc) or type(exc).__name__
    return shown(text)[:200]

"""Attack catalogue: a hostile registry against `layermount pull`.

The registry is a small http.server in the test that serves a real image
but lies where each attack says. What holds for all of them: one line on
stderr naming the reference, exit 3 (a bad image; 1 for a network failure),
no traceback, the store as it was, nothing unescaped reaching the terminal,
and the pull ending in bounded time and memory.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import json
import os
import threading

import pytest

from conftest import run_layermount
from registry_fixtures import serving
from unionfs.image.writer import Dir, File, layer_tar

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
PAYLOAD = "evil\x1b]0;owned\x07\x1b[2J\rFORGED"
ESCAPED = "evil\\x1b]0;owned\\x07\\x1b[2J\\rFORGED"
SECRET = base64.b64encode(b"alice:secret").decode()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Image:
    """A real one-layer image: what an honest registry would serve."""

    def __init__(self):
        self.tar = layer_tar([Dir("etc"), File("etc/hello", b"hello from the registry\n")])
        self.layer = gzip.compress(self.tar, mtime=0)
        config = {"architecture": "amd64", "os": "linux",
                  "rootfs": {"type": "layers", "diff_ids": [sha256(self.tar)]}}
        self.config = json.dumps(config).encode()
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(self.config),
                       "size": len(self.config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256(self.layer),
                        "size": len(self.layer)}]}).encode()


class Hostile(http.server.BaseHTTPRequestHandler):
    """Serves ``server.image``; ``server.lie(handler)`` may answer instead (return True when it did)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        server = self.server
        server.seen.append((self.path, dict(self.headers)))
        if server.lie(self):
            return
        image = server.image
        if self.path == "/v2/":
            return self.answer(200, b"{}")
        if "/manifests/" in self.path:
            return self.answer(200, image.manifest, OCI_MANIFEST)
        for blob in (image.config, image.layer):
            if self.path.endswith("/blobs/" + sha256(blob)):
                return self.answer(200, blob, "application/octet-stream")
        self.answer(404, json.dumps({"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown"}]}).encode())

    def answer(self, status: int, body: bytes, content_type: str = "application/json", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def endless(self, status: int = 200, content_type: str = "application/octet-stream", limit: int = 1 << 30):
        """A body with no length that goes on until the client hangs up; counts what it got out."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = b"A" * 65536
        try:
            while self.server.sent < limit:
                self.wfile.write(chunk)
                self.server.sent += len(chunk)
        except OSError:
            pass
        self.close_connection = True


@pytest.fixture
def hostile():
    """Start a hostile registry with a given lie; yields a function (lie) -> (server, host)."""
    started = []

    def start(lie=lambda handler: False):
        context = serving(Hostile, image=Image(), lie=lie, seen=[], sent=0)
        server, url = context.__enter__()
        started.append(context)
        return server, url.removeprefix("http://")

    yield start
    for context in reversed(started):
        context.__exit__(None, None, None)


def pull(host: str, store, *args, reference: str = "v1"):
    separator = "@" if reference.startswith("sha256:") else ":"
    return run_layermount("pull", f"docker://{host}/hostile/image{separator}{reference}", "--store", store, *args,
                          timeout=120)


def assert_refused(result, *needles, code=3):
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "hostile/image" in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "\x1b" not in result.stderr + result.stdout and "\x07" not in result.stderr + result.stdout


def store_is_empty(store) -> bool:
    return not any((store / part).exists() and any((store / part).iterdir()) for part in ("layers", "images", "blobs"))


def test_an_honest_answer_pulls(hostile, tmp_path):
    """The control case: the same server telling the truth gives a complete pull."""
    server, host = hostile()
    result = pull(host, tmp_path / "store")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "store" / "images").exists() and not store_is_empty(tmp_path / "store")
    [accept] = [headers.get("Accept", "") for path, headers in server.seen if "/manifests/" in path]
    for media_type in (OCI_MANIFEST, "application/vnd.oci.image.index.v1+json",
                       "application/vnd.docker.distribution.manifest.v2+json",
                       "application/vnd.docker.distribution.manifest.list.v2+json"):
        assert media_type in accept


@pytest.mark.parametrize("announced", [True, False])
def test_oversized_manifest_is_refused_at_4_mib(hostile, tmp_path, announced):
    """A manifest of 5 MiB (announced by Content-Length, or endless without one) would eat memory:
    refused at containerd's 4 MiB cap, having read little more than that."""
    def lie(handler):
        if "/manifests/" not in handler.path:
            return False
        if announced:
            handler.answer(200, b" " * (5 << 20), OCI_MANIFEST)
        else:
            handler.endless(content_type=OCI_MANIFEST, limit=64 << 20)
        return True
    server, host = hostile(lie)
    result = pull(host, tmp_path / "store")
    assert_refused(result, "larger than 4194304 bytes")
    assert server.sent < 16 << 20
    assert store_is_empty(tmp_path / "store")


def test_manifest_not_matching_the_digest_it_was_pulled_by(hostile, tmp_path):
    """Pulled by digest, the registry answers another manifest: a digest reference is a promise of content."""
    server, host = hostile()
    forged = sha256(b"some other manifest")
    result = pull(host, tmp_path / "store", reference=forged)
    assert_refused(result, "does not match its digest", forged)
    assert store_is_empty(tmp_path / "store")


def test_manifest_contradicting_its_docker_content_digest(hostile, tmp_path):
    """Pulled by tag, the registry's Docker-Content-Digest header names other content than it sends."""
    def lie(handler):
        if "/manifests/" not in handler.path:
            return False
        handler.answer(200, handler.server.image.manifest, OCI_MANIFEST,
                       headers=[("Docker-Content-Digest", sha256(b"what it claims"))])
        return True
    _, host = hostile(lie)
    assert_refused(pull(host, tmp_path / "store"), "manifest digest mismatch")


def test_redirect_to_another_host_does_not_get_the_authorization_header(hostile, tmp_path):
    """The registry wants Basic credentials and redirects the blob to another host (as to object
    storage): the other host must never see our Authorization header, yet the pull completes."""
    storage, storage_host = hostile()

    def lie(handler):
        if handler.headers.get("Authorization") != f"Basic {SECRET}":
            body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "log in"}]}).encode()
            handler.answer(401, body, headers=[("WWW-Authenticate", 'Basic realm="hostile"')])
            return True
        if "/blobs/" in handler.path and handler.path.endswith(sha256(handler.server.image.layer)):
            handler.answer(307, b"", headers=[("Location", f"http://{storage_host}/bucket{handler.path}")])
            return True
        return False
    registry, host = hostile(lie)
    storage.lie = lambda handler: handler.path.startswith("/bucket") and not handler.answer(
        200, storage.image.layer, "application/octet-stream")
    result = pull(host, tmp_path / "store", "--creds", "alice:secret")
    assert result.returncode == 0, result.stderr
    assert any(path.startswith("/bucket/") for path, _ in storage.seen)
    assert all("Authorization" not in headers and "authorization" not in headers for _, headers in storage.seen)


def test_escape_sequences_in_registry_errors_are_escaped(hostile, tmp_path):
    """The registry's error code and message carry terminal escapes and a newline that would forge a line:
    they are shown escaped, on one line."""
    def lie(handler):
        if "/manifests/" not in handler.path:
            return False
        body = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": PAYLOAD + "\nlayermount: fine"}]})
        handler.answer(404, body.encode())
        return True
    _, host = hostile(lie)
    result = pull(host, tmp_path / "store")
    assert_refused(result, "MANIFEST_UNKNOWN", ESCAPED)


def test_escape_sequences_in_a_media_type_are_escaped(hostile, tmp_path):
    """A layer's media type (a registry-supplied string that reaches the error) carries escapes."""
    def lie(handler):
        if "/manifests/" not in handler.path:
            return False
        manifest = json.loads(handler.server.image.manifest)
        manifest["layers"][0]["mediaType"] = PAYLOAD
        handler.answer(200, json.dumps(manifest).encode(), OCI_MANIFEST)
        return True
    _, host = hostile(lie)
    assert_refused(pull(host, tmp_path / "store"), "unsupported media type", ESCAPED)


def test_endless_blob_is_cut_at_its_descriptor_size(hostile, tmp_path):
    """The layer blob never ends (no Content-Length): the pull stops at the size the manifest gave,
    says so, and keeps nothing."""
    def lie(handler):
        if handler.path.endswith(sha256(handler.server.image.layer)):
            handler.endless(limit=256 << 20)
            return True
        return False
    server, host = hostile(lie)
    result = pull(host, tmp_path / "store")
    assert_refused(result)
    assert "more than" in result.stderr or "digest mismatch" in result.stderr or "gzip" in result.stderr
    assert server.sent < 64 << 20
    assert store_is_empty(tmp_path / "store")


def test_endless_blob_claiming_its_size_is_cut_too(hostile, tmp_path):
    """The same, with a manifest naming a huge layer size, so the cap is the decompressor's and the digest:
    the first bytes are not gzip, so the pull stops without reading on."""
    def lie(handler):
        if "/manifests/" in handler.path:
            manifest = json.loads(handler.server.image.manifest)
            manifest["layers"][0]["size"] = 1 << 40
            handler.answer(200, json.dumps(manifest).encode(), OCI_MANIFEST)
            return True
        if handler.path.endswith(sha256(handler.server.image.layer)):
            handler.endless(limit=512 << 20)
            return True
        return False
    server, host = hostile(lie)
    result = pull(host, tmp_path / "store")
    assert result.returncode == 3, result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert store_is_empty(tmp_path / "store")


def test_a_redirect_loop_ends(hostile, tmp_path):
    """Every blob request redirects to itself: followed a few times, then refused."""
    def lie(handler):
        if "/blobs/" in handler.path:
            handler.answer(307, b"", headers=[("Location", handler.path)])
            return True
        return False
    _, host = hostile(lie)
    assert_refused(pull(host, tmp_path / "store"), "redirects")


def test_a_resumed_blob_with_the_wrong_range_is_not_appended(hostile, tmp_path):
    """The first answer is cut short; the resumed one says 206 but for another range: appending it
    would splice foreign bytes into the layer."""
    calls = {"count": 0}
    lock = threading.Lock()

    def lie(handler):
        image = handler.server.image
        if not handler.path.endswith(sha256(image.layer)):
            return False
        with lock:
            calls["count"] += 1
            first = calls["count"] == 1
        if first:
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(image.layer)))
            handler.end_headers()
            handler.wfile.write(image.layer[:10])
            handler.close_connection = True
            return True
        handler.answer(206, image.layer, headers=[("Content-Range", f"bytes 0-{len(image.layer) - 1}/"
                                                                    f"{len(image.layer)}")])
        return True
    _, host = hostile(lie)
    assert_refused(pull(host, tmp_path / "store"), "wrong range")
    assert store_is_empty(tmp_path / "store")


def test_a_token_realm_with_an_endless_answer(hostile, tmp_path):
    """The Bearer realm answers forever: the token answer is capped, the pull ends with one line."""
    token_server, token_host = hostile(lambda handler: handler.path.startswith("/token") and
                                       (handler.endless(content_type="application/json", limit=64 << 20) or True))

    def lie(handler):
        if "Authorization" not in handler.headers:
            handler.answer(401, b"{}", headers=[("WWW-Authenticate",
                                                 f'Bearer realm="http://{token_host}/token",service="x"')])
            return True
        return False
    _, host = hostile(lie)
    assert_refused(pull(host, tmp_path / "store"), "token answer is larger than")
    assert token_server.sent < 16 << 20


def test_a_blob_that_always_breaks_off_ends_as_a_network_error(hostile, tmp_path):
    """Every answer for the layer stops after a few bytes: the pull retries with Range a bounded
    number of times, with back-off, then fails as a network failure (exit 1), keeping nothing."""
    calls = {"count": 0}

    def lie(handler):
        image = handler.server.image
        if not handler.path.endswith(sha256(image.layer)):
            return False
        calls["count"] += 1
        start = int(handler.headers.get("Range", "bytes=0-")[len("bytes="):].rstrip("-"))
        handler.send_response(206 if start else 200)
        handler.send_header("Content-Length", str(len(image.layer) - start))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(image.layer) - 1}/{len(image.layer)}")
        handler.end_headers()
        handler.wfile.write(image.layer[start:start + (10 if start == 0 else 0)])
        handler.close_connection = True
        return True
    _, host = hostile(lie)
    assert_refused(pull(host, tmp_path / "store"), "download failed after", code=1)
    assert 3 <= calls["count"] <= 21
    assert store_is_empty(tmp_path / "store")


@pytest.mark.parametrize("planted", ["symlink", "fifo", "oversized"])
def test_a_planted_partial_file_is_neither_followed_nor_trusted(hostile, tmp_path, planted):
    """Where a broken-off download's bytes are kept (store/partial/<hex>) sits a symlink to a host file,
    a FIFO that would block a reader forever, or a file longer than the blob: the pull replaces it,
    never writes through it, and completes with verified content."""
    server, host = hostile()
    store = tmp_path / "store"
    partial = store / "partial" / sha256(server.image.layer).split(":", 1)[1]
    partial.parent.mkdir(parents=True)
    sentinel = tmp_path / "host-file"
    sentinel.write_bytes(b"host data")
    if planted == "symlink":
        partial.symlink_to(sentinel)
    elif planted == "fifo":
        os.mkfifo(partial)
    else:
        partial.write_bytes(b"X" * (len(server.image.layer) + 1))
    result = pull(host, store)
    assert result.returncode == 0, result.stderr
    assert sentinel.read_bytes() == b"host data"
    assert not os.path.lexists(partial)
    assert (store / "images").exists() and any((store / "images").iterdir())


def test_a_token_realm_that_is_not_http_is_refused(hostile, tmp_path):
    """The Bearer realm points at a local file: nothing is opened, the pull says why in one line."""
    def lie(handler):
        handler.answer(401, b"{}", headers=[("WWW-Authenticate", 'Bearer realm="file:///etc/shadow",service="x"')])
        return True
    _, host = hostile(lie)
    assert_refused(pull(host, tmp_path / "store"), "no usable token realm")

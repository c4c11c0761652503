"""A real registry (Debian's docker-registry, CNCF distribution 2.8) for the tests, and the servers around it.

Each registry runs on 127.0.0.1 on a free port with a config and storage of
its own in a temp dir, and is stopped at teardown whatever happened. Beside
it: a token server for Bearer auth and a TCP proxy that can cut a
connection in the middle of a blob.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

REGISTRY_BINARY = shutil.which("docker-registry")
SKOPEO = shutil.which("skopeo")
NEEDS = "needs Debian's docker-registry and skopeo (scripts/setup installs them)"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Registry:
    """One docker-registry process; ``host`` is what goes into docker:// references."""

    def __init__(self, base: Path, auth: dict | None = None):
        self.base = base
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.storage = base / "storage"
        self.log_path = base / "registry.log"
        config = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True}},
            "http": {"addr": self.host, "secret": "test-secret"},
        }
        if auth:
            config["auth"] = auth
        (base / "config.yml").write_text(json.dumps(config))    # YAML is a superset of JSON
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen([REGISTRY_BINARY, "serve", str(base / "config.yml")],
                                        stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1).close()
                break
            except urllib.error.HTTPError:
                break       # 401: up, and asking for credentials
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"docker-registry did not start: {self.log_path.read_text()[-2000:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def blob_gets(self, digest: str) -> list[str]:
        """Access-log lines of GETs of one blob."""
        return [line for line in self.log().splitlines() if re.search(rf'"GET /v2/\S+/blobs/{digest} ', line)]

    def blob_file(self, digest: str) -> Path:
        hexpart = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"

    def push(self, archive: Path, repo_tag: str, *, creds: str | None = None, source: str = "docker-archive") -> str:
        """skopeo copy of an image file into this registry; returns the docker:// reference."""
        ref = f"docker://{self.host}/{repo_tag}"
        extra = ["--dest-creds", creds] if creds else []
        subprocess.run([SKOPEO, "copy", "-q", "--dest-tls-verify=false", *extra, f"{source}:{archive}", ref],
                       check=True, capture_output=True, timeout=120)
        return ref

    def manifest(self, repo_tag: str, *, creds: str | None = None) -> dict:
        extra = ["--creds", creds] if creds else []
        result = subprocess.run([SKOPEO, "inspect", "--raw", "--tls-verify=false", *extra,
                                 f"docker://{self.host}/{repo_tag}"], check=True, capture_output=True, timeout=60)
        return json.loads(result.stdout)


@contextlib.contextmanager
def running_registry(base: Path, auth: dict | None = None):
    base.mkdir(parents=True, exist_ok=True)
    registry = Registry(base, auth)
    try:
        yield registry
    finally:
        registry.stop()


@contextlib.contextmanager
def serving(handler_class, **attributes):
    """A threaded http.server on 127.0.0.1 with ``attributes`` set on it; yields (server, base URL)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    server.daemon_threads = True
    for name, value in attributes.items():
        setattr(server, name, value)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# ---- Bearer tokens ------------------------------------------------------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """A signing key and certificate (made with openssl), and JWTs in the form distribution verifies."""

    ISSUER = "layermount-test-issuer"
    SERVICE = "layermount-test-registry"

    def __init__(self, directory: Path):
        self.key = directory / "token.key"
        self.cert = directory / "token.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-keyout", self.key, "-out", self.cert, "-subj", "/CN=layermount test token issuer"],
                       check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", self.cert, "-outform", "DER"], check=True,
                             capture_output=True).stdout
        self.x5c = base64.b64encode(der).decode()

    def registry_auth(self, realm: str) -> dict:
        return {"token": {"realm": realm, "service": self.SERVICE, "issuer": self.ISSUER,
                          "rootcertbundle": str(self.cert)}}

    def token(self, subject: str, access: list[dict]) -> str:
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": [self.x5c]}
        claims = {"iss": self.ISSUER, "sub": subject, "aud": self.SERVICE, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                                   input=signing_input.encode(), check=True, capture_output=True).stdout
        return f"{signing_input}.{_b64url(signature)}"


class TokenHandler(http.server.BaseHTTPRequestHandler):
    """GET /token?service=..&scope=repository:NAME:ACTIONS, Basic-authenticated; grants only allowed scopes.

    The server (set up by ``serving``) has ``issuer``, ``users`` {name: password},
    ``grants`` {(user, repository): {actions}} and ``requests`` (what was asked).
    """

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        user = None
        header = self.headers.get("Authorization", "")
        if header.startswith("Basic "):
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if server.users.get(name) == password:
                user = name
            else:
                return self._answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
        server.requests.append({"user": user, "service": query.get("service"), "scope": query.get("scope", [])})
        if url.path != "/token" or query.get("service") != [server.issuer.SERVICE]:
            return self._answer(400, {"errors": [{"code": "DENIED", "message": "wrong service"}]})
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            allowed = server.grants.get((user, name), set())
            granted = [action for action in actions.split(",") if action in allowed]
            if kind == "repository" and granted:
                access.append({"type": "repository", "name": name, "actions": granted})
        self._answer(200, {"token": server.issuer.token(user or "anonymous", access), "expires_in": 300})

    def _answer(self, status: int, document: dict) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


# ---- a proxy that cuts ------------------------------------------------------------------

class CuttingProxy:
    """A TCP proxy to ``target``; the first connection that asks for ``cut_blob`` is closed once it has
    forwarded ``cut_after`` bytes of answer. Counts every byte it forwards to the client."""

    def __init__(self, target_port: int, cut_blob: str | None = None, cut_after: int = 0,
                 refuse_after_cut: bool = False):
        self.target_port = target_port
        self.refuse_after_cut = refuse_after_cut
        self.cut_blob = cut_blob.encode() if cut_blob else None
        self.cut_after = cut_after
        self.cuts = 0
        self.bytes_to_client = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refuse_after_cut and self.cuts:
                client.close()        # the network is gone for good
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, upstream]
            state = {"armed_at": None}
            threading.Thread(target=self._requests, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._answers, args=(upstream, client, state), daemon=True).start()

    def _requests(self, client, upstream, state):
        seen = b""
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                seen = (seen + data)[-4096:]
                with self._lock:
                    if self.cut_blob and self.cuts == 0 and state["armed_at"] is None and self.cut_blob in seen:
                        state["armed_at"] = state.get("sent", 0)
                upstream.sendall(data)
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)

    def _answers(self, upstream, client, state):
        state["sent"] = 0
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                with self._lock:
                    armed = state["armed_at"]
                    if armed is not None and self.cuts == 0 and state["sent"] + len(data) - armed > self.cut_after:
                        data = data[:max(armed + self.cut_after - state["sent"], 0)]
                        self.cuts += 1
                        cut = True
                    else:
                        cut = False
                    self.bytes_to_client += len(data)
                    state["sent"] += len(data)
                client.sendall(data)
                if cut:
                    break
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self):
        self._closed = True
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

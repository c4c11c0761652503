"""How a user reaches registries: the options, credentials from the files users already have, and the
challenges registries answer with (no HTTP client here: the verbs that never pull import this).

Credentials are looked up as podman and skopeo do: ``--creds``, then
``$REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers/auth.json`` and
``~/.docker/config.json``, each read for plain ``auths`` entries
(base64 "user:password"). Credential helpers (``credsStore``, ``credHelpers``)
are not run yet.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass

from ..errors import UsageError

_PARAM = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*(?:,|$)')
MAX_CHALLENGE = 8192
DEFAULT_JOBS = 3                    # layers fetched at once, as docker pull does


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic_header(self) -> str:
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()


@dataclass
class RegistryOptions:
    """How to talk to registries: TLS, credentials, parallelism."""

    tls_verify: bool = True
    creds: Credentials | None = None
    jobs: int = DEFAULT_JOBS


def parse_creds(text: str) -> Credentials:
    """``USER:PASS`` as skopeo's --creds takes it."""
    username, colon, password = text.partition(":")
    if not colon or not username:
        raise UsageError("--creds: expected USER:PASSWORD")
    return Credentials(username, password)


def auth_files() -> list[str]:
    """The auth files to look in, first match wins."""
    files = []
    if path := os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(path)
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        files.append(os.path.join(runtime, "containers", "auth.json"))
    files.append(os.path.join(os.path.expanduser("~"), ".docker", "config.json"))
    return files


def find_credentials(registry: str, repository: str) -> Credentials | None:
    """The credentials the auth files hold for ``registry`` (or a repository under it), if any."""
    for path in auth_files():
        try:
            with open(path, encoding="utf-8") as file:
                document = json.load(file)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            raise UsageError(f"auth file {path}: unreadable: {exc}") from None
        auths = document.get("auths") if isinstance(document, dict) else None
        if not isinstance(auths, dict):
            continue
        for key in _lookup_keys(registry, repository):
            entry = auths.get(key)
            if isinstance(entry, dict) and isinstance(entry.get("auth"), str) and entry["auth"]:
                return _decode_entry(path, key, entry["auth"])
    return None


def _lookup_keys(registry: str, repository: str) -> list[str]:
    """Most specific first (podman's auth.json may hold host/namespace/repo keys), then docker's URL forms."""
    keys = []
    parts = repository.split("/")
    for count in range(len(parts), 0, -1):
        keys.append(f"{registry}/{'/'.join(parts[:count])}")
    keys.append(registry)
    keys += [f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/", f"https://{registry}/v2/"]
    if registry == "docker.io":
        keys += ["https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io"]
    return keys


def _decode_entry(path: str, key: str, encoded: str) -> Credentials:
    try:
        username, colon, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise UsageError(f"auth file {path}: the entry for {key} is not base64 of USER:PASSWORD") from None
    if not colon:
        raise UsageError(f"auth file {path}: the entry for {key} is not base64 of USER:PASSWORD")
    return Credentials(username, password)


@dataclass(frozen=True)
class Challenge:
    """One WWW-Authenticate challenge: its scheme (lower case) and parameters (realm, service, scope...)."""

    scheme: str
    params: dict


def parse_challenges(header: str) -> list[Challenge]:
    """The challenges of a WWW-Authenticate header (RFC 7235), as far as Basic and Bearer need."""
    header = header[:MAX_CHALLENGE]
    challenges = []
    position = 0
    while position < len(header):
        match = re.compile(r"\s*,?\s*([A-Za-z][A-Za-z0-9_-]*)").match(header, position)
        if not match or match.end() == position:
            break
        scheme, position = match.group(1).lower(), match.end()
        params = {}
        while True:
            param = _PARAM.match(header, position)
            if not param or param.end() == position:
                break
            value = param.group(2) if param.group(2) is not None else param.group(3)
            params[param.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
            position = param.end()
        challenges.append(Challenge(scheme, params))
    return challenges

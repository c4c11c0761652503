"""The pure logic under registry pulls: references as docker reads them, auth files, challenges."""

from __future__ import annotations

import base64
import json

import pytest

from unionfs.errors import UsageError
from unionfs.image.auth import find_credentials, parse_challenges
from unionfs.image.reference import RegistryRef, parse_registry_ref, parse_source


@pytest.mark.parametrize("text,expected", [
    ("nginx", RegistryRef("docker.io", "library/nginx", "latest")),
    ("nginx:1.27", RegistryRef("docker.io", "library/nginx", "1.27")),
    ("team/app", RegistryRef("docker.io", "team/app", "latest")),
    ("ghcr.io/owner/repo:v2", RegistryRef("ghcr.io", "owner/repo", "v2")),
    ("localhost/app", RegistryRef("localhost", "app", "latest")),
    ("127.0.0.1:5000/a/b/c:t", RegistryRef("127.0.0.1:5000", "a/b/c", "t")),
    ("host:5000/app@sha256:" + "a" * 64, RegistryRef("host:5000", "app", None, "sha256:" + "a" * 64)),
    ("index.docker.io/busybox", RegistryRef("docker.io", "library/busybox", "latest")),
])
def test_references_read_as_docker_reads_them(text, expected):
    assert parse_registry_ref(text) == expected


@pytest.mark.parametrize("text", ["Upper/Case", "app:bad/tag", "app@sha256:short", "a//b", "app:", "-lead/x"])
def test_malformed_references_are_usage_errors(text):
    with pytest.raises(UsageError, match="not an image reference"):
        parse_registry_ref(text)


def test_sources_files_win_and_prefixes_are_skopeos(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nginx").write_text("a file named like an image")
    assert parse_source("nginx").path == "nginx"
    assert parse_source("alpine").registry == RegistryRef("docker.io", "library/alpine", "latest")
    assert parse_source("missing.tar").path == "missing.tar"       # looks like a file: stays one
    assert parse_source("./alpine").path == "./alpine"
    assert parse_source("docker://alpine:3").registry.tag == "3"
    assert parse_source("docker-archive:/x/y.tar").path == "/x/y.tar"
    layout = parse_source("oci:/some/dir:v1")
    assert (layout.path, layout.ref) == ("/some/dir", "v1")
    assert parse_source("oci-archive:img.tar").path == "img.tar"
    with pytest.raises(UsageError):
        parse_source("docker://UPPER")


def test_loopback_may_speak_plain_http():
    assert parse_registry_ref("127.0.0.2:5000/a").allows_plain_http()
    assert parse_registry_ref("localhost:5000/a").allows_plain_http()
    assert not parse_registry_ref("registry.example/a").allows_plain_http()
    assert not parse_registry_ref("10.0.0.1:5000/a").allows_plain_http()


def test_bearer_and_basic_challenges():
    [bearer] = parse_challenges('Bearer realm="https://auth.example/token",service="registry.example",'
                                'scope="repository:a/b:pull,push"')
    assert bearer.scheme == "bearer"
    assert bearer.params == {"realm": "https://auth.example/token", "service": "registry.example",
                             "scope": "repository:a/b:pull,push"}
    [basic] = parse_challenges('Basic realm="x \\"quoted\\""')
    assert basic.scheme == "basic" and basic.params["realm"] == 'x "quoted"'


def test_credentials_from_the_auth_files_in_order(tmp_path, monkeypatch):
    def auth_file(path, entries):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"auths": {key: {"auth": base64.b64encode(value.encode()).decode()}
                                              for key, value in entries.items()}}))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    auth_file(tmp_path / "home/.docker/config.json", {"https://index.docker.io/v1/": "hub:one",
                                                      "reg.example": "docker:two"})
    assert find_credentials("docker.io", "library/nginx").username == "hub"
    assert find_credentials("reg.example", "a").password == "two"
    auth_file(tmp_path / "run/containers/auth.json", {"reg.example/team": "podman:three"})
    assert find_credentials("reg.example", "team/app").username == "podman"
    assert find_credentials("reg.example", "other/app").username == "docker"
    auth_file(tmp_path / "explicit.json", {"reg.example": "explicit:four"})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "explicit.json"))
    assert find_credentials("reg.example", "team/app").username == "explicit"
    assert find_credentials("nowhere.example", "x") is None
    (tmp_path / "explicit.json").write_text('{"auths": {"reg.example": {"auth": "!!notbase64"}}}')
    with pytest.raises(UsageError, match="not base64"):
        find_credentials("reg.example", "x")

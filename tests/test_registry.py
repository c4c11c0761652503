"""Pulling from and pushing to a real registry (docker-registry on 127.0.0.1), checked with skopeo and podman."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import images
from conftest import LAYERMOUNT, run_layermount
from oracle import diff_snapshots, snapshot
from registry_fixtures import (NEEDS, REGISTRY_BINARY, SKOPEO, CuttingProxy, TokenHandler, TokenIssuer,
                               running_registry, serving)
from unionfs.image.oci_layout import DOCKER_MANIFEST_LIST, OCI_INDEX, Platform
from unionfs.image.writer import Dir, File, ImageSpec, Symlink, layer_tar, new_config, write_image, write_index
from unionfs.mount import is_mounted
from unionfs.store import LayerStore

pytestmark = pytest.mark.skipif(not REGISTRY_BINARY or not SKOPEO, reason=NEEDS)

USER, PASSWORD = "alice", "s3cret-pass"
BASE_LAYER = [Dir("etc"), File("etc/os-release", b"ID=shared-base\n"), Dir("bin"),
              File("bin/tool", b"#!tool\n" * 500, mode=0o755), Symlink("bin/alias", "tool")]
APP_LAYER = [Dir("app"), File("app/main", b"main v1\n"), File("etc/app.conf", b"x=1\n")]
OTHER_LAYER = [Dir("srv"), File("srv/other", b"another image\n")]


def build(path: Path, layers: list, tag: str = "fixture:latest", compression: str = "gzip") -> Path:
    config = new_config([f"step {index}" for index in range(len(layers))])
    config["config"] = {"Cmd": ["/bin/tool"], "Env": ["PATH=/bin"]}
    write_image(path, [layer_tar(layer) for layer in layers], config, repo_tag=tag, compression=compression)
    return path


def clean_env(tmp_path: Path, **extra) -> dict:
    """No credentials but those a test gives: an empty HOME, no auth files."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items()
           if key not in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR")}
    env.update(HOME=str(home), **extra)
    return env


def pull(ref: str, store: Path, *args, env=None):
    return run_layermount("pull", ref, "--store", store, *args, env=env)


def layer_digests(registry, repo_tag: str) -> list[str]:
    return [layer["digest"] for layer in registry.manifest(repo_tag)["layers"]]


def store_state(store: Path) -> dict:
    """Everything the store holds but its locks and scratch space."""
    state = {}
    for part in ("layers", "images", "blobs"):
        top = store / part
        if top.exists():
            state[part] = sorted(str(path.relative_to(top)) for path in top.rglob("*"))
    return state


@pytest.fixture
def registry(tmp_path):
    with running_registry(tmp_path / "registry") as running:
        yield running


@pytest.fixture
def fixture_image(tmp_path) -> Path:
    return images.build(tmp_path / "fixture.tar")


def test_pull_and_mount_match_skopeo_copy_then_mount(registry, fixture_image, mounts, tmp_path):
    ref = registry.push(fixture_image, "edge/cases:v1")
    pulled = mounts.mount(ref, "--read-only", "-q", mountpoint=mounts.mountpoint("pulled"))
    layout = tmp_path / "layout"
    subprocess.run([SKOPEO, "copy", "-q", "--src-tls-verify=false", ref, f"oci:{layout}:v1"], check=True,
                   capture_output=True, timeout=120)
    other_store = tmp_path / "other-store"
    copied = run_layermount(f"oci:{layout}:v1", mounts.mountpoint("copied"), "--read-only", "-q",
                            "--store", other_store)
    assert copied.returncode == 0, copied.stderr
    mounts.points.append(mounts.mountpoint("copied"))
    differences = diff_snapshots(snapshot(pulled), snapshot(mounts.mountpoint("copied")), ("pulled", "copied"))
    assert not differences, "\n".join(differences)
    assert len(LayerStore(mounts.store).layers()) == 4


def test_pull_speaks_docker_and_the_store_remembers_the_ref(registry, tmp_path, store_dir):
    ref = registry.push(build(tmp_path / "app.tar", [BASE_LAYER, APP_LAYER]), "team/app:1.0")
    result = pull(ref, store_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "1.0: Pulling from team/app"
    for words in ("Pulling fs layer", "Downloading", "Verifying Checksum", "Download complete", "Pull complete"):
        assert sum(line.endswith(words) or f": {words} " in line for line in lines) == 2, (words, lines)
    digest = "sha256:" + hashlib.sha256(subprocess.run(
        [SKOPEO, "inspect", "--raw", "--tls-verify=false", ref], capture_output=True, check=True).stdout).hexdigest()
    assert f"Digest: {digest}" in lines
    assert f"Status: Downloaded newer image for {registry.host}/team/app:1.0" in lines
    again = pull(ref.removeprefix("docker://"), store_dir)       # a bare name: no such file, so a registry
    assert again.stdout.count("Already exists") == 2 and "Status: Image is up to date" in again.stdout
    [record] = LayerStore(store_dir).images()
    assert record["repo_tags"] == [f"{registry.host}/team/app:1.0"]
    assert record["repo_digests"] == [f"{registry.host}/team/app@{digest}"]
    listing = run_layermount("store", "ls", "--store", store_dir).stdout
    assert f"{registry.host}/team/app@{digest}" in listing and f"{registry.host}/team/app:1.0" in listing
    inspected = run_layermount("inspect", ref)
    assert f"Digests:  {registry.host}/team/app@{digest}" in inspected.stdout, inspected.stderr
    history = run_layermount("history", ref, "--store", store_dir)
    assert history.stdout.splitlines()[0] == f"Image: {registry.host}/team/app:1.0, {registry.host}/team/app@{digest}"
    assert history.stdout.count(" yes ") == 2


@pytest.mark.parametrize("media_types", ["oci", "docker"])
def test_platform_is_chosen_from_an_index_or_manifest_list(registry, tmp_path, store_dir, media_types):
    layout = tmp_path / "layout"
    specs = []
    for architecture in ("amd64", "arm64"):
        config = new_config([f"for {architecture}"], platform=Platform("linux", architecture))
        specs.append(ImageSpec([layer_tar([File("arch", architecture.encode())])], config))
    write_index(layout, specs, format="oci-dir", repo_tag="v1", compression="gzip", nested=True)
    ref = f"docker://{registry.host}/multi/arch:v1"
    formats = ["--format", "v2s2"] if media_types == "docker" else []     # skopeo converts to a manifest list
    subprocess.run([SKOPEO, "copy", "-q", "--all", *formats, "--dest-tls-verify=false", f"oci:{layout}:v1", ref],
                   check=True, capture_output=True, timeout=120)
    index = registry.manifest("multi/arch:v1")
    assert index["mediaType"] == (OCI_INDEX if media_types == "oci" else DOCKER_MANIFEST_LIST)
    assert pull(ref, store_dir, "--platform", "linux/arm64", "-q").returncode == 0
    assert pull(ref, store_dir, "-q").returncode == 0        # the host's: amd64 here
    platforms = sorted(record["platform"] for record in LayerStore(store_dir).images())
    assert platforms == sorted({"linux/arm64", f"linux/{Platform.host().architecture}"})
    missing = pull(ref, store_dir, "--platform", "linux/s390x")
    assert missing.returncode == 3 and "no image for platform linux/s390x; it has linux/amd64, linux/arm64" \
        in missing.stderr


def test_second_image_sharing_the_base_fetches_only_its_new_layer(registry, tmp_path, store_dir):
    first = registry.push(build(tmp_path / "one.tar", [BASE_LAYER, APP_LAYER]), "shared/one:v1")
    second = registry.push(build(tmp_path / "two.tar", [BASE_LAYER, OTHER_LAYER]), "shared/two:v1")
    base_digest, other_digest = layer_digests(registry, "shared/two:v1")
    assert pull(first, store_dir).returncode == 0
    gets_before = len(registry.blob_gets(base_digest))
    result = pull(second, store_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Already exists") == 1 and result.stdout.count("Pull complete") == 1
    assert len(registry.blob_gets(base_digest)) == gets_before, "the shared base layer was fetched again"
    assert len(registry.blob_gets(other_digest)) == 1
    assert len(LayerStore(store_dir).layers()) == 3


def test_a_connection_cut_mid_blob_resumes_with_range(registry, tmp_path, store_dir, mounts):
    payload = os.urandom(6 << 20)         # incompressible: the blob is as big as the file
    ref_path = registry.push(build(tmp_path / "big.tar", [[Dir("data"), File("data/blob", payload)]]), "big/one:v1")
    [digest] = layer_digests(registry, "big/one:v1")
    blob_size = registry.blob_file(digest).stat().st_size
    reference = ref_path.replace(registry.host, "{host}")
    baseline = CuttingProxy(registry.port)
    try:
        assert pull(reference.format(host=baseline.host), tmp_path / "baseline-store", "-q").returncode == 0
    finally:
        baseline.close()
    proxy = CuttingProxy(registry.port, cut_blob=digest, cut_after=2 << 20)
    try:
        result = pull(reference.format(host=proxy.host), store_dir)
    finally:
        proxy.close()
    assert result.returncode == 0, result.stderr
    assert proxy.cuts == 1
    ranged = [line for line in registry.blob_gets(digest) if '" 206 ' in line]
    assert len(ranged) == 1, registry.blob_gets(digest)
    # The resumed pull cost what the uncut one cost, plus one more request's headers: never the blob twice.
    assert proxy.bytes_to_client - baseline.bytes_to_client <= 64 << 10, (proxy.bytes_to_client, baseline.bytes_to_client)
    assert baseline.bytes_to_client < blob_size + (64 << 10)
    point = mounts.mount(ref_path, "--read-only", "-q")
    assert (point / "data/blob").read_bytes() == payload


def test_a_killed_pull_resumes_from_the_bytes_it_had(registry, tmp_path, store_dir, mounts):
    """The connection breaks, the network stays down, the pull is killed; the next pull asks only for the rest."""
    payload = os.urandom(6 << 20)
    ref = registry.push(build(tmp_path / "big.tar", [[Dir("data"), File("data/blob", payload)]]), "big/two:v1")
    [digest] = layer_digests(registry, "big/two:v1")
    blob_size = registry.blob_file(digest).stat().st_size
    partial = store_dir / "partial" / digest.split(":", 1)[1]
    proxy = CuttingProxy(registry.port, cut_blob=digest, cut_after=3 << 20, refuse_after_cut=True)
    process = subprocess.Popen([*LAYERMOUNT, "pull", ref.replace(registry.host, proxy.host), "--store", store_dir,
                                "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (proxy.cuts and partial.exists() and partial.stat().st_size > 2 << 20):
            assert time.monotonic() < deadline and process.poll() is None, process.communicate()
            time.sleep(0.01)
        time.sleep(0.1)
    finally:
        process.kill()
        process.wait()
        proxy.close()
    received = partial.stat().st_size
    assert 2 << 20 < received < blob_size
    result = pull(ref, store_dir)
    assert result.returncode == 0, result.stderr
    [resumed] = registry.blob_gets(digest)[-1:]
    assert '" 206 ' in resumed, registry.blob_gets(digest)
    assert int(resumed.split('" 206 ')[1].split()[0]) == blob_size - received
    assert not partial.exists()
    point = mounts.mount(ref, "--read-only", "-q")
    assert (point / "data/blob").read_bytes() == payload


def test_a_blob_corrupted_in_the_registry_is_refused_and_nothing_changes(registry, tmp_path, store_dir, mounts):
    good = registry.push(build(tmp_path / "good.tar", [OTHER_LAYER]), "corrupt/good:v1")
    assert pull(good, store_dir, "-q").returncode == 0
    ref = registry.push(build(tmp_path / "app.tar", [BASE_LAYER, APP_LAYER]), "corrupt/app:v1")
    top = layer_digests(registry, "corrupt/app:v1")[-1]
    data = bytearray(registry.blob_file(top).read_bytes())
    data[len(data) // 2] ^= 0xFF
    registry.blob_file(top).write_bytes(bytes(data))
    before = store_state(store_dir)
    result = mounts.mount(ref, "-q", expect_ok=False)
    assert result.returncode == 3
    [line] = result.stderr.splitlines()
    assert "blob digest mismatch" in line and top in line and "corrupt/app" in line
    assert store_state(store_dir) == before
    assert not is_mounted(str(mounts.mountpoint()))


def test_basic_auth_with_htpasswd(tmp_path, store_dir):
    bcrypt = pytest.importorskip("bcrypt", reason="needs the bcrypt test dependency for an htpasswd file")
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_bytes(USER.encode() + b":" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)) + b"\n")
    auth = {"htpasswd": {"realm": "layermount-test", "path": str(htpasswd)}}
    with running_registry(tmp_path / "registry", auth) as registry:
        ref = registry.push(build(tmp_path / "app.tar", [BASE_LAYER]), "private/app:v1",
                            creds=f"{USER}:{PASSWORD}")
        env = clean_env(tmp_path)
        missing = pull(ref, store_dir, env=env)
        assert missing.returncode == 3
        [line] = missing.stderr.splitlines()
        assert "UNAUTHORIZED" in line and "--creds" in line and "private/app" in line
        wrong = pull(ref, store_dir, "--creds", f"{USER}:wrong", env=env)
        assert wrong.returncode == 3 and "UNAUTHORIZED" in wrong.stderr and f"as user {USER}" in wrong.stderr
        assert pull(ref, store_dir, "--creds", f"{USER}:{PASSWORD}", "-q", env=env).returncode == 0
        auth_file = tmp_path / "auth.json"
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        auth_file.write_text(json.dumps({"auths": {registry.host: {"auth": token}}}))
        from_file = pull(ref, tmp_path / "store2", env=clean_env(tmp_path, REGISTRY_AUTH_FILE=str(auth_file)))
        assert from_file.returncode == 0, from_file.stderr
        docker_config = tmp_path / "home" / ".docker"
        docker_config.mkdir(parents=True)
        (docker_config / "config.json").write_text(json.dumps({"auths": {f"https://{registry.host}": {"auth": token}}}))
        assert pull(ref, tmp_path / "store3", "-q", env=clean_env(tmp_path)).returncode == 0


def test_bearer_auth_through_a_token_server_with_a_scope_check(tmp_path, store_dir):
    issuer = TokenIssuer(tmp_path)
    grants = {(USER, "bearer/app"): {"pull", "push"}}
    with serving(TokenHandler, issuer=issuer, users={USER: PASSWORD}, grants=grants, requests=[]) as (tokens, url):
        with running_registry(tmp_path / "registry", issuer.registry_auth(f"{url}/token")) as registry:
            archive = build(tmp_path / "app.tar", [BASE_LAYER, APP_LAYER])
            ref = registry.push(archive, "bearer/app:v1", creds=f"{USER}:{PASSWORD}")
            tokens.requests.clear()
            env = clean_env(tmp_path)
            result = pull(ref, store_dir, "--creds", f"{USER}:{PASSWORD}", env=env)
            assert result.returncode == 0, result.stderr
            asked = [request for request in tokens.requests if request["user"] == USER]
            assert asked and all(request["scope"] == ["repository:bearer/app:pull"] for request in asked), asked
            assert len(asked) == 1, "one token for the scope, cached (forked layer workers inherit it)"
            anonymous = pull(ref, tmp_path / "anon-store", env=env)
            assert anonymous.returncode == 3
            [line] = anonymous.stderr.splitlines()
            assert "UNAUTHORIZED" in line and "--creds" in line
            # Granted bearer/app only: another repository on the same registry is refused.
            registry.push(archive, "bearer/app:v1", creds=f"{USER}:{PASSWORD}")
            other = pull(ref.replace("bearer/app", "bearer/secret"), tmp_path / "other-store",
                         "--creds", f"{USER}:{PASSWORD}", env=env)
            assert other.returncode == 3 and "UNAUTHORIZED" in other.stderr, other.stderr


def test_errors_name_the_ref_and_the_registry_code(registry, tmp_path, store_dir):
    missing = pull(f"docker://{registry.host}/no/such:v1", store_dir)
    assert missing.returncode == 3
    assert missing.stderr.strip() == (f"layermount: {registry.host}/no/such:v1: manifest v1: "
                                      "MANIFEST_UNKNOWN: manifest unknown")
    port = registry.port
    registry.stop()
    down = pull(f"docker://127.0.0.1:{port}/no/such:v1", store_dir)
    assert down.returncode == 1 and "cannot reach registry" in down.stderr and len(down.stderr.splitlines()) == 1
    bad = pull("docker://127.0.0.1:1/Upper/Case:v1", store_dir)
    assert bad.returncode == 2 and "bad repository name" in bad.stderr
    assert not (store_dir / "images").exists() or not list((store_dir / "images").iterdir())


def test_an_unreachable_registry_falls_back_to_the_image_pulled_before(registry, tmp_path, store_dir, mounts):
    ref = registry.push(build(tmp_path / "app.tar", [BASE_LAYER, APP_LAYER]), "offline/app:v1")
    assert pull(ref, store_dir, "-q").returncode == 0
    registry.stop()
    offline = pull(ref, store_dir)
    assert offline.returncode == 1 and "cannot reach registry" in offline.stderr
    result = mounts.mount(ref, "--read-only", "-q", expect_ok=False)
    assert result.returncode == 0, result.stderr
    assert "cannot reach registry" in result.stderr and "as pulled before" in result.stderr
    assert (mounts.mountpoint() / "app/main").read_text() == "main v1\n"
    elsewhere = run_layermount("history", ref.replace("offline/app", "offline/other"), "--store", store_dir)
    assert elsewhere.returncode == 1, "only the REF that was pulled stands in for itself"


def test_push_uploads_only_what_the_registry_lacks(registry, tmp_path, store_dir):
    archive = build(tmp_path / "app.tar", [BASE_LAYER, APP_LAYER], compression="none")   # classic docker save
    first = run_layermount("push", archive, f"docker://{registry.host}/pushed/app:v1")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count(": Pushed") == 2
    again = run_layermount("push", archive, f"docker://{registry.host}/pushed/app:v2")
    assert again.stdout.count("Layer already exists") == 2 and ": Pushed" not in again.stdout
    mounted = run_layermount("push", f"docker://{registry.host}/pushed/app:v1",
                             f"docker://{registry.host}/elsewhere/app:v1")
    assert mounted.returncode == 0, mounted.stderr
    assert mounted.stdout.count("Mounted from pushed/app") == 2
    inspected = json.loads(subprocess.run([SKOPEO, "inspect", "--tls-verify=false",
                                           f"docker://{registry.host}/elsewhere/app:v1"],
                                          capture_output=True, check=True).stdout)
    original = json.loads(subprocess.run([SKOPEO, "inspect", f"docker-archive:{archive}"],
                                         capture_output=True, check=True).stdout)
    assert inspected["Env"] == original["Env"] and len(inspected["Layers"]) == 2
    pulled = pull(f"docker://{registry.host}/elsewhere/app:v1", store_dir, "-q")
    assert pulled.returncode == 0, pulled.stderr
    [record] = LayerStore(store_dir).images()
    assert record["id"] == original["Digest"] or record["config"]["config"]["Env"] == original["Env"]


BUSYBOX = shutil.which("busybox") or "/bin/busybox"
PODMAN = shutil.which("podman")
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


@pytest.mark.skipif(not PODMAN or not os.path.exists(BUSYBOX) or os.geteuid() != 0,
                    reason="needs root, podman and a static busybox (Debian busybox-static)")
def test_commit_push_then_skopeo_inspect_and_podman_pull_and_run(registry, tmp_path, mounts):
    layer = [Dir("bin"), File("bin/busybox", open(BUSYBOX, "rb").read(), mode=0o755), Symlink("bin/sh", "busybox"),
             Symlink("bin/cat", "busybox"), Dir("etc"), File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")]
    config = new_config(["ADD busybox"])
    config["config"] = {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}
    write_image(tmp_path / "busybox.tar", [layer_tar(layer)], config, repo_tag="busybox:test", compression="gzip")
    base = registry.push(tmp_path / "busybox.tar", "base/busybox:v1")
    upper = tmp_path / "upper"
    point = mounts.mount(base, "--upper", upper, "-q")
    (point / "etc/greeting").write_text("hello from a layermount commit\n")
    mounts.umount(point)
    destination = f"docker://{registry.host}/committed/busybox:v2"
    result = run_layermount("commit", base, upper, "--push", destination, "-m", "add greeting")
    assert result.returncode == 0, result.stderr
    assert "Mounted from base/busybox" in result.stdout and result.stdout.count(": Pushed") == 1
    inspected = json.loads(subprocess.run([SKOPEO, "inspect", "--tls-verify=false", destination],
                                          capture_output=True, check=True, text=True).stdout)
    assert len(inspected["Layers"]) == 2
    ran = run_layermount("run", "--store", mounts.store, "-q", destination, "cat", "/etc/greeting")
    assert ran.returncode == 0 and ran.stdout == "hello from a layermount commit\n", ran.stderr
    conf = tmp_path / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    short = Path(tempfile.mkdtemp(prefix="lm-podman-"))      # podman wants a runroot under 50 characters
    podman = [PODMAN, "--root", short / "root", "--runroot", short / "run",
              "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
    env = dict(os.environ, CONTAINERS_CONF=str(conf))
    image = f"{registry.host}/committed/busybox:v2"
    try:
        pulled = subprocess.run([*podman, "pull", "--tls-verify=false", image], capture_output=True, text=True,
                                env=env, timeout=180)
        assert pulled.returncode == 0, pulled.stderr
        ran = subprocess.run([*podman, "run", "--rm", "--network", "none", image, "cat", "/etc/greeting"],
                             capture_output=True, text=True, env=env, timeout=180)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout == "hello from a layermount commit\n"
    finally:
        subprocess.run([*podman, "rm", "-af", "-t", "0"], capture_output=True, env=env, timeout=120)
        subprocess.run([*podman, "system", "reset", "-f"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(short, ignore_errors=True)

"""Attack catalogue: hostile images against the commands people use to look inside them.

Each test builds a hostile image in the test, runs the real CLI on it and
says in its docstring what the attack tries and what must hold. What holds
for all of them: one line on stderr naming the input, a distinct exit code,
no traceback, nothing read or measured outside the image, and no image
string reaching the terminal unescaped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
import zstandard

from conftest import run_layermount
from unionfs.image.writer import (Dir, File, Hardlink, ImageSpec, Symlink, layer_tar, new_config, write_image,
                                  write_images)
from unionfs.mount import is_mounted
from unionfs.textsafe import shown

# A title-setting OSC, a screen clear, a carriage return that forges a line over the honest one
# and a right-to-left override that shows the rest backwards.
PAYLOAD = "evil\x1b]0;owned\x07\x1b[2J\rFORGED\u202e"
ESCAPED = "evil\\x1b]0;owned\\x07\\x1b[2J\\rFORGED\\u202e"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def assert_terminal_safe(*texts: str) -> None:
    for text in texts:
        for control in ("\x1b", "\x07", "\r", "\u202e"):
            assert control not in text, f"raw {control!r} reached the terminal: {text!r}"


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *expected: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layermount: "), result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"


# ---- OCI layout directories, edited with their digests kept right -----------------------

def oci_dir(tmp_path: Path, name: str = "layout", layers=None, config=None) -> Path:
    root = tmp_path / name
    write_image(root, [layer_tar(layer) for layer in (layers or [[File("etc/hostname", b"box\n")]])],
                config or new_config(["step"]), format="oci-dir", repo_tag="app:1")
    return root


def blob_file(root: Path, digest: str) -> Path:
    return root / "blobs" / "sha256" / digest.split(":", 1)[1]


def put_blob(root: Path, data: bytes) -> dict:
    blob_file(root, sha256(data)).write_bytes(data)
    return {"digest": sha256(data), "size": len(data)}


def top_descriptor(root: Path) -> dict:
    return json.loads((root / "index.json").read_text())["manifests"][0]


def manifest_of(root: Path) -> dict:
    return json.loads(blob_file(root, top_descriptor(root)["digest"]).read_bytes())


def set_index(root: Path, manifests: list[dict]) -> None:
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))


def replace_config(root: Path, config_bytes: bytes) -> None:
    """Point the layout's one manifest at a config holding exactly ``config_bytes``."""
    descriptor = top_descriptor(root)
    manifest = manifest_of(root)
    manifest["config"].update(put_blob(root, config_bytes))
    descriptor.update(put_blob(root, json.dumps(manifest).encode()))
    set_index(root, [descriptor])


# ---- item 5: index fan-out -------------------------------------------------------

def fan_out_layout(tmp_path: Path, width: int, depth: int) -> Path:
    root = oci_dir(tmp_path)
    below = top_descriptor(root)
    below.pop("annotations", None)
    for _ in range(depth):
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [below] * width}
        below = dict(put_blob(root, json.dumps(index).encode()), mediaType=OCI_INDEX)
    set_index(root, [below])
    return root


def test_index_fan_out_is_walked_once_per_digest(tmp_path):
    """Attack: indexes that each list the one below 200 times, four deep (~168 KB in all), make a
    naive walk read 200**4 manifests with memory growing without bound.
    Must hold: every index and manifest is read once; the one image is found at once."""
    root = fan_out_layout(tmp_path, width=200, depth=4)
    layout_bytes = sum(path.stat().st_size for path in root.rglob("*") if path.is_file())
    assert 120_000 < layout_bytes < 250_000
    result = run_layermount("inspect", root, "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["layers"]) == 1


def test_descriptor_count_is_capped(tmp_path):
    """Attack: index.json lists one nested index 12,000 times, so every command re-reads it
    12,000 times (and a wider fan-out multiplies that).
    Must hold: past 10,000 descriptors in all, one clear line and exit 3."""
    root = fan_out_layout(tmp_path, width=1, depth=1)
    set_index(root, [top_descriptor(root)] * 12_000)
    result = run_layermount("inspect", root, timeout=60)
    assert_one_line_error(result, 3, str(root), "more than 10000 descriptors")


# ---- item 17: image directories and host files -----------------------------------------

@pytest.fixture
def host_secret(tmp_path) -> Path:
    """A root-only host file of a telling size, outside every image."""
    secret = tmp_path / "host" / "shadow"
    secret.parent.mkdir()
    secret.write_bytes(b"s" * 1309)
    secret.chmod(0o600)
    return secret


@pytest.mark.parametrize("which", ["layer blob", "config blob", "blobs directory"])
def test_layout_symlink_to_host_file_is_refused(tmp_path, host_secret, which):
    """Attack: an OCI layout directory whose blob is a symlink to a host file (or whose blobs/sha256
    is a symlink to a host directory), so that errors tell the host file's size or digest.
    Must hold: the symlink is refused by name; neither the size nor the digest of the host file shows."""
    root = oci_dir(tmp_path)
    manifest = manifest_of(root)
    if which == "blobs directory":
        elsewhere = host_secret.parent / "sha256"
        shutil.copytree(root / "blobs" / "sha256", elsewhere)
        shutil.rmtree(root / "blobs" / "sha256")
        (root / "blobs" / "sha256").symlink_to(elsewhere)
    else:
        digest = manifest["layers"][0]["digest"] if which == "layer blob" else manifest["config"]["digest"]
        target = blob_file(root, digest)
        target.unlink()
        target.symlink_to(host_secret)
    result = run_layermount("inspect", root)
    assert_one_line_error(result, 3, str(root), "symlink")
    assert "1309" not in result.stderr and sha256(host_secret.read_bytes())[7:19] not in result.stderr


def test_extracted_docker_archive_symlink_is_refused(tmp_path, host_secret):
    """Attack: an unpacked docker save directory whose layer.tar is a symlink to a host file.
    Must hold: refused as a symlink, the host file's size untold."""
    archive = tmp_path / "image.tar"
    write_image(archive, [layer_tar([File("a", b"a")])], new_config(["step"]), format="docker")
    unpacked = tmp_path / "unpacked"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    layer = next(unpacked.rglob("layer.tar"))
    layer.unlink()
    layer.symlink_to(host_secret)
    result = run_layermount("inspect", unpacked)
    assert_one_line_error(result, 3, "symlink")
    assert "1309" not in result.stderr


# ---- item 12: malformed documents -------------------------------------------------------

MALFORMED_CONFIGS = {
    "os is a number": {"os": 5},
    "history is a string": {"history": "RUN rm -rf /"},
    "config is a string": {"config": "Cmd"},
    "WorkingDir is a list": {"config": {"WorkingDir": ["/"]}},
    "Labels hold a list": {"config": {"Labels": {"a": ["b"]}}},
}


@pytest.mark.parametrize("case", MALFORMED_CONFIGS)
def test_malformed_config_fields_are_one_line(tmp_path, case):
    """Attack: an image config whose fields have the wrong JSON type (os: 5, history or config as a
    string ...), which crashed inspect with a traceback.
    Must hold: one line naming the image and the field, exit 3."""
    root = oci_dir(tmp_path)
    config = json.loads(blob_file(root, manifest_of(root)["config"]["digest"]).read_bytes())
    config.update(MALFORMED_CONFIGS[case])
    replace_config(root, json.dumps(config).encode())
    for command in (["inspect"], ["history", "--store", tmp_path / "store"]):
        result = run_layermount(command[0], root, *command[1:])
        assert_one_line_error(result, 3, str(root), "image config")


def test_deeply_nested_config_is_one_line(tmp_path):
    """Attack: a config nesting 100,000 lists deep, which made json raise RecursionError.
    Must hold: one line, exit 3."""
    root = oci_dir(tmp_path)
    config = json.loads(blob_file(root, manifest_of(root)["config"]["digest"]).read_bytes())
    text = json.dumps(config)
    replace_config(root, (text[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}").encode())
    assert_one_line_error(run_layermount("inspect", root), 3, str(root), "deep")


@pytest.mark.parametrize("field, value", [("annotations", ["org.opencontainers.image.ref.name"]),
                                          ("platform", "linux/amd64"), ("size", "12")])
def test_malformed_index_descriptor_is_one_line(tmp_path, field, value):
    """Attack: index.json's descriptor with annotations as a list, platform as a string or a size
    as a string: AttributeError tracebacks.
    Must hold: one line naming index.json and the field, exit 3."""
    root = oci_dir(tmp_path)
    descriptor = top_descriptor(root)
    descriptor[field] = value
    set_index(root, [descriptor])
    assert_one_line_error(run_layermount("inspect", root), 3, str(root), "index.json", repr(field))


def test_repo_tags_string_is_not_split_into_characters(tmp_path):
    """Attack: a docker manifest.json whose RepoTags is the string "ab" instead of a list, shown
    as the tags "a, b" (and matched by --image a).
    Must hold: refused as a malformed field, exit 3."""
    archive = tmp_path / "image.tar"
    write_image(archive, [layer_tar([File("a", b"a")])], new_config(["step"]), format="docker", repo_tag="x:1")
    rewritten = tmp_path / "rewritten.tar"
    with tarfile.open(archive) as source, tarfile.open(rewritten, "w") as target:
        for member in source:
            data = source.extractfile(member).read() if member.isfile() else b""
            if member.name == "manifest.json":
                manifest = json.loads(data)
                manifest[0]["RepoTags"] = "ab"
                data = json.dumps(manifest).encode()
                member.size = len(data)
            target.addfile(member, io.BytesIO(data))
    result = run_layermount("inspect", rewritten, "--image", "a")
    assert_one_line_error(result, 3, "RepoTags", "list of strings")


@pytest.mark.parametrize("record", ["{not json", '{"layers": "abc", "store": "/", "image": "x"}', "[1, 2]",
                                    "[" * 100_000])
def test_damaged_upper_record_is_one_line(tmp_path, record):
    """Attack: a kept upper whose layermount.json is not JSON, not an object, holds the layers as a
    string or nests deep enough for RecursionError: tracebacks in diff.
    Must hold: one line naming the upper, exit 2."""
    upper = tmp_path / "upper"
    (upper / "diff").mkdir(parents=True)
    (upper / "layermount.json").write_text(record)
    assert_one_line_error(run_layermount("diff", upper), 2, f"upper {upper}", "layermount.json")


def test_damaged_upper_record_refuses_the_mount(tmp_path, mounts):
    """Attack: the same damaged layermount.json given to a mount with --upper.
    Must hold: one line naming the upper, exit 2, nothing mounted."""
    image = tmp_path / "image.tar"
    write_image(image, [layer_tar([File("a", b"a")])], new_config(["step"]))
    upper = tmp_path / "upper"
    (upper / "diff").mkdir(parents=True)
    upper.chmod(0o700)      # private, or the refusal of a reachable upper comes first
    (upper / "layermount.json").write_text('{"layers": 5}')
    result = mounts.mount(image, "--upper", upper, expect_ok=False)
    assert_one_line_error(result, 2, f"upper {upper}", "layermount.json")
    assert not is_mounted(str(mounts.mountpoint()))


def test_unexpected_failure_is_one_line_and_traceback_only_with_debug(tmp_path, monkeypatch, capsys):
    """Attack: any input that reaches a bug not yet found (simulated: the reader raises KeyError).
    Must hold: the CLI's last line of defence prints one line naming the input, exit 3; the
    traceback only under --debug."""
    from unionfs import api, cli

    def broken(*args, **kwargs):
        raise KeyError("digest")

    monkeypatch.setattr(api, "load_image", broken)
    image = str(tmp_path / "image.tar")
    assert cli.main(["inspect", image]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"layermount: {image}: ") and "KeyError" in err
    assert cli.main(["inspect", image, "--debug"]) == 3
    assert "Traceback" in capsys.readouterr().err


# ---- item 9: escape sequences -----------------------------------------------------------

def hostile_config(steps: list[str]) -> dict:
    config = new_config(steps)
    config["variant"] = PAYLOAD
    config["created"] = PAYLOAD
    config["config"] = {"WorkingDir": PAYLOAD, "User": PAYLOAD, "Env": [f"X={PAYLOAD}"], "Cmd": [PAYLOAD],
                        "Labels": {PAYLOAD: PAYLOAD}}
    return config


def test_inspect_and_history_escape_image_strings(tmp_path, store_dir):
    """Attack: RepoTags, created_by, WorkingDir, User, created and the platform variant carrying a
    title-setting OSC, a screen clear and a forged line, printed by inspect, history and store ls.
    Must hold: shown escaped (and visibly there); --json keeps them exact."""
    image = tmp_path / "image.tar"
    write_image(image, [layer_tar([File("a", b"a")])], hostile_config([PAYLOAD]), repo_tag=f"app{PAYLOAD}:1")
    inspect = run_layermount("inspect", image)
    history = run_layermount("history", image, "--store", store_dir, "--no-trunc")
    run_layermount("unpack", image, "--store", store_dir, "-q", check=True)
    listing = run_layermount("store", "ls", "--store", store_dir)
    for result in (inspect, history, listing):
        assert result.returncode == 0, result.stderr
        assert_terminal_safe(result.stdout, result.stderr)
        assert ESCAPED in result.stdout, result.stdout
    assert inspect.stdout.count(ESCAPED) >= 6
    summary = json.loads(run_layermount("inspect", image, "--json").stdout)
    assert summary["repo_tags"] == [f"app{PAYLOAD}:1"] and summary["config"]["WorkingDir"] == PAYLOAD
    assert summary["layers"][0]["created_by"] == PAYLOAD


def test_errors_escape_tags_platforms_and_file_names(tmp_path):
    """Attack: escape sequences in the tags listed by the "several images" and "no image" errors,
    in the platform named by a platform mismatch, and in a missing layer file's name.
    Must hold: every error line escaped."""
    several = tmp_path / "several.tar"
    layer = layer_tar([File("a", b"a")])
    write_images(several, [ImageSpec([layer], new_config(["one"]), f"one{PAYLOAD}:1"),
                           ImageSpec([layer], new_config(["two"]), "two:1")])
    single = tmp_path / "single.tar"
    write_image(single, [layer], hostile_config(["step"]))
    archive, missing = tmp_path / "missing.tar", tmp_path / "missing"
    write_image(archive, [layer], new_config(["step"]), format="docker-oci")
    with tarfile.open(archive) as tar:
        tar.extractall(missing, filter="data")
    manifest_path = missing / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest[0]["Layers"] = [f"blobs/{PAYLOAD}"]
    manifest_path.write_text(json.dumps(manifest))
    results = [run_layermount("inspect", several), run_layermount("inspect", several, "--image", "nope"),
               run_layermount("inspect", single, "--platform", "linux/s390x"), run_layermount("inspect", missing)]
    for result in results:
        assert result.returncode == 3, result.stderr
        assert_terminal_safe(result.stdout, result.stderr)
        assert ESCAPED in result.stderr, result.stderr


def test_lint_escapes_member_names_and_link_targets(tmp_path):
    """Attack: a layer whose member names and symlink targets carry escape sequences, shown by lint.
    Must hold: every finding escaped, and still naming the member."""
    image = tmp_path / "image.tar"
    write_image(image, [layer_tar([File(f"bin/su{PAYLOAD}", b"x", mode=0o4755),
                                   Symlink(f"up{PAYLOAD}", f"../../{PAYLOAD}"),
                                   Dir("d"), Hardlink(f"h{PAYLOAD}", "d")])], new_config(["step"]))
    result = run_layermount("lint", image)
    assert result.returncode == 1
    assert_terminal_safe(result.stdout, result.stderr)
    assert result.stdout.count(ESCAPED) >= 3, result.stdout


def test_diff_escapes_upper_file_names(tmp_path):
    """Attack: a user of the mount creates a file whose name carries escape sequences; whoever
    reviews the upper with diff gets their terminal driven.
    Must hold: diff escapes it; diff --json keeps it exact."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    (upper / f"note{PAYLOAD}").write_text("x")
    plain = run_layermount("diff", upper, "--lowerdir", lower)
    assert plain.returncode == 0, plain.stderr
    assert_terminal_safe(plain.stdout)
    assert ESCAPED in plain.stdout
    as_json = run_layermount("diff", upper, "--lowerdir", lower, "--json")
    assert json.loads(as_json.stdout) == [{"kind": "A", "path": f"/note{PAYLOAD}"}]


def test_which_and_explain_escape_file_names(tmp_path, mounts):
    """Attack: an image file whose name carries escape sequences, looked up with which and explain.
    Must hold: both escape it."""
    image = tmp_path / "image.tar"
    write_image(image, [layer_tar([File(f"f{PAYLOAD}", b"x")])], new_config(["step"]))
    point = mounts.mount(image)
    for command in ("which", "explain"):
        result = run_layermount(command, point / f"f{PAYLOAD}")
        assert result.returncode == 0, result.stderr
        assert_terminal_safe(result.stdout, result.stderr)
        assert ESCAPED in result.stdout


# ---- item 11: lint refuses what unpack refuses --------------------------------------------

def _member(name: str, kind=tarfile.REGTYPE, linkname: str = "", data: bytes = b"") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, len(data)
    return info, data


UNPACK_REFUSES = {
    "file through an earlier symlink": ("a/x", [_member("a", tarfile.SYMTYPE, "/etc"), _member("a/x", data=b"x")]),
    "root replaced by a file": (".", [_member(".", data=b"x")]),
    "root replaced by a symlink": (".", [_member(".", tarfile.SYMTYPE, "/")]),
    "hardlink to a directory": ("h", [_member("d", tarfile.DIRTYPE), _member("h", tarfile.LNKTYPE, "d")]),
    "hardlink through a parent symlinked later": ("h", [
        _member("d", tarfile.DIRTYPE), _member("d/f", data=b"f"), _member("d", tarfile.SYMTYPE, "/etc"),
        _member("h", tarfile.LNKTYPE, "d/f")]),
    "name over NAME_MAX": ("n" * 256, [_member("n" * 256, data=b"n")]),
}


@pytest.mark.parametrize("case", UNPACK_REFUSES)
def test_lint_errors_exactly_where_unpack_refuses(tmp_path, store_dir, case):
    """Attack: a layer unpack refuses as hostile (a file through a symlink, the root replaced, a
    hardlink to a directory or through a parent replaced by a symlink, a name over NAME_MAX) that
    lint called clean ("0 errors"), so a vetted image then fails, or worse, to unpack.
    Must hold: lint reports one error, at the member unpack refuses."""
    refused, members = UNPACK_REFUSES[case]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in [_member("ok", data=b"fine"), *members]:
            tar.addfile(info, io.BytesIO(data))
    image = tmp_path / "image.tar"
    write_image(image, [buffer.getvalue()], new_config(["step"]))
    unpack = run_layermount("unpack", image, "--store", store_dir, "-q")
    assert_one_line_error(unpack, 3, f"member '{shown(refused, 120)}'")
    lint = run_layermount("lint", image)
    assert lint.returncode == 1
    errors = [line for line in lint.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: layer 1: /{refused}: "), lint.stdout
    assert lint.stdout.rstrip().endswith("1 errors, 0 warnings")


# ---- also: a bomb inside a compressed outer archive -----------------------------------------

@needs_root
def test_compressed_outer_archive_bomb_cannot_fill_tmp(tmp_path):
    """Attack: a 30 KB zstd image archive that decompresses to 320 MiB of zeros, spooled into a
    256 MiB TMPDIR (a tmpfs here), filling it for every other user of /tmp.
    Must hold: refused as a bomb before TMPDIR fills (its reserve stays free), one line, exit 3,
    and nothing left in TMPDIR."""
    spool = tmp_path / "tmpfs"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", spool], check=True)
    try:
        bomb = tmp_path / "bomb.tar.zst"
        header = tarfile.TarInfo("layer.tar")
        header.size = 320 << 20
        with open(bomb, "wb") as out, zstandard.ZstdCompressor().stream_writer(out) as writer:
            writer.write(header.tobuf(tarfile.PAX_FORMAT))
            zeros = bytes(1 << 20)
            for _ in range(320):
                writer.write(zeros)
            writer.write(bytes(1024))
        assert bomb.stat().st_size < 100_000
        lowest_free = [1 << 40]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                stats = os.statvfs(spool)
                lowest_free[0] = min(lowest_free[0], stats.f_bavail * stats.f_frsize)
                done.wait(0.005)
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            result = run_layermount("inspect", bomb, env={"TMPDIR": str(spool)})
        finally:
            done.set()
            watcher.join()
        assert_one_line_error(result, 3, str(bomb), "decompression bomb")
        assert lowest_free[0] >= 32 << 20, lowest_free
        assert os.listdir(spool) == []
    finally:
        subprocess.run(["umount", spool], check=True)

"""The image writer: layer tars from specs, the four output formats, and what other tools make of them."""

from __future__ import annotations

import copy
import io
import hashlib
import json
import shutil
import subprocess
import tarfile

import pytest

from unionfs.errors import LayermountError, UsageError
from unionfs.image import open_image
from unionfs.image.compression import detect_compression, open_decompressed
from unionfs.image.oci_layout import Platform
from unionfs.image.writer import (FIXED_MTIME, Device, Dir, Fifo, File, Hardlink, Opaque, Symlink, Whiteout,
                                  layer_tar, new_config, write_image)

BASE = layer_tar([Dir("etc"), File("etc/hostname", b"base\n")])
TOP = layer_tar([File("etc/hostname", b"top\n"), Whiteout("etc/gone")])
CONFIG = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
          "history": [{"created_by": "base"}, {"created_by": "top"}, {"created_by": "CMD", "empty_layer": True}]}
skopeo = shutil.which("skopeo")
needs_skopeo = pytest.mark.skipif(skopeo is None, reason="skopeo is not installed")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def members(archive) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        return {member.name: member for member in tar.getmembers()}


def member_json(archive, name):
    with tarfile.open(archive) as tar:
        return json.load(tar.extractfile(name))


# ---- layer tars ---------------------------------------------------------------

def test_layer_tar_entries():
    data = layer_tar([
        Dir("/usr/", mode=0o700, uid=5, gid=6),
        File("usr/data", b"bytes", mode=0o4755, mtime=12345, xattrs={"user.raw": b"\xff\x00", "user.text": "é"}),
        Symlink("usr/link", "/etc/passwd"),
        Hardlink("usr/again", "/usr/data"),
        Whiteout("usr/removed"),
        Whiteout("top-level"),
        Opaque("var/lib"),
        Device("dev/sda", "block", 8, 0),
        Device("dev/null", "char", 1, 3, mode=0o666),
        Fifo("run/pipe"),
    ])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        found = {member.name: member for member in tar.getmembers()}
        assert tar.extractfile("usr/data").read() == b"bytes"
    assert list(found) == ["usr", "usr/data", "usr/link", "usr/again", "usr/.wh.removed", ".wh.top-level",
                           "var/lib/.wh..wh..opq", "dev/sda", "dev/null", "run/pipe"]
    assert (found["usr"].isdir(), found["usr"].mode, found["usr"].uid, found["usr"].gid) == (True, 0o700, 5, 6)
    assert (found["usr/data"].mode, found["usr/data"].mtime) == (0o4755, 12345)
    assert found["usr/data"].pax_headers["SCHILY.xattr.user.raw"].encode("utf-8", "surrogateescape") == b"\xff\x00"
    assert found["usr/data"].pax_headers["SCHILY.xattr.user.text"] == "é"
    assert (found["usr/link"].issym(), found["usr/link"].linkname) == (True, "/etc/passwd")
    assert (found["usr/again"].islnk(), found["usr/again"].linkname) == (True, "usr/data")
    assert found["usr/.wh.removed"].isfile() and found["usr/.wh.removed"].size == 0
    assert (found["dev/sda"].isblk(), found["dev/sda"].devmajor, found["dev/sda"].devminor) == (True, 8, 0)
    assert (found["dev/null"].ischr(), found["dev/null"].mode, found["dev/null"].devminor) == (True, 0o666, 3)
    assert found["run/pipe"].isfifo()
    assert found["run/pipe"].mtime == found["usr"].mtime == FIXED_MTIME


def test_layer_tar_is_deterministic():
    spec = lambda: [Dir("a"), File("a/b", b"x" * 1000, xattrs={"user.k": b"v"}), Symlink("c", "a/b")]  # noqa: E731
    assert layer_tar(spec()) == layer_tar(spec())


def test_device_kind_is_checked():
    with pytest.raises(ValueError, match="kind must be 'char' or 'block'"):
        layer_tar([Device("dev/x", "pipe", 1, 1)])


def test_new_config():
    config = new_config(["one", "two"], platform=Platform.parse("linux/arm/v7"))
    assert config == {"architecture": "arm", "os": "linux", "variant": "v7",
                      "rootfs": {"type": "layers", "diff_ids": []},
                      "history": [{"created_by": "one"}, {"created_by": "two"}]}


# ---- images -------------------------------------------------------------------

@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_diff_ids_filled_into_a_copy_of_the_config(tmp_path, compression):
    original = copy.deepcopy(CONFIG)
    digest = write_image(tmp_path / "oci", [BASE, TOP], CONFIG, format="oci-dir", compression=compression)
    assert CONFIG == original
    blob = (tmp_path / "oci" / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()
    assert sha256(blob) == digest
    written = json.loads(blob)
    assert written["rootfs"] == {"type": "layers", "diff_ids": [sha256(BASE), sha256(TOP)]}
    assert written["history"] == CONFIG["history"] and written["config"] == CONFIG["config"]
    for layer in open_image(tmp_path / "oci").layers:
        with layer.open() as stream:
            assert detect_compression(stream.read(4)) == compression


@pytest.mark.parametrize("format", ["docker", "docker-oci", "oci"])
@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_output_is_reproducible(tmp_path, format, compression):
    first = write_image(tmp_path / "one", [BASE, TOP], CONFIG, format=format, compression=compression)
    second = write_image(tmp_path / "two", [BASE, TOP], CONFIG, format=format, compression=compression)
    assert first == second
    assert (tmp_path / "one").read_bytes() == (tmp_path / "two").read_bytes()


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_layers_from_files(tmp_path, compression):
    (tmp_path / "base.tar").write_bytes(BASE)
    (tmp_path / "top.tar").write_bytes(TOP)
    digest = write_image(tmp_path / "oci", [tmp_path / "base.tar", str(tmp_path / "top.tar")], CONFIG,
                         format="oci-dir", compression=compression)
    assert digest == write_image(tmp_path / "same", [BASE, TOP], CONFIG, format="oci-dir", compression=compression)
    image = open_image(tmp_path / "oci")
    for layer, expected in zip(image.layers, [BASE, TOP]):
        with layer.open() as stream:
            assert open_decompressed(stream).read() == expected


def test_classic_docker_layout(tmp_path):
    archive = tmp_path / "image.tar"
    digest = write_image(archive, [BASE, TOP], CONFIG, format="docker", repo_tag="example.com/team/app")
    found = members(archive)
    [entry] = member_json(archive, "manifest.json")
    assert entry["Config"] == digest.split(":")[1] + ".json" and entry["Config"] in found
    assert entry["RepoTags"] == ["example.com/team/app:latest"]
    top_id = entry["Layers"][1].split("/")[0]
    assert member_json(archive, "repositories") == {"example.com/team/app": {"latest": top_id}}
    for layer_file in entry["Layers"]:
        layer_id = layer_file.split("/")[0]
        assert found[layer_id].isdir()
        assert {f"{layer_id}/VERSION", f"{layer_id}/json", layer_file} <= set(found)
    assert member_json(archive, f"{top_id}/json")["parent"] == entry["Layers"][0].split("/")[0]


def test_untagged_classic_docker_has_no_repositories(tmp_path):
    write_image(tmp_path / "image.tar", [BASE], CONFIG, format="docker")
    assert member_json(tmp_path / "image.tar", "manifest.json")[0]["RepoTags"] is None
    assert "repositories" not in members(tmp_path / "image.tar")


def test_docker_oci_layout(tmp_path):
    archive = tmp_path / "image.tar"
    digest = write_image(archive, [BASE, TOP], CONFIG, format="docker-oci", repo_tag="app:2", compression="gzip")
    found = members(archive)
    [entry] = member_json(archive, "manifest.json")
    assert entry["Config"] == "blobs/sha256/" + digest.split(":")[1]
    assert all(name.startswith("blobs/sha256/") and name in found for name in entry["Layers"])
    [descriptor] = member_json(archive, "index.json")["manifests"]
    assert descriptor["annotations"] == {"io.containerd.image.name": "docker.io/library/app:2",
                                         "org.opencontainers.image.ref.name": "2"}
    assert member_json(archive, "oci-layout") == {"imageLayoutVersion": "1.0.0"}


def test_oci_dir_replaces_an_earlier_one(tmp_path):
    out = tmp_path / "oci"
    write_image(out, [BASE], CONFIG, format="oci-dir")
    digest = write_image(out, [BASE, TOP], CONFIG, format="oci-dir")
    assert open_image(out).config_digest == digest
    assert sorted(path.name for path in tmp_path.iterdir()) == ["oci"]


def test_failed_write_leaves_nothing(tmp_path):
    (tmp_path / "image.tar").write_bytes(b"previous")
    with pytest.raises(LayermountError, match=f"cannot write image: {tmp_path / 'missing.tar'}"):
        write_image(tmp_path / "image.tar", [BASE, tmp_path / "missing.tar"], CONFIG, format="docker")
    assert (tmp_path / "image.tar").read_bytes() == b"previous"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["image.tar"]


@pytest.mark.parametrize("options, message", [
    ({"format": "rpm"}, "unknown image format 'rpm'"),
    ({"compression": "xz"}, "unknown compression 'xz'"),
    ({"format": "oci", "compression": "zstd", "media_types": "docker"}, "docker media types have no zstd"),
])
def test_bad_options(tmp_path, options, message):
    with pytest.raises(UsageError, match=message):
        write_image(tmp_path / "out", [BASE], CONFIG, **options)
    assert list(tmp_path.iterdir()) == []


# ---- other tools ----------------------------------------------------------------

def run_skopeo(*args) -> str:
    result = subprocess.run([skopeo, "--insecure-policy", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@needs_skopeo
@pytest.mark.parametrize("format, transport", [("docker", "docker-archive"), ("docker-oci", "docker-archive"),
                                               ("oci", "oci-archive")])
@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_skopeo_reads_what_we_write(tmp_path, format, transport, compression):
    archive = tmp_path / "image.tar"
    write_image(archive, [BASE, TOP], CONFIG, format=format, repo_tag="test/app:1", compression=compression)
    inspected = json.loads(run_skopeo("inspect", f"{transport}:{archive}"))
    assert (inspected["Architecture"], inspected["Os"]) == ("amd64", "linux")
    assert len(inspected["Layers"]) == 2
    config = json.loads(run_skopeo("inspect", "--config", f"{transport}:{archive}"))
    assert config["rootfs"]["diff_ids"] == [sha256(BASE), sha256(TOP)]


@needs_skopeo
@pytest.mark.parametrize("target", ["docker-archive", "oci-archive"])
def test_we_read_what_skopeo_copies(tmp_path, target):
    source = tmp_path / "source.tar"
    write_image(source, [BASE, TOP], CONFIG, format="oci", compression="gzip")
    copied = tmp_path / "copied.tar"
    run_skopeo("copy", f"oci-archive:{source}", f"{target}:{copied}:example/copied:7")
    image = open_image(copied)
    assert any(tag.endswith("example/copied:7") for tag in image.repo_tags)
    assert [layer.diff_id for layer in image.layers] == [sha256(BASE), sha256(TOP)]
    for layer, expected in zip(image.layers, [BASE, TOP]):
        with layer.open() as stream:
            assert open_decompressed(stream).read() == expected

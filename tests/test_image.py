"""Image readers and layer decompression, on archives made by unionfs.image.writer or crafted by hand."""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import io
import json
import tarfile

import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from unionfs.errors import DigestMismatch, ImageError, UsageError
from unionfs.image import open_image, open_layer_tars
from unionfs.image.compression import detect_compression, open_decompressed
from unionfs.image.oci_layout import Platform
from unionfs.image.writer import Dir, File, ImageSpec, layer_tar, new_config, write_image, write_images, write_index

BASE = layer_tar([Dir("etc"), File("etc/os-release", b"ID=test\n"), File("bin/sh", b"#!shell", mode=0o755)])
TOP = layer_tar([File("etc/motd", b"hello\n")])


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_for(platform: str = "linux/amd64", note: str = "") -> dict:
    config = new_config(["base", "top"], platform=Platform.parse(platform))
    config["config"] = {"Env": [f"NOTE={note}"]}
    return config


def read_all(image) -> list[bytes]:
    """Every layer's uncompressed tar, each read from a fresh stream."""
    tars = []
    for layer in image.layers:
        with layer.open() as blob:
            tars.append(open_decompressed(blob).read())
    return tars


def assert_layers_verify(image) -> None:
    for layer, tar in zip(image.layers, read_all(image)):
        assert sha256(tar) == layer.diff_id
        if layer.digest is not None:
            with layer.open() as blob:
                assert sha256(blob.read()) == layer.digest


def make_tar(path, members: list[tuple]) -> None:
    """A tar by hand: (name, bytes) files, (name, "symlink"|"hardlink", target) links."""
    with tarfile.open(path, "w") as tar:
        for name, *rest in members:
            info = tarfile.TarInfo(name)
            if isinstance(rest[0], bytes):
                info.size = len(rest[0])
                tar.addfile(info, io.BytesIO(rest[0]))
            else:
                info.type = tarfile.SYMTYPE if rest[0] == "symlink" else tarfile.LNKTYPE
                info.linkname = rest[1]
                tar.addfile(info)


def classic_members(layer_files: list[str], diff_ids: list[str], extra: list[tuple]) -> list[tuple]:
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": ["hand/made:1"], "Layers": layer_files}]
    return [(config_name, config), ("manifest.json", json.dumps(manifest).encode()), *extra]


def edit_oci_dir(root, *, manifest=None, config=None) -> None:
    """Rewrite the single image of an OCI layout directory through ``manifest``/``config`` edits, digests kept right."""
    index = json.loads((root / "index.json").read_text())
    descriptor = index["manifests"][0]

    def blob(digest):
        return root / "blobs" / "sha256" / digest.split(":")[1]

    def store(document) -> tuple[str, int]:
        data = json.dumps(document).encode()
        blob(sha256(data)).write_bytes(data)
        return sha256(data), len(data)

    document = json.loads(blob(descriptor["digest"]).read_bytes())
    if config:
        config_document = json.loads(blob(document["config"]["digest"]).read_bytes())
        config(config_document)
        document["config"]["digest"], document["config"]["size"] = store(config_document)
    if manifest:
        manifest(document)
    descriptor["digest"], descriptor["size"] = store(document)
    (root / "index.json").write_text(json.dumps(index))


# ---- reading each format ----------------------------------------------------

@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
@pytest.mark.parametrize("format, read_as, digests_known", [
    ("docker", "docker-archive", False),
    ("docker-oci", "docker-archive", True),
    ("oci", "oci-layout", True),
    ("oci-dir", "oci-layout", True),
])
def test_every_format_reads_back_to_its_diff_ids(tmp_path, format, read_as, digests_known, compression):
    out = tmp_path / "image"
    config_digest = write_image(out, [BASE, TOP], config_for(), format=format, repo_tag="test/app:1",
                                compression=compression)
    image = open_image(out)
    assert (image.format, image.config_digest, image.platform) == (read_as, config_digest, "linux/amd64")
    assert image.config["rootfs"]["diff_ids"] == [sha256(BASE), sha256(TOP)]
    assert [layer.diff_id for layer in image.layers] == [sha256(BASE), sha256(TOP)]
    assert all((layer.digest is not None) == digests_known for layer in image.layers)
    assert all(layer.media_type.endswith({"none": ".tar", "gzip": "+gzip", "zstd": "+zstd"}[compression])
               for layer in image.layers)
    assert any("test/app:1" in tag for tag in image.repo_tags)
    assert read_all(image) == [BASE, TOP]
    assert_layers_verify(image)


@pytest.mark.parametrize("outer", ["gzip", "zstd"])
def test_compressed_outer_archive(tmp_path, outer):
    plain = tmp_path / "image.tar"
    write_image(plain, [BASE, TOP], config_for(), format="docker", compression="gzip")
    packed = tmp_path / "image.tar.packed"
    data = plain.read_bytes()
    packed.write_bytes(gzip.compress(data) if outer == "gzip" else zstandard.ZstdCompressor().compress(data))
    image = open_image(packed)
    assert image.format == "docker-archive"
    assert read_all(image) == [BASE, TOP]


def test_layers_read_in_parallel_from_one_archive(tmp_path):
    layers = [layer_tar([File(f"file{n}", bytes([n]) * 200_000)]) for n in range(6)]
    out = tmp_path / "image.tar"
    write_image(out, layers, new_config([f"{n}" for n in range(6)]), format="oci", compression="gzip")
    outer = tmp_path / "outer.tar.gz"
    outer.write_bytes(gzip.compress(out.read_bytes()))
    image = open_image(outer)

    def digest_of(layer):
        with layer.open() as blob:
            return sha256(open_decompressed(blob).read())

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(digest_of, image.layers * 3))
    assert results == [layer.diff_id for layer in image.layers] * 3


def test_classic_layer_files_linked_inside_the_archive(tmp_path):
    archive = tmp_path / "linked.tar"
    layer_files = ["./aaa/layer.tar", "bbb/layer.tar", "ccc/layer.tar"]
    make_tar(archive, classic_members(layer_files, [sha256(BASE)] * 3, [
        ("aaa/layer.tar", BASE),
        ("bbb/layer.tar", "symlink", "../aaa/layer.tar"),
        ("ccc/layer.tar", "hardlink", "bbb/layer.tar"),
    ]))
    image = open_image(archive)
    assert image.repo_tags == ["hand/made:1"]
    assert [layer.digest for layer in image.layers] == [None] * 3
    assert read_all(image) == [BASE] * 3


@pytest.mark.parametrize("link, message", [
    (("bbb/layer.tar", "symlink", "../bbb/layer.tar"), "too many levels of links"),
    (("bbb/layer.tar", "symlink", "../../outside.tar"), "points outside the image"),
    (("bbb/layer.tar", "symlink", "../nowhere/layer.tar"), "missing layer file bbb/layer.tar"),
])
def test_classic_layer_links_that_go_nowhere(tmp_path, link, message):
    archive = tmp_path / "bad.tar"
    make_tar(archive, classic_members(["bbb/layer.tar"], [sha256(BASE)], [link]))
    with pytest.raises(ImageError, match=message):
        open_image(archive)


def test_docker_oci_archive_without_manifest_json_reads_its_index(tmp_path):
    written = tmp_path / "docker25.tar"
    write_image(written, [BASE, TOP], config_for(), format="docker-oci", repo_tag="app")
    stripped = tmp_path / "index-only.tar"
    with tarfile.open(written) as source, tarfile.open(stripped, "w") as target:
        for member in source.getmembers():
            if member.name != "manifest.json":
                target.addfile(member, source.extractfile(member))
    image = open_image(stripped)
    assert image.format == "oci-layout"
    assert image.repo_tags == ["docker.io/library/app:latest"]
    assert read_all(image) == [BASE, TOP]


def test_extracted_docker_save_directory(tmp_path):
    archive = tmp_path / "image.tar"
    write_image(archive, [BASE, TOP], config_for(), format="docker")
    unpacked = tmp_path / "unpacked"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    image = open_image(unpacked)
    assert image.format == "docker-archive"
    assert read_all(image) == [BASE, TOP]


def test_docker_media_types(tmp_path):
    write_image(tmp_path / "oci", [BASE, TOP], config_for(), format="oci-dir", compression="gzip",
                media_types="docker")
    manifest_type = json.loads((tmp_path / "oci" / "index.json").read_text())["manifests"][0]["mediaType"]
    assert manifest_type == "application/vnd.docker.distribution.manifest.v2+json"
    image = open_image(tmp_path / "oci")
    assert [layer.media_type for layer in image.layers] == ["application/vnd.docker.image.rootfs.diff.tar.gzip"] * 2
    assert_layers_verify(image)


# ---- choosing an image --------------------------------------------------------

PLATFORMS = ["linux/amd64", "linux/arm64", "linux/arm/v7"]


@pytest.fixture(params=[False, True], ids=["flat-index", "nested-index"])
def multi_platform(tmp_path, request):
    out = tmp_path / "multi"
    digests = write_index(out, [ImageSpec([BASE, TOP], config_for(platform)) for platform in PLATFORMS],
                          format="oci", nested=request.param, repo_tag="multi:1",
                          media_types="docker" if request.param else "oci")
    return out, dict(zip(PLATFORMS, digests))


@pytest.mark.parametrize("wanted", PLATFORMS + ["linux/arm64/v8", "linux/arm"])
def test_platform_is_chosen(multi_platform, wanted):
    path, digests = multi_platform
    image = open_image(path, platform=wanted)
    expected = {"linux/arm64/v8": "linux/arm64", "linux/arm": "linux/arm/v7"}.get(wanted, wanted)
    assert image.config_digest == digests[expected]
    assert image.repo_tags == ["multi:1"]
    assert_layers_verify(image)


@pytest.mark.parametrize("machine, expected", [("x86_64", "linux/amd64"), ("aarch64", "linux/arm64"),
                                               ("armv7l", "linux/arm/v7")])
def test_host_platform_is_the_default(multi_platform, monkeypatch, machine, expected):
    path, digests = multi_platform
    monkeypatch.setattr("platform.machine", lambda: machine)
    assert open_image(path).config_digest == digests[expected]


def test_no_image_for_the_platform(multi_platform):
    path, _ = multi_platform
    with pytest.raises(ImageError, match="no image for platform linux/s390x; it has "
                                         "linux/amd64, linux/arm64, linux/arm/v7"):
        open_image(path, platform="linux/s390x")


def test_single_platform_image_refuses_another_platform(tmp_path):
    write_image(tmp_path / "image.tar", [BASE], config_for("linux/arm64"), format="docker")
    assert open_image(tmp_path / "image.tar").platform == "linux/arm64"
    with pytest.raises(ImageError, match="for linux/arm64, not linux/amd64"):
        open_image(tmp_path / "image.tar", platform="linux/amd64")


@pytest.mark.parametrize("text", ["linux", "linux/", "a/b/c/d"])
def test_malformed_platform(tmp_path, text):
    with pytest.raises(UsageError, match="expected OS/ARCH"):
        open_image(tmp_path, platform=text)


@pytest.mark.parametrize("format", ["docker", "docker-oci", "oci", "oci-dir"])
def test_several_images_chosen_by_ref(tmp_path, format):
    out = tmp_path / "several"
    first, second = write_images(out, [ImageSpec([BASE], config_for(note="1"), "example.com/one:1"),
                                       ImageSpec([BASE, TOP], config_for(note="2"), "two")], format=format)
    assert open_image(out, ref="example.com/one:1").config_digest == first
    assert open_image(out, ref="two:latest").config_digest == second
    assert open_image(out, ref="docker.io/library/two").config_digest == second
    with pytest.raises(ImageError, match="several images .*one:1.*two.*--image"):
        open_image(out)
    with pytest.raises(ImageError, match="no image 'three'"):
        open_image(out, ref="three")


# ---- damage -------------------------------------------------------------------

def test_config_not_matching_its_digest(tmp_path):
    out = tmp_path / "oci"
    config_digest = write_image(out, [BASE], config_for(), format="oci-dir")
    config_blob = out / "blobs" / "sha256" / config_digest.split(":")[1]
    config_blob.write_bytes(config_blob.read_bytes().replace(b"amd64", b"arm64"))
    with pytest.raises(DigestMismatch, match=f"config blob blobs/sha256/{config_digest.split(':')[1]}"):
        open_image(out)


def test_classic_config_not_matching_its_name(tmp_path):
    archive = tmp_path / "bad.tar"
    members = classic_members(["a/layer.tar"], [sha256(BASE)], [("a/layer.tar", BASE)])
    members[0] = (members[0][0], members[0][1].replace(b"amd64", b"arm64"))
    make_tar(archive, members)
    with pytest.raises(DigestMismatch, match="config .*.json does not match its name"):
        open_image(archive)


def test_manifest_not_matching_its_digest(tmp_path):
    out = tmp_path / "oci"
    write_image(out, [BASE], config_for(), format="oci-dir")
    digest = json.loads((out / "index.json").read_text())["manifests"][0]["digest"].split(":")[1]
    (out / "blobs" / "sha256" / digest).write_text("{}")
    with pytest.raises(DigestMismatch, match=f"manifest blob blobs/sha256/{digest}"):
        open_image(out)


def test_missing_layer_blob(tmp_path):
    out = tmp_path / "oci"
    write_image(out, [BASE, TOP], config_for(), format="oci-dir")
    (out / "blobs" / "sha256" / sha256(TOP).split(":")[1]).unlink()
    with pytest.raises(ImageError, match=f"missing blob blobs/sha256/{sha256(TOP).split(':')[1]}"):
        open_image(out)


def test_layer_size_not_as_described(tmp_path):
    out = tmp_path / "oci"
    write_image(out, [BASE], config_for(), format="oci-dir")
    edit_oci_dir(out, manifest=lambda manifest: manifest["layers"][0].update(size=5))
    with pytest.raises(DigestMismatch, match="is 10240 bytes, its descriptor says 5"):
        open_image(out)


def test_diff_ids_not_one_per_layer(tmp_path):
    out = tmp_path / "oci"
    write_image(out, [BASE, TOP], config_for(), format="oci-dir")
    edit_oci_dir(out, config=lambda config: config["rootfs"]["diff_ids"].pop())
    with pytest.raises(ImageError, match="lists 1 diff_ids for 2 layers"):
        open_image(out)


def test_unsupported_layer_media_type(tmp_path):
    out = tmp_path / "oci"
    write_image(out, [BASE], config_for(), format="oci-dir")
    edit_oci_dir(out, manifest=lambda manifest: manifest["layers"][0].update(mediaType="application/x-helm"))
    with pytest.raises(ImageError, match="layer 1 has unsupported media type 'application/x-helm'"):
        open_image(out)


def test_manifest_json_pointing_outside(tmp_path):
    archive = tmp_path / "escape.tar"
    manifest = [{"Config": "../../etc/passwd", "RepoTags": None, "Layers": []}]
    make_tar(archive, [("manifest.json", json.dumps(manifest).encode())])
    with pytest.raises(ImageError, match="'../../etc/passwd' points outside the image"):
        open_image(archive)


def test_archive_cut_inside_a_layer(tmp_path):
    archive = tmp_path / "image.tar"
    big = layer_tar([File("blob", bytes(range(256)) * 4096)])
    make_tar(archive, classic_members(["a/layer.tar"], [sha256(big)], [("a/layer.tar", big)]))
    cut = archive.read_bytes().index(big[:512]) + len(big) // 2
    image = open_image(archive)
    with open(archive, "r+b") as file:
        file.truncate(cut)
    with pytest.raises(ImageError, match="a/layer.tar: the archive ends inside this member"):
        read_all(image)
    with pytest.raises(ImageError, match="damaged tar archive: unexpected end of data"):
        open_image(archive)


@pytest.mark.parametrize("compress", [gzip.compress, zstandard.ZstdCompressor().compress], ids=["gzip", "zstd"])
def test_truncated_layer_fails_when_read(tmp_path, compress):
    blob = compress(BASE + bytes(range(256)) * 400)
    (tmp_path / "layer").write_bytes(blob[:len(blob) * 2 // 3])
    image = open_layer_tars([tmp_path / "layer"])
    with pytest.raises(ImageError, match="truncated (gzip|zstd) stream"):
        read_all(image)


# ---- not images ---------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(ImageError, match=f"{tmp_path / 'nothing'}: no such file or directory"):
        open_image(tmp_path / "nothing")


def test_plain_layer_tar_is_not_an_image(tmp_path):
    (tmp_path / "layer.tar").write_bytes(BASE)
    with pytest.raises(ImageError, match=f"{tmp_path / 'layer.tar'}: not an image: a tar archive"):
        open_image(tmp_path / "layer.tar")


def test_empty_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match=f"{tmp_path}: not an image: a directory"):
        open_image(tmp_path)


@pytest.mark.parametrize("content", [b"just some text\n" * 100, gzip.compress(b"text, not a tar" * 100), b""],
                         ids=["text", "gzipped-text", "empty"])
def test_file_that_is_not_a_tar(tmp_path, content):
    (tmp_path / "file").write_bytes(content)
    with pytest.raises(ImageError, match=f"{tmp_path / 'file'}: not a container image"):
        open_image(tmp_path / "file")


# ---- plain layer tars ----------------------------------------------------------

def test_layer_tars(tmp_path):
    (tmp_path / "base.tar").write_bytes(BASE)
    (tmp_path / "top.tar.gz").write_bytes(gzip.compress(TOP))
    image = open_layer_tars([tmp_path / "base.tar", str(tmp_path / "top.tar.gz")])
    assert image.format == "layer-tars"
    assert [(layer.digest, layer.diff_id) for layer in image.layers] == [(None, None)] * 2
    assert [entry["created_by"] for entry in image.history()] == ["layermount unpack base.tar",
                                                                   "layermount unpack top.tar.gz"]
    assert image.config["rootfs"] == {"type": "layers", "diff_ids": []}
    assert image.platform == str(Platform.host())
    assert read_all(image) == [BASE, TOP]


def test_missing_layer_tar(tmp_path):
    with pytest.raises(ImageError, match=f"{tmp_path / 'gone.tar'}: cannot open layer tar"):
        open_layer_tars([tmp_path / "gone.tar"])


# ---- compression ----------------------------------------------------------------

class Trickle(io.RawIOBase):
    """A non-seekable stream that hands out at most ``step`` bytes per read, like a pipe."""

    def __init__(self, data: bytes, step: int):
        self._data, self._position, self._step = data, 0, step

    def readable(self):
        return True

    def read(self, size=-1):
        size = self._step if size is None or size < 0 else min(size, self._step)
        chunk = self._data[self._position:self._position + size]
        self._position += len(chunk)
        return chunk


def test_detect_compression():
    assert detect_compression(gzip.compress(b"x")[:4]) == "gzip"
    assert detect_compression(zstandard.ZstdCompressor().compress(b"x")[:4]) == "zstd"
    assert detect_compression(BASE[:4]) == "none"
    assert detect_compression(b"") == "none"


COMPRESSORS = {
    "none": lambda data: data,
    "gzip": lambda data: gzip.compress(data, mtime=0),
    "gzip-members-padded": lambda data: gzip.compress(data[:len(data) // 2]) + gzip.compress(data[len(data) // 2:])
    + b"\0" * 700,
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
    "zstd-frames-skippable": lambda data: zstandard.ZstdCompressor(write_checksum=True).compress(data[:100])
    + (0x184D2A51).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    + zstandard.ZstdCompressor(write_content_size=False).compress(data[100:]),
}


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=3000).map(lambda piece: piece * 40)
       .filter(lambda data: detect_compression(data) == "none"),
       kind=st.sampled_from(sorted(COMPRESSORS)), step=st.integers(1, 5000), read_size=st.integers(1, 70000))
def test_decompression_round_trip(data, kind, step, read_size):
    stream = open_decompressed(Trickle(COMPRESSORS[kind](data), step))
    parts = []
    while chunk := stream.read(read_size):
        assert len(chunk) <= read_size
        parts.append(chunk)
    assert b"".join(parts) == data


@pytest.mark.parametrize("damage, message", [
    (lambda blob: blob[:-1], "truncated gzip stream"),
    (lambda blob: blob[:10], "truncated gzip stream"),
    (lambda blob: blob[:-8] + bytes(8), "corrupt gzip stream"),
    (lambda blob: blob + b"trailing junk", "corrupt gzip stream"),
])
def test_damaged_gzip(damage, message):
    blob = gzip.compress(BASE * 20)
    with pytest.raises(ImageError, match=message):
        open_decompressed(io.BytesIO(damage(blob))).read()


@pytest.mark.parametrize("damage, message", [
    (lambda blob: blob[:-1], "truncated zstd stream"),
    (lambda blob: blob[:6], "truncated zstd stream"),
    (lambda blob: blob[:-4] + bytes(b ^ 0xFF for b in blob[-4:]), "corrupt zstd stream"),
    (lambda blob: blob + b"trailing junk", "corrupt zstd stream"),
])
def test_damaged_zstd(damage, message):
    blob = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(range(256)) * 2000)
    with pytest.raises(ImageError, match=message):
        open_decompressed(io.BytesIO(damage(blob))).read()

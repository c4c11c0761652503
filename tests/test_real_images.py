"""Real images as a second source: a Debian rootfs made by debootstrap, layered with real tools.

Built once per session (``debian`` fixture, under pytest's tmp):

- layer 1: ``tar`` of ``debootstrap --variant=minbase bookworm`` (apt's .debs cleaned out, as images do);
- layer 2: a change set made on a copy of the rootfs (/usr/share/doc deleted, /etc/os-release turned
  from a symlink into a modified file, /etc/skel replaced, a new file and a hardlink pair, a chmod),
  found by comparing the two trees and tarred by GNU tar together with the OCI whiteout markers
  (``.wh.doc``, ``etc/skel/.wh..wh..opq``);
- layer 3: made by ``umoci unpack`` + changes + ``umoci repack`` (umoci computes its own change set
  and whiteouts).

The same three layers then exist as: umoci's OCI layout directory, our writer's docker archive
(uncompressed) and OCI archive (gzip), and ``skopeo copy``'s docker archive converted from ours.
Every test is ``slow``; mounts go through the real CLI and are always unmounted (``mounts``).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Mounts, run_layermount
from oracle import diff_snapshots, kernel_overlay, snapshot
from unionfs.image.writer import new_config, write_image
from unionfs.store import LayerStore

pytestmark = pytest.mark.slow

SUITE = "bookworm"
TAG = "layermount-test/debian:12"
UMOCI_TAG = "debian"
TOOLS = ("debootstrap", "umoci", "skopeo", "tar", "chroot")
PRETTY = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm) + layermount test"'
STEPS = [
    f"debootstrap --variant=minbase {SUITE}",
    "change set: rm -rf /usr/share/doc; /etc/os-release becomes a file; new /etc/skel; add files",
    "umoci repack: rm -rf /usr/share/info; rm /etc/motd; add /opt/umoci",
]


def sh(*args, **kwargs) -> subprocess.CompletedProcess:
    """Run a command; on failure, fail the test with its output."""
    result = subprocess.run([str(arg) for arg in args], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def debian_mirror() -> str:
    """The Debian mirror apt uses for SUITE (deb822 .sources or one-line .list), else deb.debian.org."""
    paths = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        if path.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.lstrip().startswith("#") and not line.startswith(" "):
                        key, _, value = line.partition(":")
                        fields[key.strip().lower()] = value.split()
                if "deb" in fields.get("types", []) and SUITE in fields.get("suites", []) and fields.get("uris"):
                    return fields["uris"][0]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1]
    return "http://deb.debian.org/debian"


# ---- building the layers ------------------------------------------------------

def _signature(path: str):
    info = os.lstat(path)
    kind = stat.S_IFMT(info.st_mode)
    target = os.readlink(path) if stat.S_ISLNK(info.st_mode) else None
    size_and_time = (info.st_size, info.st_mtime_ns) if not stat.S_ISDIR(info.st_mode) else ()
    xattrs = sorted((name, os.getxattr(path, name, follow_symlinks=False))
                    for name in os.listxattr(path, follow_symlinks=False))
    return kind, info.st_mode, info.st_uid, info.st_gid, info.st_rdev, target, size_and_time, xattrs


def change_set(old: Path, new: Path, markers: Path, opaque: set[str]) -> tuple[list[str], list[str]]:
    """What turns ``old`` into ``new``: (paths under new to archive, marker paths under ``markers``).

    An entry is archived when it is new or differs in type, mode, owner, size, mtime, target or
    xattrs, together with its parent directories; an entry of ``old`` missing from ``new`` gets an
    empty ``.wh.NAME`` marker; a directory named in ``opaque`` gets ``.wh..wh..opq`` and its whole
    content. Marker files are created under ``markers``; paths are relative, parents first.
    """
    changed: set[str] = set()
    for directory, dirnames, filenames in os.walk(new):
        dirnames.sort()
        rel_dir = os.path.relpath(directory, new)
        for name in dirnames + filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            in_opaque = any(rel == top or rel.startswith(top + "/") for top in opaque)
            old_path = old / rel
            if in_opaque or not os.path.lexists(old_path) or _signature(new / rel) != _signature(old_path):
                changed.add(rel)
    whiteouts = []
    for directory, dirnames, filenames in os.walk(old):
        rel_dir = os.path.relpath(directory, old)
        if any(rel_dir == top or rel_dir.startswith(top + "/") for top in opaque):
            dirnames[:] = []
            continue
        for name in sorted(dirnames + filenames):
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if not os.path.lexists(new / rel):
                whiteouts.append(rel)
        dirnames[:] = [name for name in dirnames if os.path.lexists(new / rel_dir / name)]
    marker_paths = []
    for rel in whiteouts:
        head, tail = os.path.split(rel)
        marker_paths.append(os.path.join(head, ".wh." + tail))
        changed.add(head) if head else None
    for rel in sorted(opaque):
        marker_paths.append(os.path.join(rel, ".wh..wh..opq"))
    for marker in marker_paths:
        (markers / marker).parent.mkdir(parents=True, exist_ok=True)
        (markers / marker).touch()
    for rel in list(changed):
        parent = os.path.dirname(rel)
        while parent:
            changed.add(parent)
            parent = os.path.dirname(parent)
    return sorted(changed, key=lambda rel: rel.split("/")), sorted(marker_paths)


def tar_change_set(out: Path, new: Path, changed: list[str], markers: Path, marker_paths: list[str]) -> None:
    """GNU tar of the change set: entries of ``new`` first, then the whiteout markers."""
    (out.parent / "changed.list").write_text("".join(rel + "\0" for rel in changed))
    (out.parent / "markers.list").write_text("".join(rel + "\0" for rel in marker_paths))
    sh("tar", "--create", "--file", out, "--format=pax", "--numeric-owner", "--xattrs", "--xattrs-include=*",
       "--no-recursion", "--null", "-C", new, "-T", out.parent / "changed.list",
       "-C", markers, "-T", out.parent / "markers.list")


def change_rootfs_for_layer2(root: Path) -> None:
    shutil.rmtree(root / "usr/share/doc")
    os_release = (root / "usr/lib/os-release").read_text()
    os_release = re.sub(r"^PRETTY_NAME=.*$", PRETTY, os_release, flags=re.M) + "VARIANT_ID=layermount\n"
    (root / "etc/os-release").unlink()                     # was a symlink to ../usr/lib/os-release
    (root / "etc/os-release").write_text(os_release)
    shutil.rmtree(root / "etc/skel")
    (root / "etc/skel").mkdir(mode=0o755)
    (root / "etc/skel/.profile").write_text("# skel from the layermount test image\n")
    release = root / "etc/layermount-release"
    release.write_text("layer 2\n")
    os.chown(release, 0, 42)
    os.chmod(release, 0o640)
    (root / "opt/layermount").mkdir()
    (root / "opt/layermount/hardlink-a").write_text("one inode, two names\n")
    os.link(root / "opt/layermount/hardlink-a", root / "opt/layermount/hardlink-b")
    os.chmod(root / "etc/debian_version", 0o600)


def change_rootfs_for_layer3(root: Path) -> None:
    shutil.rmtree(root / "usr/share/info")
    (root / "etc/motd").unlink()
    (root / "opt/umoci").mkdir()
    added = root / "opt/umoci/added.txt"
    added.write_text("added through umoci repack\n")
    os.chown(added, 1000, 1000)
    os.chmod(added, 0o600)
    os.setxattr(added, "user.layermount", b"umoci")
    os.symlink("/etc/os-release", root / "opt/umoci/os-release-link")
    os.mkfifo(root / "opt/umoci/fifo")
    with open(root / "etc/layermount-release", "a") as release:
        release.write("layer 3\n")


def oci_layers(layout: Path, tag: str) -> list[Path]:
    """The layer blobs of ``tag`` in an OCI layout directory, bottom first."""
    index = json.loads((layout / "index.json").read_text())
    descriptor = next(entry for entry in index["manifests"]
                      if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    blob = lambda digest: layout / "blobs" / digest.replace(":", "/")   # noqa: E731
    manifest = json.loads(blob(descriptor["digest"]).read_text())
    return [blob(layer["digest"]) for layer in manifest["layers"]]


@dataclass
class DebianImages:
    cache: Path
    rootfs: Path                    # debootstrap's tree (layer 1)
    layers: list[Path]              # uncompressed layer tars, bottom first
    images: dict[str, Path]         # form -> image
    umoci_layout: Path
    build_seconds: float


@pytest.fixture(scope="session")
def debian(tmp_path_factory) -> DebianImages:
    if os.geteuid() != 0:
        pytest.skip("debootstrap, chroot and kernel overlayfs need root")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run scripts/setup (it installs the Debian packages)")
    started = time.monotonic()
    cache = tmp_path_factory.mktemp("debian-cache")
    rootfs = cache / "rootfs"
    sh("debootstrap", "--variant=minbase", SUITE, rootfs, debian_mirror(), timeout=900)
    for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        if deb.name.startswith("hostname_"):
            shutil.copy(deb, cache / "hostname.deb")        # a package for dpkg -i in the chroot workload
        deb.unlink()
    layer1 = cache / "layer1.tar"
    sh("tar", "--create", "--file", layer1, "--format=pax", "--numeric-owner", "--xattrs", "--xattrs-include=*",
       "--sort=name", "-C", rootfs, ".")

    changed_root = cache / "rootfs2"
    sh("cp", "-a", rootfs, changed_root)
    change_rootfs_for_layer2(changed_root)
    markers = cache / "markers"
    changed, marker_paths = change_set(rootfs, changed_root, markers, opaque={"etc/skel"})
    assert "usr/share/.wh.doc" in marker_paths and "etc/os-release" in changed
    layer2 = cache / "layer2.tar"
    tar_change_set(layer2, changed_root, changed, markers, marker_paths)
    shutil.rmtree(changed_root)
    shutil.rmtree(markers)

    # umoci: unpack the two-layer image, change it, repack: umoci writes layer 3 itself.
    layout = cache / "umoci-oci"
    write_image(layout, [layer1, layer2], new_config(STEPS[:2]), format="oci-dir", repo_tag="base")
    bundle = cache / "umoci-bundle"
    sh("umoci", "unpack", "--image", f"{layout}:base", bundle)
    change_rootfs_for_layer3(bundle / "rootfs")
    sh("umoci", "repack", "--image", f"{layout}:{UMOCI_TAG}", "--history.created_by", STEPS[2], bundle)
    sh("umoci", "rm", "--image", f"{layout}:base")
    sh("umoci", "gc", "--layout", layout)
    shutil.rmtree(bundle)
    blobs = oci_layers(layout, UMOCI_TAG)
    assert len(blobs) == 3
    layer3 = cache / "layer3.tar"
    with gzip.open(blobs[2]) as packed, open(layer3, "wb") as plain:
        shutil.copyfileobj(packed, plain, 1 << 20)
    layers = [layer1, layer2, layer3]

    config = new_config(STEPS)
    config["config"] = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                        "Cmd": ["bash"]}
    images = {"umoci-oci-dir": layout,
              "docker": cache / "debian-docker.tar",
              "oci-gzip": cache / "debian-oci.tar"}
    write_image(images["docker"], layers, config, format="docker", repo_tag=TAG, compression="none")
    write_image(images["oci-gzip"], layers, config, format="oci", repo_tag=TAG, compression="gzip")
    images["skopeo-docker"] = cache / "debian-skopeo.tar"
    sh("skopeo", "copy", "--quiet", f"oci-archive:{images['oci-gzip']}", f"docker-archive:{images['skopeo-docker']}:{TAG}")
    return DebianImages(cache, rootfs, layers, images, layout, time.monotonic() - started)


@pytest.fixture(scope="session")
def debian_store(debian) -> Path:
    """A store with the Debian image unpacked (shared by the mount tests)."""
    store = debian.cache / "store"
    result = run_layermount("unpack", debian.images["docker"], "--store", store, timeout=600)
    assert result.returncode == 0, result.stderr
    return store


@pytest.fixture(scope="session")
def umoci_rootfs(debian) -> Path:
    """``umoci unpack`` of umoci's own OCI image: the reference root."""
    bundle = debian.cache / "umoci-reference"
    sh("umoci", "unpack", "--image", f"{debian.umoci_layout}:{UMOCI_TAG}", bundle)
    return bundle / "rootfs"


@pytest.fixture
def shared_mounts(mounts, debian_store) -> Mounts:
    mounts.store = debian_store
    return mounts


def store_layer_dirs(store_dir: Path, image: Path) -> list[str]:
    """The store's layer dirs of an image, top first."""
    store = LayerStore(store_dir)
    record = next(r for r in store.images() if r["source"] == os.path.abspath(image))
    return [str(store.layer(diff_id).path) for diff_id in reversed(record["layers"])]


def chroot(root: Path, script: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C"}
    result = subprocess.run(["chroot", str(root), "/bin/sh", "-c", script], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, f"chroot {root} /bin/sh -c {script!r}: {result.returncode}\n{result.stderr}"
    return result


# ---- tests --------------------------------------------------------------------

def test_images_were_built_by_the_real_tools(debian):
    """The inputs are what the other tests assume: three layers, same diff_ids in every form."""
    inspected = {}
    for form, image in debian.images.items():
        result = run_layermount("inspect", image, "--json", *(["--image", UMOCI_TAG] if "umoci" in form else []))
        assert result.returncode == 0, f"{form}: {result.stderr}"
        inspected[form] = json.loads(result.stdout)[0]["RootFS"]["Layers"]
    assert len({tuple(ids) for ids in inspected.values()}) == 1, inspected
    assert len(inspected["docker"]) == 3
    skopeo = json.loads(sh("skopeo", "inspect", f"docker-archive:{debian.images['skopeo-docker']}").stdout)
    assert skopeo["Layers"] and len(skopeo["Layers"]) == 3
    names = subprocess.run(["tar", "-tf", debian.layers[2]], capture_output=True, text=True, check=True).stdout
    assert "usr/share/.wh.info" in names and "etc/.wh.motd" in names     # umoci's own whiteouts
    print(f"built the Debian image in {debian.build_seconds:.0f}s")


# Every source form, unpacked by layermount into its own store, mounted read-only, against umoci unpack.
@pytest.mark.parametrize("form", ["docker", "oci-gzip", "umoci-oci-dir", "skopeo-docker"])
def test_unpack_matches_umoci_unpack(debian, umoci_rootfs, mounts, store_dir, form):
    image = debian.images[form]
    extra = ["--image", UMOCI_TAG] if form == "umoci-oci-dir" else []
    result = run_layermount("unpack", image, "--store", store_dir, *extra, timeout=600)
    assert result.returncode == 0, result.stderr
    point = mounts.mount(image, "--read-only", "-q", *extra)
    # No field needs excluding: layer 1 has a "./" member, which both apply to the root directory
    # (and without one, umoci 0.4.7 makes its rootfs root 0755 root:root, which layermount shows too).
    differences = diff_snapshots(snapshot(point, mtimes=True), snapshot(umoci_rootfs, mtimes=True),
                                 ("layermount", "umoci"))
    assert not differences, "\n".join(differences[:60])
    assert (point / "etc/os-release").read_text().count(PRETTY) == 1
    assert not (point / "usr/share/doc").exists() and not (point / "etc/motd").exists()


def test_mount_matches_kernel_overlayfs(debian, shared_mounts, tmp_path):
    image = debian.images["docker"]
    point = shared_mounts.mount(image, "--read-only", "-q")
    lowers = store_layer_dirs(shared_mounts.store, image)
    assert len(lowers) == 3
    with kernel_overlay(lowers, tmp_path / "kernel") as kernel_root:
        differences = diff_snapshots(snapshot(point, mtimes=True), snapshot(kernel_root, mtimes=True),
                                     ("layermount", "kernel"))
    assert not differences, "\n".join(differences[:60])


def test_chroot_through_a_read_only_mount(debian, shared_mounts):
    point = shared_mounts.mount(debian.images["docker"], "--read-only", "-q")
    out = chroot(point, "ls /; cat /etc/os-release").stdout
    assert {"bin", "etc", "usr", "var"} <= set(out.split()) and PRETTY in out
    failed = subprocess.run(["chroot", str(point), "/bin/sh", "-c", "echo hi > /tmp/x"], capture_output=True,
                            text=True, timeout=60)
    assert failed.returncode != 0 and "Read-only file system" in failed.stderr


def test_chroot_writes_then_commit(debian, shared_mounts, tmp_path):
    image = debian.images["docker"]
    upper = tmp_path / "upper"
    point = shared_mounts.mount(image, "--upper", upper, "-q")
    out = chroot(point, "ls /; cat /etc/os-release").stdout
    assert "usr" in out.split() and PRETTY in out
    out = chroot(point, "echo hi > /tmp/x && rm -rf /usr/share/man && dpkg --version").stdout
    assert "Debian 'dpkg' package management program" in out
    assert (point / "tmp/x").read_text() == "hi\n" and not (point / "usr/share/man").exists()
    written = snapshot(point, mtimes=False)
    shared_mounts.umount(point)
    changes = run_layermount("diff", upper).stdout.splitlines()
    assert "A /tmp/x" in changes and "D /usr/share/man" in changes, changes

    new = tmp_path / "committed.tar"
    result = run_layermount("commit", image, upper, "-o", new, timeout=600)
    assert result.returncode == 0, result.stderr
    skopeo = json.loads(sh("skopeo", "inspect", f"docker-archive:{new}").stdout)
    assert len(skopeo["Layers"]) == 4
    committed = shared_mounts.mount(new, "--read-only", "-q", mountpoint=shared_mounts.mountpoint("committed"))
    differences = diff_snapshots(written, snapshot(committed, mtimes=False), ("writable mount", "committed"))
    assert not differences, "\n".join(differences[:60])
    assert (committed / "tmp/x").read_text() == "hi\n"
    assert "dpkg" in chroot(committed, "dpkg --version").stdout


WORKLOAD = """
set -e
dpkg -i /tmp/hostname.deb >/dev/null
dpkg --purge --force-depends e2fsprogs >/dev/null 2>&1
useradd -m bob
sed -i 's/^bob:/bob2:/' /etc/passwd
ldconfig
mv /usr/share/locale /usr/share/locale-moved
cp -a /usr/share/zoneinfo/Europe /opt/europe
ln /usr/bin/dpkg /usr/bin/dpkg-hardlink
echo appended >> /usr/bin/dpkg-hardlink
chmod 4711 /usr/bin/dpkg-query
chown 1000:1000 /etc/hostname
rm -rf /var/lib/apt/lists/*Packages*
mkdir -p /srv/a/b/c && echo deep > /srv/a/b/c/file && mv /srv/a /srv/z
rm -rf /etc/skel && mkdir /etc/skel && echo new > /etc/skel/new
ln -sf /nowhere /etc/dangling
mkfifo /run/fifo
truncate -s 1M /var/tmp/sparse
rm /tmp/hostname.deb
"""


def test_chroot_workload_leaves_what_kernel_overlayfs_leaves(debian, shared_mounts, tmp_path):
    """dpkg -i/--purge, useradd, sed -i, ldconfig, renames of lower dirs, hardlinks, chmod/chown: same tree."""
    image = debian.images["docker"]
    upper = tmp_path / "kernel-upper"
    upper.mkdir()
    with kernel_overlay(store_layer_dirs(shared_mounts.store, image), tmp_path / "kernel", upper=upper) as kernel:
        shutil.copy(debian.cache / "hostname.deb", kernel / "tmp/hostname.deb")
        chroot(kernel, WORKLOAD)
        expected = snapshot(kernel, mtimes=False)
    point = shared_mounts.mount(image, "--dev", "-q")       # the kernel's overlay allows devices (/dev/null)
    shutil.copy(debian.cache / "hostname.deb", point / "tmp/hostname.deb")
    chroot(point, WORKLOAD)
    seen = snapshot(point, mtimes=False)
    # Contents that differ by nature: dpkg's log has times, ldconfig's aux-cache records st_dev/st_ino.
    for rel in ("var/log/dpkg.log", "var/cache/ldconfig/aux-cache"):
        for picture in (expected, seen):
            picture[rel].pop("sha256"), picture[rel].pop("size")
    differences = diff_snapshots(seen, expected, ("layermount", "kernel"))
    assert not differences, "\n".join(differences[:60])


def test_apt_reads_back_an_open_unlinked_temp_file(debian, shared_mounts, tmp_path):
    """apt-get (open O_EXCL in /tmp, unlink, write, rewind, read back) works, as on kernel overlayfs."""
    image = debian.images["docker"]
    upper = tmp_path / "kernel-upper"
    upper.mkdir()
    with kernel_overlay(store_layer_dirs(shared_mounts.store, image), tmp_path / "kernel", upper=upper) as kernel:
        assert "Reading package lists" in chroot(kernel, "apt-get check").stdout
    point = shared_mounts.mount(image, "-q")
    path = point / "tmp/unlinked"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.unlink(path)
        os.write(fd, b"x" * 10000)
        os.lseek(fd, 0, os.SEEK_SET)
        assert (os.fstat(fd).st_size, len(os.read(fd, 20000))) == (10000, 10000)
    finally:
        os.close(fd)
    chroot(point, "apt-get check")


def test_second_image_reuses_the_base_layer(debian, debian_store, tmp_path):
    small = tmp_path / "app"
    (small / "opt/app").mkdir(parents=True)
    (small / "opt/app/hello").write_text("hello from the second image\n")
    app_layer = tmp_path / "app.tar"
    sh("tar", "--create", "--file", app_layer, "--numeric-owner", "-C", small, "opt")
    second = tmp_path / "second.tar"
    write_image(second, [debian.layers[0], app_layer], new_config([STEPS[0], "add /opt/app"]), format="docker",
                repo_tag="layermount-test/app:1", compression="gzip")
    before = set(os.listdir(debian_store / "layers"))
    result = run_layermount("unpack", second, "--store", debian_store, timeout=600)
    assert result.returncode == 0, result.stderr
    after = set(os.listdir(debian_store / "layers"))
    base = json.loads(run_layermount("inspect", second, "--json").stdout)[0]["RootFS"]["Layers"][0]
    short = base.split(":", 1)[1][:12]
    assert re.search(rf"^{short}: Already exists$", result.stdout, re.M), result.stdout
    assert len(re.findall(r"Already exists", result.stdout)) == 1, result.stdout
    assert len(after - before) == 1 and base.split(":", 1)[1] in before


def test_unpack_time_against_tar(debian, tmp_path, capsys):
    image = debian.images["docker"]           # uncompressed: both sides read the same tar bytes
    started = time.monotonic()
    result = run_layermount("unpack", image, "--store", tmp_path / "store", "-q", timeout=600)
    ours = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    started = time.monotonic()
    for index, layer in enumerate(debian.layers):
        target = tmp_path / f"tar-{index}"
        target.mkdir()
        sh("tar", "--extract", "--file", layer, "--numeric-owner", "--same-permissions", "--xattrs",
           "--xattrs-include=*", "-C", target)
    theirs = time.monotonic() - started
    size = sum(layer.stat().st_size for layer in debian.layers)
    with capsys.disabled():
        print(f"\nunpack of the Debian image ({len(debian.layers)} layers, {size / 1e6:.0f} MB of tar): "
              f"layermount unpack {ours:.1f}s, tar -xf of the same layer tars {theirs:.1f}s "
              f"({ours / theirs:.1f}x)")


def test_layermount_run_on_the_debian_image(debian, debian_store, tmp_path):
    """The toy runtime on a real distribution: shell, os-release, a write that lands in the upper."""
    upper = tmp_path / "upper"
    result = run_layermount("run", "--store", debian_store, "-q", "--upper", upper, debian.images["docker"],
                            "/bin/sh", "-c", "echo hi > /tmp/x; cat /etc/os-release; echo pid $$; exit 5",
                            timeout=300)
    assert result.returncode == 5, result.stderr
    assert "Debian GNU/Linux" in result.stdout and "pid 1" in result.stdout
    assert (upper / "diff/tmp/x").read_text() == "hi\n"


def test_layermount_run_does_not_hand_out_the_host_on_the_debian_image(debian, debian_store, tmp_path):
    """Issue 9's checks on a real distribution: no CAP_SYS_ADMIN, core_pattern read-only, and the host's
    files reached neither by `..` nor by perl's chroot escape (chroot x, chdir .. past it, chroot .)."""
    sentinel = tmp_path / "host-secret"
    sentinel.write_text("host-secret-debian")
    escape = (f'mkdir "x"; chroot "x" or die "chroot: $!"; chdir ".." for 1..64; chroot "."; '
              f'open(my $f, "<", "{sentinel}") and print "ESCAPED ", <$f>; print "tried\\n"')
    script = ("grep ^CapEff /proc/self/status; cat /proc/sys/kernel/core_pattern > /tmp/core; "
              "cat /tmp/core > /proc/sys/kernel/core_pattern && echo core_pattern WRITTEN; "
              f"cd /../../..; cat .{sentinel}; perl -e '{escape}'")
    result = run_layermount("run", "--store", debian_store, "-q", debian.images["docker"], "/bin/sh", "-c", script,
                            timeout=300)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("CapEff:") and not int(lines[0].split()[1], 16) & (1 << 21), result.stderr
    assert "WRITTEN" not in result.stdout and "ESCAPED" not in result.stdout and lines[-1] == "tried"
    assert "host-secret-debian" not in result.stdout and sentinel.read_text() == "host-secret-debian"

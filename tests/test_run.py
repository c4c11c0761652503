"""layermount run: a toy runtime on the mount, tested with a busybox image built here."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import run_layermount
from unionfs.image.writer import Dir, File, Symlink, layer_tar, new_config, write_image
from unionfs.mount import FSTYPE, mount_entries

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
pytestmark = pytest.mark.skipif(not os.path.exists(BUSYBOX) or os.geteuid() != 0,
                                reason="needs root (namespaces) and a static busybox (Debian busybox-static)")


def build_busybox(path, user=""):
    applets = ("sh", "ls", "cat", "echo", "hostname", "id", "ps", "touch", "pwd")
    layer = [Dir("bin"), File("bin/busybox", open(BUSYBOX, "rb").read(), mode=0o755)]
    layer += [Symlink(f"bin/{name}", "busybox") for name in applets]
    layer += [Dir("etc"), File("etc/os-release", b"NAME=busybox-test\n"),
              File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n"),
              File("etc/group", b"root:x:0:\nnogroup:x:65534:\n"), Dir("tmp", mode=0o1777), Dir("data")]
    config = new_config(["ADD busybox"])
    config["config"] = {"Cmd": ["/bin/sh", "-c", "echo default; exit 7"], "Env": ["PATH=/bin", "GREETING=hi"],
                        "WorkingDir": "/tmp", "Volumes": {"/data": {}}, "User": user}
    write_image(path, [layer_tar(layer)], config, repo_tag="busybox:test")
    return path


@pytest.fixture
def busybox_image(tmp_path):
    return build_busybox(tmp_path / "busybox.tar")


def no_run_mounts_left():
    return not [point for point, kind in mount_entries() if kind == FSTYPE and "layermount-run-" in point]


def test_default_command_and_exit_code(busybox_image, store_dir):
    result = run_layermount("run", "--store", store_dir, "-q", busybox_image)
    assert result.stdout == "default\n" and result.returncode == 7
    assert no_run_mounts_left()


def test_command_sees_its_namespaces_env_and_workdir_and_writes_land_in_the_upper(busybox_image, store_dir,
                                                                                    tmp_path):
    script = "echo hi > /tmp/x; cat /etc/os-release; echo $GREETING; pwd; hostname; id -u; echo $$; " \
             "touch /data/volume-file; ls /dev"
    result = run_layermount("run", "--store", store_dir, "-q", "--upper", tmp_path / "upper", busybox_image,
                            "/bin/sh", "-c", script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:6] == ["NAME=busybox-test", "hi", "/tmp", "layermount", "0", "1"]
    assert {"null", "zero", "random", "urandom", "tty"} <= set(lines[6:])
    assert (tmp_path / "upper/diff/tmp/x").read_text() == "hi\n"
    assert not (tmp_path / "upper/diff/data/volume-file").exists()
    assert "volume /data" in result.stderr
    assert no_run_mounts_left()


def test_user_from_the_image_and_permissions_on_served_owners(tmp_path, store_dir):
    image = build_busybox(tmp_path / "nobody.tar", user="nobody")
    result = run_layermount("run", "--store", store_dir, "-q", image, "/bin/sh", "-c",
                            "id -u; touch /etc/nope 2>/dev/null || echo denied; touch /tmp/ok && echo allowed")
    assert result.stdout.splitlines() == ["65534", "denied", "allowed"], result.stderr


def test_missing_binary_is_a_clear_error(busybox_image, store_dir):
    result = run_layermount("run", "--store", store_dir, "-q", busybox_image, "/bin/nonexistent")
    assert result.returncode == 127 and "/bin/nonexistent: not found in the image" in result.stderr
    assert no_run_mounts_left()


def test_executables_run_from_the_mount(mounts, busybox_image):
    root = mounts.mount(busybox_image, "--read-only", "-q")
    out = subprocess.run(["chroot", str(root), "/bin/sh", "-c", "ls /; cat /etc/os-release"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "bin" in out.stdout and "NAME=busybox-test" in out.stdout

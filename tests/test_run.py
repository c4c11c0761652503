"""layermount run: a toy runtime on the mount, tested with a busybox image built here."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import LAYERMOUNT, run_layermount
from unionfs.image.writer import Dir, Fifo, File, Symlink, layer_tar, new_config, write_image
from unionfs.mount import FSTYPE, mount_entries

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
pytestmark = pytest.mark.skipif(not os.path.exists(BUSYBOX) or os.geteuid() != 0,
                                reason="needs root (namespaces) and a static busybox (Debian busybox-static)")


def build_busybox(path, user=""):
    applets = ("sh", "ls", "cat", "echo", "hostname", "id", "ps", "touch", "pwd", "nc")
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


@pytest.fixture(autouse=True)
def private_tmpdir(tmp_path, monkeypatch):
    """run makes its mountpoint and volumes under $TMPDIR: one per test, so leaks are this test's own."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    yield tmpdir
    assert not os.listdir(tmpdir), "run left its mountpoint or volumes behind"


def no_run_mounts_left():
    tmpdir = os.environ["TMPDIR"]
    return not [point for point, kind in mount_entries() if kind == FSTYPE and point.startswith(tmpdir)]


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


def test_dotdot_from_the_root_stays_in_the_image(tmp_path, store_dir):
    """`..` at the container's / is / (the old root is detached): host files are not there by their paths."""
    path = tmp_path / "host-secret"
    content = "host-secret-only"
    path.write_text(content)
    image = build_busybox(tmp_path / "img.tar")
    result = run_layermount("run", "--store", store_dir, "-q", image, "/bin/sh", "-c",
                            f"cd /../../..; ls; cat ../../..{path}; echo done")
    assert content not in result.stdout and result.stdout.splitlines()[-1] == "done"
    assert "os-release" not in result.stdout and "etc" in result.stdout.split()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_run_ends_the_command_and_unmounts(busybox_image, store_dir, signum):
    """The command has its own session (no terminal signals reach it): run must end it itself."""
    process = subprocess.Popen([*LAYERMOUNT, "run", "--store", str(store_dir), "-q", str(busybox_image),
                                "/bin/sh", "-c", "echo ready; exec sleep 4321"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "ready\n", process.stderr.read()
        process.send_signal(signum)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline(pid) == b"sleep\0004321\0"]
    assert no_run_mounts_left()


def test_a_killed_run_takes_the_command_with_it(busybox_image, store_dir):
    """SIGKILL leaves run no chance to clean up: the command must still not outlive it."""
    process = subprocess.Popen([*LAYERMOUNT, "run", "--store", str(store_dir), "-q", str(busybox_image),
                                "/bin/sh", "-c", "echo ready; exec sleep 4322"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "ready\n", process.stderr.read()
        process.kill()
        process.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _sleepers(b"sleep\0004322\0"):
            time.sleep(0.1)
        assert not _sleepers(b"sleep\0004322\0")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        # The mount's daemon is not run's child to kill: a killed run leaves its mount, as any killed mounter.
        tmpdir = os.environ["TMPDIR"]
        for point in [point for point, kind in mount_entries() if kind == FSTYPE and point.startswith(tmpdir)]:
            run_layermount("umount", point)
            os.rmdir(point)
            os.rmdir(os.path.dirname(point))
        for name in os.listdir(tmpdir):
            if name.startswith("layermount-volumes-"):
                shutil.rmtree(os.path.join(tmpdir, name))


def _sleepers(cmdline: bytes) -> list[str]:
    return [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline(pid) == cmdline]


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def test_workdir_and_volumes_resolve_inside_the_image(tmp_path, store_dir):
    """WorkingDir and Volumes follow the image's own symlinks as if chrooted, and are made if missing."""
    name = f"layermount-test-{os.getpid()}"
    layer = [Dir("bin"), File("bin/busybox", open(BUSYBOX, "rb").read(), mode=0o755), Symlink("bin/sh", "busybox"),
             Symlink("bin/pwd", "busybox"), Symlink("bin/ls", "busybox"), Dir("tmp", mode=0o1777),
             Symlink("work", "/tmp")]
    config = new_config(["ADD busybox"])
    config["config"] = {"Cmd": ["/bin/sh", "-c", "pwd; ls /tmp"], "WorkingDir": f"/work/../../work/{name}",
                        "Volumes": {f"/work/{name}-vol": {}}}
    image = tmp_path / "img.tar"
    write_image(image, [layer_tar(layer)], config)
    result = run_layermount("run", "--store", store_dir, "-q", image)
    assert result.stdout.splitlines() == [f"/tmp/{name}", name, f"{name}-vol"], result.stderr
    assert not os.path.lexists(f"/tmp/{name}") and not os.path.lexists(f"/tmp/{name}-vol")


@pytest.mark.parametrize("volume, fault", [("/dangling/v", "/dangling is a dangling symlink"),
                                           ("/etc/os-release/v", "/etc/os-release is not a directory")])
def test_a_volume_that_cannot_be_a_directory_is_a_one_line_error(tmp_path, store_dir, volume, fault):
    image = tmp_path / "img.tar"
    layer = [Dir("etc"), File("etc/os-release", b"x\n"), Symlink("dangling", "/nowhere")]
    config = new_config(["ADD"])
    config["config"] = {"Cmd": ["/bin/true"], "Volumes": {volume: {}}}
    write_image(image, [layer_tar(layer)], config)
    result = run_layermount("run", "--store", store_dir, "-q", image)
    assert result.returncode == 125 and result.stderr.splitlines()[-1] == f"layermount: run: {volume}: {fault}"
    assert not os.path.lexists("/nowhere")
    assert no_run_mounts_left()


@pytest.mark.parametrize("field, value", [("Volumes", ["/data"]), ("Cmd", "echo hi"), ("Env", [1]),
                                          ("WorkingDir", 5), ("User", ["root"])])
def test_a_config_field_of_the_wrong_type_is_a_one_line_error(tmp_path, store_dir, field, value):
    image = tmp_path / "img.tar"
    config = new_config(["ADD"])
    config["config"] = {"Cmd": ["/bin/true"], field: value}
    write_image(image, [layer_tar([Dir("etc")])], config)
    result = run_layermount("run", "--store", store_dir, "-q", image)
    assert result.returncode == 3 and len(result.stderr.splitlines()) == 1 and repr(field) in result.stderr
    assert no_run_mounts_left()


def test_network_host_shares_the_hosts_network(busybox_image, store_dir):
    """--network host: host loopback services are reachable (the default namespace has only lo)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(60)
        process = subprocess.Popen([*LAYERMOUNT, "run", "--network", "host", "--store", str(store_dir), "-q",
                                    str(busybox_image), "/bin/sh", "-c",
                                    f"echo probe | nc 127.0.0.1 {listener.getsockname()[1]}"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            client, _ = listener.accept()
            with client:
                assert client.recv(100) == b"probe\n"
        finally:
            process.communicate(timeout=60)
    assert process.returncode == 0 and no_run_mounts_left()


def _tiny_image(path, layer, **runtime):
    config = new_config(["ADD"])
    config["config"] = {"Cmd": ["/bin/sh", "-c", "id -u"], "Env": ["PATH=/bin"], **runtime}
    write_image(path, [layer_tar(layer)], config)
    return path


def _busybox_layer(*applets):
    return [Dir("bin"), File("bin/busybox", open(BUSYBOX, "rb").read(), mode=0o755),
            *[Symlink(f"bin/{name}", "busybox") for name in ("sh", *applets)]]


@pytest.mark.parametrize("name", ["proc", "sys", "dev"])
def test_an_image_whose_proc_sys_or_dev_is_a_symlink_is_refused(tmp_path, store_dir, name):
    """runc refuses these too: following /proc -> /dev would put the runtime's mounts and masks elsewhere."""
    image = _tiny_image(tmp_path / "img.tar", _busybox_layer() + [Dir("tmp"), Symlink(name, "/tmp")])
    result = run_layermount("run", "--store", store_dir, "-q", image)
    assert result.returncode == 125
    assert result.stderr.splitlines()[-1].endswith(f"the image's /{name} is not a directory (a symlink?): "
                                                   f"the runtime mounts its own there")
    assert no_run_mounts_left()


@pytest.mark.parametrize("volume", ["/", "/tmp/..", "/up"])
def test_a_volume_over_the_containers_root_is_refused(tmp_path, store_dir, volume):
    image = _tiny_image(tmp_path / "img.tar", _busybox_layer() + [Dir("tmp"), Symlink("up", "../..")],
                        Volumes={volume: {}})
    result = run_layermount("run", "--store", store_dir, "-q", image)
    assert result.returncode == 125 and result.stderr.splitlines()[-1].endswith("is the container's root")


def test_too_many_volumes_is_a_one_line_error(tmp_path, store_dir):
    image = _tiny_image(tmp_path / "img.tar", _busybox_layer(), Volumes={f"/v{i}": {} for i in range(1000)})
    result = run_layermount("run", "--store", store_dir, "-q", image)
    assert result.returncode == 3 and result.stderr.strip() == "layermount: image config: 1000 Volumes (more than 256)"


@pytest.mark.parametrize("passwd", [Fifo("etc/passwd"), Symlink("etc/passwd", "/dev/zero")])
def test_a_hostile_etc_passwd_neither_hangs_nor_fills_memory(tmp_path, store_dir, passwd):
    """Read as root before the drop: a FIFO would block for ever, /dev/zero would be read without end."""
    image = _tiny_image(tmp_path / "img.tar", _busybox_layer("id") + [Dir("etc"), passwd], User="app")
    result = run_layermount("run", "--store", store_dir, "-q", image, timeout=60)
    assert result.returncode == 1 and "user app is not in the image's /etc/passwd" in result.stderr
    numeric = _tiny_image(tmp_path / "numeric.tar", _busybox_layer("id") + [Dir("etc"), passwd], User="1234")
    uid_of_self = 'while read key value rest; do [ "$key" = Uid: ] && echo $value; done < /proc/self/status'
    result = run_layermount("run", "--store", store_dir, "-q", numeric, "/bin/sh", "-c", uid_of_self, timeout=60)
    assert result.stdout == "1234\n", result.stderr

"""``which`` and ``explain`` through a real mount and the CLI: they must read each layer as the mount does."""

from __future__ import annotations

import os
import stat

from conftest import run_layermount
from unionfs.image.writer import Device, Dir, File, Whiteout, layer_tar, new_config, write_image


def test_char_0_0_in_a_store_layer_is_a_device_to_which_and_explain(mounts, tmp_path):
    """A store layer holds OCI markers only, so a char 0/0 device in it is a device the mount
    serves; which/explain once read every layer in both forms and called it a whiteout."""
    layers = [[Dir("dev"), Device("dev/zero0", "char", 0, 0, mode=0o600), File("dev/keep", b"k")],
              [Dir("etc"), File("etc/hostname", b"box\n"), Whiteout("dev/keep")]]
    image = tmp_path / "image.tar"
    write_image(image, [layer_tar(spec) for spec in layers], new_config(["base", "top"]), repo_tag="zero:latest")
    point = mounts.mount(image, "-q", "--read-only")
    served = os.lstat(point / "dev/zero0")
    assert stat.S_ISCHR(served.st_mode) and served.st_rdev == 0
    assert os.listdir(point / "dev") == ["zero0"]

    which = run_layermount("which", point / "dev/zero0")
    assert which.returncode == 0, which.stdout + which.stderr
    assert "char device" in which.stdout and "wins" in which.stdout and "whiteout" not in which.stdout

    explain = run_layermount("explain", point / "dev/zero0")
    assert explain.returncode == 0, explain.stderr
    assert "has it (char device)" in explain.stdout
    assert "does not exist" not in explain.stdout

    # The OCI whiteout of the same stack is still told as one.
    gone = run_layermount("which", point / "dev/keep")
    assert gone.returncode == 1 and "whiteout dev/.wh.keep" in gone.stdout


def _symlinked_image(tmp_path):
    """Debian's alternatives: /usr/bin/awk -> /etc/alternatives/awk -> /usr/bin/mawk, and an absolute
    directory symlink /lib -> /usr/lib; the last layer changes mawk, so the cuts tell the layers apart."""
    from unionfs.image.writer import Symlink

    layers = [[Dir("usr"), Dir("usr/bin"), File("usr/bin/mawk", b"v1"), Dir("usr/lib"), File("usr/lib/libx", b"x"),
               Symlink("lib", target="/usr/lib")],
              [Dir("etc"), Dir("etc/alternatives"), Symlink("etc/alternatives/awk", target="/usr/bin/mawk"),
               Symlink("usr/bin/awk", target="/etc/alternatives/awk")],
              [Dir("usr"), Dir("usr/bin"), File("usr/bin/mawk", b"v3")]]
    image = tmp_path / "image.tar"
    write_image(image, [layer_tar(spec) for spec in layers], new_config(["base", "alternatives", "upgrade"]),
                repo_tag="alt:latest")
    return image


def test_which_and_explain_follow_the_images_absolute_symlinks_inside_the_mount(mounts, tmp_path):
    """``/usr/bin/awk`` leads to the image's /etc/alternatives, never the host's; a path through an
    absolute directory symlink (once an ELOOP traceback) is the image's /usr/lib."""
    point = mounts.mount(_symlinked_image(tmp_path), "-q", "--read-only")
    which = run_layermount("which", point / "usr/bin/awk")
    assert which.returncode == 0, which.stdout + which.stderr
    assert which.stdout.startswith("/usr/bin/mawk  (mount ")
    wins = [line for line in which.stdout.splitlines() if "wins" in line]
    assert len(wins) == 1 and "layer   3" in wins[0]

    explain = run_layermount("explain", point / "lib/libx")
    assert explain.returncode == 0, explain.stdout + explain.stderr
    assert "Looking up /usr/lib/libx in " in explain.stdout
    assert "the copy in layer 1" in explain.stdout

    relative = run_layermount("which", "lib/libx", cwd=point)     # a relative path through the same link
    assert relative.returncode == 0 and relative.stdout.startswith("/usr/lib/libx  (mount "), relative.stdout


def test_which_and_explain_understand_the_layers_cuts(mounts, tmp_path):
    """``/.layers/2/...`` is the image after build step 2: what layer 3 changed is not in it, and its
    absolute symlinks resolve inside the cut."""
    point = mounts.mount(_symlinked_image(tmp_path), "-q", "--read-only")
    which = run_layermount("which", point / ".layers/2/usr/bin/awk")
    assert which.returncode == 0, which.stdout + which.stderr
    assert which.stdout.startswith("/usr/bin/mawk  (mount ") and "/.layers/2 (the image after build step 2)" in which.stdout
    lines = which.stdout.splitlines()[1:]
    assert [line.split()[1] for line in lines] == ["2", "1"]
    assert "wins" in lines[1]

    explain = run_layermount("explain", point / ".layers/1/usr/bin/mawk")
    assert explain.returncode == 0, explain.stdout + explain.stderr
    assert "the copy in layer 1" in explain.stdout and "layer 3" not in explain.stdout

    gone = run_layermount("which", point / ".layers/1/usr/bin/awk")    # not yet made at step 1
    assert gone.returncode == 1 and "not visible" in gone.stdout


def test_which_through_a_symlink_loop_is_one_line_never_a_traceback(mounts, tmp_path):
    from unionfs.image.writer import Symlink

    image = tmp_path / "loop.tar"
    write_image(image, [layer_tar([Symlink("a", target="/b"), Symlink("b", target="/a"), File("f", b"f")])],
                new_config(["loop"]), repo_tag="loop:latest")
    point = mounts.mount(image, "-q", "--read-only")
    result = run_layermount("which", point / "a/f")     # a loop inside the image
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "symbolic links (in the image)" in result.stderr

    (tmp_path / "host-loop").symlink_to(tmp_path / "host-loop")      # a loop on the host, before the mount
    host = run_layermount("which", tmp_path / "host-loop/x")
    assert host.returncode == 2 and "Traceback" not in host.stderr
    assert len(host.stderr.strip().splitlines()) == 1 and "symbolic links" in host.stderr


def test_which_tells_what_hid_a_path_whose_directory_is_gone(mounts, tmp_path):
    """A directory a later layer deleted: the path cannot be resolved in the mount, yet ``which``
    still tells the story (the part that resolves, the rest as written)."""
    layers = [[Dir("etc"), Dir("etc/old"), File("etc/old/conf", b"c")], [Whiteout("etc/old")]]
    image = tmp_path / "image.tar"
    write_image(image, [layer_tar(spec) for spec in layers], new_config(["base", "rm"]), repo_tag="gone:latest")
    point = mounts.mount(image, "-q", "--read-only")
    which = run_layermount("which", point / "etc/old/conf")
    assert which.returncode == 1, which.stdout + which.stderr
    assert which.stdout.startswith("/etc/old/conf  (mount ") and "whiteout etc/.wh.old" in which.stdout

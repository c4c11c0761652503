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

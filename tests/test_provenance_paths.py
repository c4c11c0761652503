"""`which` and `explain` on paths as the container sees them: through the image's absolute symlinks,
through `..` that climbs above the root, and through the /.layers/N time-travel directories.

Paths are resolved inside the mount's root, never on the host: the host's /usr/bin/mawk is not the
image's.
"""

from __future__ import annotations

import pytest

from conftest import run_layermount
from unionfs.image.writer import Dir, File, Symlink, layer_tar, new_config, write_image

BOTTOM = [
    Dir("usr/bin"), File("usr/bin/mawk", b"mawk 1"), Symlink("usr/bin/awk", "/usr/bin/mawk"),
    Symlink("usr/bin/climber", "../../../../../../usr/bin/mawk"),
    Dir("usr/lib/layermount-test-app"), File("usr/lib/layermount-test-app/conf", b"conf 1"),
    Symlink("lib", "/usr/lib"),
    Dir("etc/nginx/sites-available"), File("etc/nginx/sites-available/default", b"server {}"),
    Dir("etc/nginx/sites-enabled"), Symlink("etc/nginx/sites-enabled/default", "/etc/nginx/sites-available/default"),
    Symlink("loop-a", "/loop-b"), Symlink("loop-b", "/loop-a"),
]
TOP = [Dir("usr/bin"), File("usr/bin/mawk", b"mawk 2"), Dir("usr/lib/layermount-test-app"),
       File("usr/lib/layermount-test-app/conf", b"conf 2")]


@pytest.fixture
def mounted(mounts, tmp_path):
    image = tmp_path / "image.tar"
    write_image(image, [layer_tar(BOTTOM), layer_tar(TOP)], new_config(["bottom", "top"]))
    return mounts.mount(image, "--read-only", "-q")


def winner(output: str) -> int:
    """The layer number on `which`'s one "wins" line."""
    winners = [line.split()[1] for line in output.splitlines() if line.startswith("  layer") and " wins " in line]
    assert len(winners) == 1, output
    return int(winners[0])


def run(command: str, path) -> str:
    result = run_layermount(command, path)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_which_and_explain_of_a_plain_path(mounted):
    """The baseline the tests below extend: no symlink on the way."""
    assert winner(run("which", mounted / "usr/bin/mawk")) == 2
    assert "the copy in layer 2" in run("explain", mounted / "usr/bin/mawk")


@pytest.mark.parametrize("path, resolved, layer", [
    ("usr/bin/awk", "/usr/bin/mawk", 2),
    ("etc/nginx/sites-enabled/default", "/etc/nginx/sites-available/default", 1),
    ("lib/layermount-test-app/conf", "/usr/lib/layermount-test-app/conf", 2),   # through a directory symlink
    ("usr/bin/climber", "/usr/bin/mawk", 2),    # `..` above the root stays at the root, as in a chroot
], ids=["absolute-file-symlink", "sites-enabled", "absolute-directory-symlink", "dotdot-above-root"])
def test_which_and_explain_resolve_symlinks_inside_the_image(mounted, path, resolved, layer):
    which = run("which", mounted / path)
    assert which.splitlines()[0].startswith(f"{resolved}  (mount {mounted}")
    assert winner(which) == layer
    explained = run("explain", mounted / path)
    assert f"Looking up {resolved} in {mounted}" in explained
    assert f"the copy in layer {layer}" in explained


def test_a_symlink_loop_of_the_image_is_a_one_line_error(mounted):
    for command in ("which", "explain"):
        result = run_layermount(command, mounted / "loop-a/x")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "loop-a" in result.stderr


@pytest.mark.parametrize("cut, layer", [(1, 1), (2, 2)])
def test_which_and_explain_understand_layers_dir_paths(mounted, cut, layer):
    which = run("which", mounted / f".layers/{cut}/usr/bin/mawk")
    assert winner(which) == layer
    assert f"the copy in layer {layer}" in run("explain", mounted / f".layers/{cut}/usr/bin/mawk")

"""Attacks on ``which``/``explain``: a hostile layer tries to make them tell a story the mount does not serve.

A learner trusts these commands to explain what the container sees; if their
reading of the markers differs from the merge's by one rule, an image can hide
a file from the explanation while the mount serves it (or the other way round).
"""

from __future__ import annotations

import os

from conftest import run_layermount


def make_tree(root, files):
    for relpath, data in files.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_opaque_marker_at_a_layer_root_does_not_hide_the_story(mounts, tmp_path):
    """A top layer puts ``.wh..wh..opq`` at its root. The merge (like kernel overlayfs) ignores
    an opaque root, so the lower files stay visible; explain must not claim the layers below
    were not looked at, and which must show the lower copy winning."""
    lower = make_tree(tmp_path / "lower", {"etc/secret-looking": b"served\n"})
    top = make_tree(tmp_path / "top", {".wh..wh..opq": b"", "other": b"x"})
    point = mounts.mount_lowers([top, lower])
    assert (point / "etc/secret-looking").read_bytes() == b"served\n"

    explain = run_layermount("explain", point / "etc/secret-looking")
    assert explain.returncode == 0, explain.stderr
    assert "not looked at" not in explain.stdout
    assert "opaque directory" not in explain.stdout

    which = run_layermount("which", point / "etc/secret-looking")
    assert which.returncode == 0, which.stdout
    lines = which.stdout.splitlines()
    assert "wins" in lines[2] and str(lower) in lines[2]
    assert not os.path.exists(point / ".wh..wh..opq")


def test_symlinks_that_climb_out_of_the_image_are_resolved_inside_it(mounts, tmp_path):
    """An image's ``peek -> /../../../etc`` and ``self -> /proc/self/root`` try to make ``which``
    follow them on the host (and so describe, or read, the host's files). Inside the image's
    root ``..`` stops at ``/``, and a magic link is not followed: the story stays the image's."""
    lower = make_tree(tmp_path / "lower", {"etc/hostname": b"image\n"})
    os.symlink("/../../../etc", lower / "peek")
    os.symlink("/proc/self/root", lower / "self")
    top = make_tree(tmp_path / "top", {"t": b"t"})
    point = mounts.mount_lowers([top, lower])

    which = run_layermount("which", point / "peek/hostname")
    assert which.returncode == 0, which.stdout + which.stderr
    assert which.stdout.startswith("/etc/hostname  (mount ") and str(lower) in which.stdout

    host_only = run_layermount("which", point / "peek/passwd")      # the host has one, the image not
    assert host_only.returncode == 1 and host_only.stdout.startswith("/etc/passwd  (mount ")
    assert "not visible" in host_only.stdout

    magic = run_layermount("explain", point / "self/etc")
    assert "Traceback" not in magic.stderr
    assert magic.returncode == 0 and "Looking up /self/etc in " in magic.stdout, magic.stdout + magic.stderr
    assert "does not exist" in magic.stdout

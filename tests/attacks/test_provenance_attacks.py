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

"""Attacks on the merged view's numbers: a hostile layer tries to make the daemon slow or wrong in what stat says."""

from __future__ import annotations

import os


def test_thousands_of_names_of_one_file_half_deleted_above(mounts, tmp_path):
    """A layer holds 2,000 hardlinks of one file and the layer above deletes every other one. The
    link count the mount reports must be the names left (1,000), for every name listed, and a
    long listing must not cost a count per name (2,000 x 2,000 lookups would stall the daemon)."""
    bottom, top = tmp_path / "bottom", tmp_path / "top"
    (bottom / "d").mkdir(parents=True)
    (top / "d").mkdir(parents=True)
    (bottom / "d/f0").write_bytes(b"x")
    for number in range(1, 2000):
        os.link(bottom / "d/f0", bottom / f"d/f{number}")
        if number % 2:
            (top / f"d/.wh.f{number}").write_bytes(b"")
    point = mounts.mount_lowers([top, bottom])
    with os.scandir(point / "d") as entries:
        counts = {entry.stat(follow_symlinks=False).st_nlink for entry in entries}
    assert counts == {1000}
    assert len(os.listdir(point / "d")) == 1000

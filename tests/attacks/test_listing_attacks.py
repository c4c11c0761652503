"""Attacks on the merged listing: what an image controls must not grow what the daemon shares, nor
slip past the way its names are read."""

from __future__ import annotations

import os

from oracle import diff_snapshots, kernel_overlay, snapshot
from test_mount import make_tree
from unionfs.overlay import nodes
from unionfs.overlay.nodes import SHARED_ID_LIMIT, SHARED_VALUES, Attr


def fake_stat(uid: int, gid: int, mode: int = 0o100644) -> os.stat_result:
    return os.stat_result((mode, 12345, 2049, 1, uid, gid, 4096, 1, 2, 3))


def test_an_id_per_file_cannot_grow_the_shared_value_table():
    """A hostile layer gives each of 20,000 files a uid and gid of its own (any 32-bit value is
    valid in a tar header). Attributes share small repeated ints to save memory; ids from the
    image must not become entries of that table, or every file would cost a table entry
    on top of its own int."""
    before = len(SHARED_VALUES)
    attrs = [Attr(fake_stat(SHARED_ID_LIMIT + 7 * index, SHARED_ID_LIMIT + 11 * index)) for index in range(20_000)]
    assert len(SHARED_VALUES) - before <= 2        # the mode and the device, at most
    assert attrs[123].uid == SHARED_ID_LIMIT + 7 * 123 and attrs[123].gid == SHARED_ID_LIMIT + 11 * 123


def test_common_ids_and_modes_are_shared():
    """The other side: the ids real images use (0, 1000, 65534) and modes are one object each."""
    # Each from ints of its own, as two os.stat calls give them.
    first, second = (Attr(fake_stat(int("1000"), int("65534"), int("33188"))) for _ in range(2))
    assert first.uid is second.uid and first.gid is second.gid and first.mode is second.mode
    assert nodes.SHARED_ID_LIMIT > 65534


def _names(spec: dict[bytes, object]) -> dict[str, object]:
    return {os.fsdecode(rel): value for rel, value in spec.items()}


def test_undecodable_names_and_markers_list_as_the_kernel_lists_them(mounts, tmp_path):
    """A hostile image names its entries with bytes that are no UTF-8 (a tar header holds any
    bytes) and hides whiteouts and opaque markers among them, in directories only one layer has
    (listed without a merge) and in merged ones. The daemon reads names as scandir's str and
    turns them back into bytes itself: every name must come back byte for byte, no marker may
    show, and what a marker hides must stay hidden, as on kernel overlayfs. (Markers in a
    directory no other layer has are checked apart: kernel overlayfs lists a whiteout there.)"""
    bottom = make_tree(tmp_path / "bottom", _names({
        b"\xff\xfe": b"raw", b"gone\xff": b"x", b"caf\xe9/in\x80": b"in", b"opq\xfa/old": b"old",
    }))
    top = make_tree(tmp_path / "top", _names({
        b".wh.gone\xff": b"", b"caf\xe9/new\xfd": b"n", b"opq\xfa/.wh..wh..opq": b"", b"opq\xfa/new\xfc": b"new",
        b"only\xfe/\xc3(": b"a broken UTF-8 pair",
    }))
    ours = mounts.mount_lowers([top, bottom])
    with kernel_overlay([top, bottom]) as kernel:
        differences = diff_snapshots(snapshot(ours), snapshot(kernel), ("layermount", "kernel overlayfs"))
    assert differences == []
    assert sorted(os.listdir(os.fsencode(ours))) == sorted([b"\xff\xfe", b"caf\xe9", b"opq\xfa", b"only\xfe"])

    alone = make_tree(tmp_path / "alone", _names({
        b"solo\xfb/\x80\x81": b"a", b"solo\xfb/.wh.nothing\xff": b"", b"solo\xfb/.wh..wh..opq": b"",
    }))
    solo = os.fsencode(mounts.mount_lowers([alone], mountpoint=mounts.mountpoint("alone-mnt"))) + b"/solo\xfb"
    assert os.listdir(solo) == [b"\x80\x81"]
    for hidden in (b".wh.nothing\xff", b"nothing\xff", b".wh..wh..opq"):
        assert not os.path.lexists(solo + b"/" + hidden)

"""Attacks on the merged listing's memory: what an image controls must not grow what the daemon shares."""

from __future__ import annotations

import os

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

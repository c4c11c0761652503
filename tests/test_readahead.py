"""The read-ahead thread of an unpack: same bytes, errors where they happened, never left running."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import threading
import time

import pytest

from unionfs.errors import ImageError, UnsafeArchive
from unionfs.image import open_layer_tars
from unionfs.readahead import CHUNK, DEPTH, ReadAhead
from unionfs.store import LayerStore


class Source(io.RawIOBase):
    """Hands out ``data`` in pieces of ``step`` bytes, then raises ``error`` if given; counts reads."""

    def __init__(self, data: bytes, step: int, error: Exception | None = None):
        self._data, self._step, self._error = data, step, error
        self.position = 0

    def readable(self):
        return True

    def read(self, size=-1):
        piece = self._data[self.position:self.position + min(size, self._step)]
        self.position += len(piece)
        if not piece and self._error is not None:
            raise self._error
        return piece


def read_ahead_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "read-ahead"]


@pytest.mark.parametrize("step, size", [(1000, 7), (61, 512), (CHUNK, 300_000), (CHUNK // 3, CHUNK * 2)])
def test_reads_return_the_source_bytes_in_order(step, size):
    data = os.urandom(3 * CHUNK + 12345)
    with ReadAhead(Source(data, step)) as reader:
        parts = []
        while piece := reader.read(size):
            assert len(piece) <= size
            parts.append(piece)
    assert b"".join(parts) == data
    assert read_ahead_threads() == []


def test_an_error_of_the_source_comes_after_the_bytes_before_it():
    data = os.urandom(CHUNK + 10)
    reader = ReadAhead(Source(data, 4096, ImageError("truncated gzip stream")))
    got = b""
    with pytest.raises(ImageError, match="truncated gzip stream"):
        while True:
            got += reader.read(65536)
    assert got == data
    assert read_ahead_threads() == []
    assert reader.read(10) == b""           # ended: reads nothing more


def test_closing_midway_stops_a_thread_blocked_on_a_full_queue():
    source = Source(bytes((DEPTH + 20) * CHUNK), CHUNK)
    reader = ReadAhead(source)
    reader.read(10)
    deadline = time.monotonic() + 10
    while source.position < DEPTH * CHUNK and time.monotonic() < deadline:
        time.sleep(0.01)                    # the thread fills the queue and blocks
    reader.close()
    assert read_ahead_threads() == []
    assert source.position <= (DEPTH + 3) * CHUNK, "the thread went on reading after the close"


def layer_with(*members: tuple[str, bytes], kind=tarfile.REGTYPE) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_a_hostile_member_after_megabytes_stops_the_thread_and_publishes_nothing(tmp_path):
    """The thread has read ahead past the hostile member when extraction refuses it: the refusal
    must still win, the thread end, and the store keep nothing of the layer."""
    blob = tmp_path / "layer.tar.gz"
    blob.write_bytes(gzip.compress(layer_with(("big", os.urandom(3 * CHUNK)), ("../escape", b"x"),
                                              ("after", bytes(20 * CHUNK))), compresslevel=1))
    store = LayerStore(tmp_path / "store")
    with pytest.raises(UnsafeArchive, match="member '../escape'"):
        store.unpack_image(open_layer_tars([str(blob)]), jobs=1)
    assert read_ahead_threads() == []
    assert store.layers() == [] and os.listdir(store.tmp_dir) == []
    assert not (tmp_path / "escape").exists()


def test_damage_found_by_the_thread_is_reported_against_the_member_being_read(tmp_path):
    compressed = gzip.compress(layer_with(("small", b"s"), ("big", os.urandom(3 * CHUNK)), ("after", b"a")))
    blob = tmp_path / "layer.tar.gz"
    blob.write_bytes(compressed[:len(compressed) // 2])
    store = LayerStore(tmp_path / "store")
    with pytest.raises(ImageError, match="truncated gzip stream in member 'big'"):
        store.unpack_image(open_layer_tars([str(blob)]), jobs=1)
    assert read_ahead_threads() == []
    assert store.layers() == [] and os.listdir(store.tmp_dir) == []

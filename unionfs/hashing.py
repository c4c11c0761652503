"""Streams that hash what passes through them, so a layer is verified in the same pass that unpacks it."""

from __future__ import annotations

import hashlib
from typing import BinaryIO

DRAIN_CHUNK = 1 << 20


class HashingReader:
    """A read-only stream wrapper that feeds every byte read into a sha256."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._hash = hashlib.sha256()
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._hash.update(data)
        self.bytes_read += len(data)
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        """Read to the end: a digest of a stream not read to its end proves nothing."""
        while self.read(DRAIN_CHUNK):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

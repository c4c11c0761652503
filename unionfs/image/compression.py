"""Decompress layer blobs as streams, deciding from their first bytes and never their names.

Blobs are hundreds of megabytes and arrive through non-seekable hashing
wrappers, so everything here works on large chunks of a forward-only stream.
Damage (a truncated download, a flipped byte) must surface as an ImageError
when read: a silent short read would unpack half a layer and call it complete.
"""

from __future__ import annotations

import io
from typing import BinaryIO

from isal import igzip_lib

from ..errors import ImageError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
HEAD_SIZE = 4
CHUNK = 1 << 20


def detect_compression(head: bytes) -> str:
    """"gzip", "zstd" or "none", from the first bytes of a blob."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


def open_decompressed(stream: BinaryIO) -> BinaryIO:
    """A reader of the uncompressed bytes of ``stream``, which may be gzip, zstd or plain.

    The returned reader does not close ``stream``; its owner does.
    """
    head = _read_exactly(stream, HEAD_SIZE)
    kind = detect_compression(head)
    if kind == "gzip":
        return _GzipReader(_Prepended(head, stream))
    if kind == "zstd":
        return _ZstdReader(_Prepended(head, stream))
    return _Prepended(head, stream)


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes, fewer only at the end: a pipe may hand out less per read."""
    data = b""
    while len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    return data


class _Prepended(io.RawIOBase):
    """``stream`` with the bytes already peeked from it put back in front."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self._head = head
        self._stream = stream

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(size)
        head, self._head = self._head, b""
        if size is None or size < 0:
            return head + self._stream.read()
        if size <= len(head):
            self._head = head[size:]
            return head[:size]
        return head + self._stream.read(size - len(head))

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class _Decoder(io.RawIOBase):
    """Serves reads of any size from decoded chunks, so small reads cost no extra decoding calls."""

    def __init__(self):
        self._chunk = b""
        self._offset = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def _decode_chunk(self) -> bytes:
        """The next piece of output; b"" only at the verified end of the stream."""
        raise NotImplementedError

    def _fill(self) -> bool:
        while not self._done and self._offset >= len(self._chunk):
            self._chunk, self._offset = self._decode_chunk(), 0
            if not self._chunk:
                self._done = True
        return self._offset < len(self._chunk)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while self._fill():
                parts.append(self._chunk[self._offset:])
                self._offset = len(self._chunk)
            return b"".join(parts)
        if size == 0 or not self._fill():
            return b""
        if self._offset == 0 and size >= len(self._chunk):
            self._offset = len(self._chunk)
            return self._chunk
        data = self._chunk[self._offset:self._offset + size]
        self._offset += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class _GzipReader(_Decoder):
    """Gzip members one after another (as pigz and concatenation make), CRC- and length-checked.

    ISA-L's inflate (python-isal) decodes twice as fast as zlib and, like it,
    releases the GIL, so decompression can run beside extraction in another
    thread. Zero padding after the last member is accepted, as gzip(1) does.
    """

    def __init__(self, source: BinaryIO):
        super().__init__()
        self._source = source
        self._input = b""         # compressed bytes not yet given to a decompressor
        self._member = None       # the decompressor of the member being read
        self._source_done = False

    def _more_input(self) -> bool:
        if self._source_done:
            return False
        data = self._source.read(CHUNK)
        if not data:
            self._source_done = True
            return False
        self._input += data
        return True

    def _decode_chunk(self) -> bytes:
        while True:
            if self._member is None:
                self._input = self._input.lstrip(b"\0")
                if self._input:
                    self._member = igzip_lib.IgzipDecompressor(flag=igzip_lib.DECOMP_GZIP)
                elif not self._more_input():
                    return b""
                continue
            if self._member.needs_input:
                if not self._input and not self._more_input():
                    raise ImageError("truncated gzip stream")
                data, self._input = self._input, b""
            else:
                data = b""         # output left over from the input it already holds
            try:
                output = self._member.decompress(data, CHUNK)
            except igzip_lib.IsalError as exc:
                raise ImageError(f"corrupt gzip stream: {exc}") from None
            if self._member.eof:
                self._input = self._member.unused_data
                self._member = None
            if output:
                return output


class _ZstdReader(_Decoder):
    """Zstandard frames one after another, with a check that the last frame is whole.

    python-zstandard ends a stream cut inside a frame with a silent short read,
    so the compressed bytes also pass through a frame walker that knows where
    each frame ends.
    """

    def __init__(self, source: BinaryIO):
        import zstandard  # most layers are gzip: the library (5-20 ms to load) only for a zstd one

        super().__init__()
        self._frames = _ZstdFrameWalker(source)
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            self._frames, read_size=CHUNK, read_across_frames=True, closefd=False)
        self._corrupt = zstandard.ZstdError

    def _decode_chunk(self) -> bytes:
        try:
            output = self._reader.read(CHUNK)
        except self._corrupt as exc:
            raise ImageError(f"corrupt zstd stream: {exc}") from None
        if not output:
            self._frames.check_complete()
        return output


class _ZstdFrameWalker:
    """Passes compressed bytes through while following zstd frame and block headers.

    Costs a few operations per block (at most 128 KiB), not per byte. Layout
    from RFC 8878: frame magic, header descriptor, optional window byte,
    dictionary id and content size, blocks with 3-byte headers, an optional
    4-byte checksum; skippable frames carry a 4-byte length.
    """

    def __init__(self, source: BinaryIO):
        self._source = source
        self._skip = 0            # payload bytes to pass before the next header
        self._header = b""        # bytes of the header being collected
        self._wanted = 4          # length of that header
        self._state = "magic"
        self._checksum = False

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self._walk(memoryview(data))
        return data

    def readable(self) -> bool:
        return True

    def check_complete(self) -> None:
        """Raise unless the bytes seen so far end exactly at a frame's end."""
        if self._state != "magic" or self._header or self._skip:
            raise ImageError("truncated zstd stream")

    def _walk(self, data: memoryview) -> None:
        position = 0
        while position < len(data):
            if self._skip:
                taken = min(self._skip, len(data) - position)
                self._skip -= taken
                position += taken
                continue
            taken = min(self._wanted - len(self._header), len(data) - position)
            self._header += bytes(data[position:position + taken])
            position += taken
            if len(self._header) == self._wanted:
                header, self._header = self._header, b""
                self._advance(header)

    def _expect(self, state: str, size: int, skip: int = 0) -> None:
        self._state, self._wanted, self._skip = state, size, skip

    def _advance(self, header: bytes) -> None:
        if self._state == "magic":
            magic = int.from_bytes(header, "little")
            if header == ZSTD_MAGIC:
                self._expect("descriptor", 1)
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._expect("skippable", 4)
            else:
                raise ImageError("corrupt zstd stream: data after the last frame is not a frame")
        elif self._state == "skippable":
            self._expect("magic", 4, skip=int.from_bytes(header, "little"))
        elif self._state == "descriptor":
            descriptor = header[0]
            single_segment = descriptor >> 5 & 1
            content_size_bytes = (single_segment, 2, 4, 8)[descriptor >> 6]
            rest = (not single_segment) + (0, 1, 2, 4)[descriptor & 3] + content_size_bytes
            self._checksum = bool(descriptor >> 2 & 1)
            self._expect("block", 3, skip=rest)
        elif self._state == "block":
            value = int.from_bytes(header, "little")
            last, kind, size = value & 1, value >> 1 & 3, value >> 3
            if kind == 3:
                raise ImageError("corrupt zstd stream: reserved block type")
            payload = 1 if kind == 1 else size
            if last:
                self._expect("magic", 4, skip=payload + 4 * self._checksum)
            else:
                self._expect("block", 3, skip=payload)

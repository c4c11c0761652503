"""Read a stream ahead in a thread, so decompressing and hashing a layer overlap with unpacking it.

ISA-L's inflate, zstd and hashlib release the GIL on large buffers, so the
thread that pulls the layer through them runs on another core while the
extracting thread parses headers and creates files.
"""

from __future__ import annotations

import queue
import threading
from typing import BinaryIO

CHUNK = 1 << 20
DEPTH = 8                  # chunks held between the threads: 8 MiB at most


class ReadAhead:
    """A forward reader of ``source``, which another thread reads in CHUNK-sized pieces.

    An error raised by ``source`` is raised again here, by the read that
    reaches the point where it happened. ``source`` belongs to the thread
    until this reader has returned its end (b"") or been closed; after that
    the caller may use it again.
    """

    def __init__(self, source: BinaryIO):
        self._source = source
        self._queue: queue.Queue = queue.Queue(DEPTH)
        self._stop = threading.Event()
        self._chunk = b""
        self._offset = 0
        self._ended = False
        self._thread = threading.Thread(target=self._produce, name="read-ahead", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._source.read(CHUNK)
                self._queue.put(data)
                if not data:
                    return
        except BaseException as exc:   # handed to the reader, which raises it in its own thread
            self._queue.put(exc)

    def readable(self) -> bool:
        return True

    def read(self, size: int) -> bytes:
        if self._offset >= len(self._chunk) and not self._next_chunk():
            return b""
        if self._offset == 0 and size >= len(self._chunk):
            data = self._chunk
        else:
            data = self._chunk[self._offset:self._offset + size]
        self._offset += len(data)
        return data

    def drain(self) -> None:
        """Read to the end, so everything the thread reads is hashed."""
        while self._next_chunk():
            pass

    def _next_chunk(self) -> bool:
        if self._ended:
            return False
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._end()
            raise item
        if not item:
            self._end()
            return False
        self._chunk, self._offset = item, 0
        return True

    def _end(self) -> None:
        self._ended = True
        self._thread.join()

    def close(self) -> None:
        """Stop the thread (it finishes the read it is in) and wait for it."""
        if self._ended:
            return
        self._stop.set()
        while True:
            # Emptying the queue frees a producer blocked on a full one; it puts
            # at most one more item before it sees the stop.
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(0.05)
            if not self._thread.is_alive():
                break
        self._ended = True

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

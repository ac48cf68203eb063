"""An upload: the body of one HTTP request, read once as a stream (never seekable, never read twice)."""

from __future__ import annotations

import threading

from importer.errors import SourceError
from importer.formats import HEADER_SIZE
from importer.pipeline import Reader, read_full
from importer.sources.base import Source, SourceInfo


class UploadSource(Source):
    """The image as the client sends it; `received` is set once the last byte of the image has arrived."""

    def __init__(self, stream: Reader, size: int | None, description: str = "upload",
                 received: threading.Event | None = None) -> None:
        self._stream = stream
        self._size = size  # the body's length when the client announced it (plain body with Content-Length)
        self._header: bytes | None = None
        self._opened = False
        self.description = description
        self.sequential_reason = "an upload arrives as one stream"
        self.received = received if received is not None else threading.Event()

    def probe(self) -> SourceInfo:
        if self._header is None:
            self._header = read_full(self._stream, HEADER_SIZE)
            if len(self._header) < HEADER_SIZE:
                self.received.set()
        return SourceInfo(size=self._size, random_access=False, header=self._header)

    def open(self) -> Reader:
        if self._opened:
            raise SourceError(f"the {self.description} can be read only once")
        self._opened = True
        if self._header is None:
            self.probe()
        assert self._header is not None
        return _Replay(self._header, self._stream, self.received)


class _Replay:
    """The header read by probe(), then the rest of the stream; signals the end of the stream."""

    def __init__(self, head: bytes, rest: Reader, ended: threading.Event) -> None:
        self._head, self._rest, self._ended = head, rest, ended

    def read(self, size: int, /) -> bytes:
        if self._head:
            out, self._head = self._head[:size], self._head[size:]
            return out
        if self._ended.is_set():
            return b""
        data = self._rest.read(size)
        if not data:
            self._ended.set()
        return data

    def close(self) -> None:
        pass  # the connection belongs to the server, which answers on it after the import

"""A request body read straight from the socket: Content-Length or chunked, under the progress deadlines."""

from __future__ import annotations

import socket
import threading
import time

from importer.deadline import ProgressWatch
from importer.errors import ImporterError, SourceError

RECV_SIZE = 1024 * 1024
POLL_INTERVAL = 0.5  # how often a waiting read looks at the deadlines and at cancellation
MAX_CHUNK_LINE = 1024


class BadRequest(ImporterError):
    """The request is malformed (framing, multipart); answered with 400."""


class BodyReader:
    """Reads the body from the connection itself (no buffered file object: a timed-out one refuses to go on)."""

    def __init__(self, sock: socket.socket, length: int | None, chunked: bool, watch: ProgressWatch,
                 cancelled: threading.Event) -> None:
        self._sock, self._watch, self._cancelled = sock, watch, cancelled
        self.length = length
        self._left = length  # bytes left of a Content-Length body, or of the current chunk
        self._chunked = chunked
        self._chunk_started = False
        self._buf = bytearray()
        self.eof = length == 0 and not chunked
        self.count = 0

    def read(self, size: int, /) -> bytes:
        if self.eof:
            return b""
        if self._chunked and not self._left:
            self._next_chunk()
            if self.eof:
                return b""
        assert self._left is not None
        want = min(size, self._left)
        if not self._buf:
            self._fill(want)
        out = bytes(self._buf[:want])
        del self._buf[:want]
        self._left -= len(out)
        self.count += len(out)
        if self._left == 0 and not self._chunked:
            self.eof = True
        return out

    @property
    def sock(self) -> socket.socket:
        return self._sock

    def close(self) -> None:
        pass  # the connection belongs to the handler, which answers on it

    def drain(self, limit: int, seconds: float) -> bool:
        """Read and drop what is left, within limit bytes and seconds; True when the body was read to its end."""
        end = time.monotonic() + seconds
        dropped = 0
        try:
            while not self.eof and dropped < limit and time.monotonic() < end:
                dropped += len(self.read(RECV_SIZE))
        except (OSError, ImporterError):
            return False
        return self.eof

    def _next_chunk(self) -> None:
        if self._chunk_started:
            self._expect(b"\r\n")
        self._chunk_started = True
        line = self._line()
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError as err:
            raise BadRequest(f"invalid chunk size {size_text[:32]!r}") from err
        if size < 0:
            raise BadRequest("negative chunk size")
        if size == 0:
            while self._line():  # trailers, up to the empty line
                pass
            self.eof = True
            return
        self._left = size

    def _line(self) -> bytes:
        while (i := self._buf.find(b"\r\n")) < 0:
            if len(self._buf) > MAX_CHUNK_LINE:
                raise BadRequest("chunk header line too long")
            self._fill(1)
        line = bytes(self._buf[:i])
        del self._buf[:i + 2]
        return line

    def _expect(self, data: bytes) -> None:
        while len(self._buf) < len(data):
            self._fill(len(data) - len(self._buf))
        if bytes(self._buf[:len(data)]) != data:
            raise BadRequest("malformed chunked body")
        del self._buf[:len(data)]

    def _fill(self, want: int) -> None:
        """At least one more byte into the buffer, waiting in short slices so deadlines and cancellation apply."""
        self._sock.settimeout(POLL_INTERVAL)
        while True:
            if self._cancelled.is_set():
                raise ImporterError("the upload was cancelled")
            try:
                data = self._sock.recv(max(want, 1) if not self._chunked else RECV_SIZE)
            except TimeoutError:
                self._watch.check()
                continue
            if not data:
                raise SourceError(f"the client closed the connection after {self.count} bytes of the body")
            self._watch.received(len(data))
            self._watch.check()  # a client trickling bytes never times out a read: the rate catches it
            self._buf += data
            return

"""A request body read straight from the socket: Content-Length or chunked, under the progress deadlines."""

from __future__ import annotations

import socket
import threading
import time

from importer.deadline import ProgressWatch
from importer.errors import ImporterError, SourceError

RECV_SIZE = 1024 * 1024
# One read hands over at most this much; TLS delivers 16 KiB records into it. As large as a streaming reader's
# chunk (qcow2_stream.READ_CHUNK), so such a chunk is one read, not four joined together.
BUFFER_SIZE = 4 * RECV_SIZE
POLL_INTERVAL = 0.5  # how often a waiting read looks at the deadlines and at cancellation
MAX_CHUNK_LINE = 1024


class BadRequest(ImporterError):
    """The request is malformed (framing, multipart); answered with 400."""


class BodyReader:
    """Reads the body from the connection itself (no buffered file object: a timed-out one refuses to go on).

    Records are received into one preallocated buffer, so a read of 1 MiB is one copy out of it rather than
    64 allocations of 16 KiB joined together.
    """

    def __init__(self, sock: socket.socket, length: int | None, chunked: bool, watch: ProgressWatch,
                 cancelled: threading.Event) -> None:
        self._sock, self._watch, self._cancelled = sock, watch, cancelled
        self.length = length
        self._left = length  # bytes left of a Content-Length body, or of the current chunk
        self._chunked = chunked
        self._chunk_started = False
        self._buf = bytearray(BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._start = self._end = 0  # the bytes received and not yet handed over: _buf[_start:_end]
        self._broken: BaseException | None = None  # the connection ended while bytes were still buffered
        self._timeout_set = False
        self.eof = length == 0 and not chunked
        self.count = 0

    def read(self, size: int, /) -> bytes:
        if self.eof or size <= 0:
            return b""
        if self._chunked and not self._left:
            self._next_chunk()
            if self.eof:
                return b""
        assert self._left is not None
        want = min(size, self._left, BUFFER_SIZE)
        if self._end == self._start:
            self._receive(want)
        count = min(want, self._end - self._start)
        out = bytes(self._view[self._start:self._start + count])
        self._start += count
        self._left -= count
        self.count += count
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
        while (i := self._buf.find(b"\r\n", self._start, self._end)) < 0:
            if self._end - self._start > MAX_CHUNK_LINE:
                raise BadRequest("chunk header line too long")
            self._receive(self._end - self._start + 1)
        line = bytes(self._view[self._start:i])
        self._start = i + 2
        return line

    def _expect(self, data: bytes) -> None:
        while self._end - self._start < len(data):
            self._receive(len(data))
        if self._view[self._start:self._start + len(data)] != data:
            raise BadRequest("malformed chunked body")
        self._start += len(data)

    def _room(self, want: int) -> int:
        """Free space after the buffered bytes, enough for want of them: moves them to the front when needed."""
        held = self._end - self._start
        if held == 0:
            self._start = self._end = 0
        elif self._start + want > BUFFER_SIZE:
            self._view[:held] = self._view[self._start:self._end]
            self._start, self._end = 0, held
        room = BUFFER_SIZE - self._end
        if not self._chunked:
            assert self._left is not None
            room = min(room, self._left - held)  # never a byte past the body: the answer follows on this socket
        return room

    def _receive(self, want: int) -> None:
        """Buffer at least one more byte, and up to want bytes while they keep coming (records already sent are
        taken in one go; a sender that pauses gets what it sent handed over within POLL_INTERVAL)."""
        if self._broken is not None:
            raise self._broken
        if not self._timeout_set:
            self._sock.settimeout(POLL_INTERVAL)  # once: every wait below is one slice
            self._timeout_set = True
        got = stop = 0
        started = time.monotonic()
        # TLS hands over one 16 KiB record per call: this loop runs 64 times per MiB, so it looks up little.
        recv_into, view, cancelled, monotonic = self._sock.recv_into, self._view, self._cancelled, time.monotonic
        while self._end - self._start < want:
            if cancelled.is_set():
                raise ImporterError("the upload was cancelled")
            if self._end >= stop:
                room = self._room(want)  # first: it may move the held bytes to the front
                stop = self._end + room
            try:
                n = recv_into(view[self._end:stop])
            except TimeoutError:
                if got:
                    break
                self._watch.check()
                continue
            except OSError as err:
                if not got:
                    raise
                self._broken = err  # hand over what arrived; the next read raises
                break
            if n == 0:
                closed = SourceError(f"the client closed the connection after {self.count + self._end - self._start}"
                                     " bytes of the body")
                if not got:
                    raise closed
                self._broken = closed
                break
            self._end += n
            got += n
            if monotonic() - started >= POLL_INTERVAL:
                break  # a trickle must not keep one read open: the deadlines are checked per read
        self._watch.received(got)
        self._watch.check()  # a client trickling bytes never times out a read: the rate catches it

"""Resumable uploads: one import kept alive across connections, fed by whichever connection carries its bytes.

A request that names an upload (`Upload-Id`, `Upload-Length`) feeds a ResumableStream. When its connection
breaks, the stream parks: the import waits (up to the hold time) for a request with the same id that continues at
the byte the import has taken so far (`Upload-Offset`). See docs/upload.md for the protocol.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from email.message import Message

from importer.errors import ImporterError, SourceError
from importer.serve.body import BadRequest, BodyReader
from importer.serve.resume_state import DurableUpload

log = logging.getLogger(__name__)

ID_HEADER = "Upload-Id"
LENGTH_HEADER = "Upload-Length"
OFFSET_HEADER = "Upload-Offset"
CHECKSUM_HEADER = "Upload-Checksum"
DEFAULT_HOLD = 600.0  # how long a broken upload waits for its continuation before its target is cleaned
WAIT_SLICE = 0.5  # how often a parked import looks at cancellation
SKIP_SLICE = 1024 * 1024  # a continuation's bytes the import took already are read and dropped this much at a time
_ID = re.compile(r"[A-Za-z0-9._-]{8,128}")


class OffsetConflict(ImporterError):
    """A continuation that does not start where the upload stands: answered 409 with the expected offset."""

    def __init__(self, message: str, expected: int) -> None:
        super().__init__(message)
        self.expected = expected


@dataclass(frozen=True)
class ResumeRequest:
    """What a request says about the upload it belongs to."""

    upload_id: str
    length: int
    offset: int
    checksum: str | None


def upload_id_of(headers: Message) -> str | None:
    """The request's upload id when it is well formed, else None (a malformed one is refused by resume_request)."""
    value = (headers.get(ID_HEADER) or "").strip()
    return value if _ID.fullmatch(value) else None


def resume_request(headers: Message) -> ResumeRequest | None:
    """None for a plain (CDI) upload; BadRequest when the resume headers are malformed or contradict the body."""
    raw_id = headers.get(ID_HEADER)
    if raw_id is None:
        return None
    upload_id = upload_id_of(headers)
    if upload_id is None:
        raise BadRequest(f"{ID_HEADER} must be 8 to 128 characters of A-Z a-z 0-9 . _ -")
    length = _number(headers, LENGTH_HEADER, required=True)
    offset = _number(headers, OFFSET_HEADER, required=False)
    if offset > length:
        raise BadRequest(f"{OFFSET_HEADER} {offset} is past {LENGTH_HEADER} {length}")
    body_length = headers.get("Content-Length")
    if body_length is None or not body_length.strip().isdigit() or int(body_length) != length - offset:
        raise BadRequest(f"a resumable upload needs Content-Length = {LENGTH_HEADER} - {OFFSET_HEADER} "
                         f"({length - offset})")
    checksum = (headers.get(CHECKSUM_HEADER) or "").strip() or None
    return ResumeRequest(upload_id, length, offset, checksum)


def _number(headers: Message, name: str, required: bool) -> int:
    text = (headers.get(name) or "").strip()
    if not text and not required:
        return 0
    if not text.isdigit():
        raise BadRequest(f"{name} must be a number of bytes, got {text[:32]!r}")
    return int(text)


class ResumableStream:
    """The image's bytes from a succession of request bodies; a broken body parks the import until the next one.

    Where a continuation starts (expected()) is the committed offset when the import's route keeps its bytes
    durably (raw written in place, a scratch file): a restart could not honour more. The continuation then
    resends bytes the import already took, and they are skipped. Otherwise (a compressed stream decoded straight
    into the target) it is every byte the import took, held only in this process.
    """

    def __init__(self, upload_id: str, length: int, hold: float, cancelled: threading.Event, start: int = 0,
                 durable: DurableUpload | None = None) -> None:
        self.upload_id, self.length = upload_id, length
        self.offset = start  # bytes handed to the import (after a restart, from the committed prefix on)
        self.durable = durable
        self._skip = 0  # bytes at the start of the attached body the import took already
        self._hold, self._cancelled = hold, cancelled
        self._cond = threading.Condition()
        self._body: BodyReader | None = None
        self._lost: threading.Event | None = None  # set when the attached body is broken or taken over
        self._parked_at = time.monotonic()
        self._reason = "no connection yet"
        self._closed = False

    def attach(self, body: BodyReader, offset: int) -> threading.Event:
        """Let body carry the bytes from offset on; the event returned is set if this body loses the upload."""
        with self._cond:
            if self._closed:
                raise OffsetConflict(f"upload {self.upload_id} is no longer held; start again from byte 0", 0)
            taken = self._detach(f"taken over by a new request at byte {self.offset}")
        if taken:
            self._commit()
        with self._cond:
            expected = self.expected()
            if offset != expected:
                raise OffsetConflict(f"upload {self.upload_id} continues at byte {expected}, not {offset}",
                                     expected)
            self._skip = self.offset - offset
            self._body, self._lost = body, threading.Event()
            self._cond.notify_all()
            return self._lost

    def take_over(self) -> int:
        """Park the upload (closing the connection that carries it, if any); the offset to continue at."""
        with self._cond:
            self._detach(f"taken over at byte {self.offset}")
        self._commit()
        return self.expected()

    def expected(self) -> int:
        """The byte a continuation starts at: the committed offset where the route keeps bytes durably."""
        durable = self.durable
        if durable is not None and durable.resumable:
            return min(durable.committed, self.offset)
        return self.offset

    def _commit(self) -> None:
        """The bytes written so far made durable before an offset is reported; a failure only keeps it lower."""
        if self.durable is not None:
            try:
                self.durable.commit()
            except OSError as err:
                log.warning("upload %s: cannot commit its bytes on disk: %s", self.upload_id, err)

    @property
    def parked(self) -> bool:
        with self._cond:
            return self._body is None and self.offset < self.length

    def close(self) -> None:
        """The import ended: a later continuation is refused."""
        with self._cond:
            self._closed = True
            self._body, self._lost = None, None  # its request answers on its connection
        if self.durable is not None:
            self.durable.close()

    def read(self, size: int, /) -> bytes:
        while True:
            body = self._wait_for_body()
            if body is None:
                return b""
            try:
                skip = self._skip
                data = body.read(min(skip, SKIP_SLICE) if skip else min(size, self.length - self.offset))
                if not data:
                    raise SourceError("the request body ended early")
            except (OSError, ImporterError) as err:
                if self._cancelled.is_set():
                    raise
                with self._cond:
                    lost = self._body is body
                    if lost:
                        self._detach(str(err))
                if lost:
                    self._commit()
                continue
            with self._cond:
                if self._body is not body:
                    continue  # taken over meanwhile: the new request resends these bytes
                if skip:
                    self._skip -= len(data)  # taken already (the continuation started at the committed offset)
                    continue
                self.offset += len(data)
            if self.durable is not None:
                self.durable.commit_if_due(self.offset)
            return data

    def _wait_for_body(self) -> BodyReader | None:
        while True:
            with self._cond:
                if self.offset >= self.length:
                    return None
                if self._body is not None:
                    return self._body
                if self._cancelled.is_set():
                    raise ImporterError("the upload was cancelled")
                left = self._parked_at + self._hold - time.monotonic()
                if left <= 0:
                    raise SourceError(f"upload {self.upload_id} broke at byte {self.offset} of {self.length} "
                                      f"({self._reason}) and was not resumed within {self._hold:g} s")
                self._cond.wait(min(left, WAIT_SLICE))
                # Bytes taken before the break may reach the target after the park's commit (a read-ahead
                # thread parks while the writer catches up): commit them too, so a restart loses nothing taken.
                behind = self._body is None and self.durable is not None and self.durable.behind()
            if behind:
                self._commit()

    def _detach(self, why: str) -> bool:
        """Under the lock: no body carries the upload any more; its connection is closed so its reader returns.

        True when one did.
        """
        body, lost = self._body, self._lost
        self._body, self._lost = None, None
        if body is None:
            return False
        self._parked_at, self._reason = time.monotonic(), why
        if lost is not None:
            lost.set()
        with contextlib.suppress(OSError):
            body.sock.shutdown(socket.SHUT_RDWR)
        return True


def wait_for_answer(done: threading.Event, lost: threading.Event | None) -> bool:
    """Until the import is done (True), or this request's connection lost the upload to a break (False)."""
    while not done.wait(WAIT_SLICE / 5):
        if lost is not None and lost.is_set():
            return done.is_set()
    return True

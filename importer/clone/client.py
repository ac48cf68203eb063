"""`hpp-importer clone-source`: stream a volume to the upload daemon (or upload server) of another node.

It asks first (GET with our content type) how much the target can hold, refuses a target smaller than the source
before a byte moves, then sends our sparse stream; after a broken connection it asks where the target stands and
continues from there. The connection, TLS and answer parsing are the upload client's.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from importer.clone.receiver import TargetTooSmall
from importer.clone.serve import CONTENT_TYPE_HEADER, PREALLOCATION_HEADER
from importer.clone.source import CloneSource
from importer.clone.wire import CONTENT_TYPE, END_HEAD, Digest, encode_block_parts, encode_header
from importer.deadline import DEFAULT_STALL_TIMEOUT
from importer.progress_bar import TransferProgress
from importer.units import human
from importer.upload_client import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_WAIT_READY,
    ID_HEADER,
    OFFSET_HEADER,
    USER_AGENT,
    Answer,
    Uploader,
    UploadError,
    UploadRequest,
    _Broken,
    _NotReady,
    _Reader,
)

FIRST_RETRY_DELAY = 0.25
ZSTD_LEVEL = 1  # fast: the link, not the CPU, should be what limits a clone


@dataclass(frozen=True)
class CloneRequest:
    url: str
    token: str
    ca_file: Path | None = None
    insecure: bool = False
    compress: bool = False
    preallocation: bool = False
    wait_ready: float = DEFAULT_WAIT_READY
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    response_timeout: float = 600.0
    retries: int = 5


@dataclass(frozen=True)
class CloneOutcome:
    disk_size: int
    data_bytes: int  # bytes of blocks holding data that were read
    sent: int  # bytes on the wire, all attempts
    seconds: float
    resumed: int

    def summary(self, what: str, url: str) -> str:
        rate = self.data_bytes / self.seconds if self.seconds > 0 else 0.0
        resumed = f", resumed {self.resumed} time(s)" if self.resumed else ""
        return (f"cloned {what} ({human(self.disk_size)} disk, {human(self.data_bytes)} of data, "
                f"{human(self.sent)} sent) to {url} in {self.seconds:.1f} s ({human(int(rate))}/s){resumed}")


@dataclass(frozen=True)
class TargetInfo:
    capacity: int
    block: bool
    offset: int


class CloneSender:
    """One clone: attempts until the target answers; the loop alone decides to retry, resume or give up."""

    def __init__(self, request: CloneRequest, progress: TransferProgress | None = None,
                 notice: Callable[[str], None] = lambda message: None) -> None:
        self.request = request
        # The upload client's connection handling (URL checks, TLS, connect errors) serves us as is.
        self._http = Uploader(UploadRequest(url=request.url, token=request.token, image=Path("/dev/null"),
                                            ca_file=request.ca_file, insecure=request.insecure,
                                            stall_timeout=request.stall_timeout,
                                            connect_timeout=request.connect_timeout,
                                            response_timeout=request.response_timeout))
        self.path = self._http.path
        self.url = self._http.url
        self.progress = progress
        self.notice = notice

    def run(self, source: CloneSource) -> CloneOutcome:
        started = time.monotonic()
        upload_id = source.manifest.upload_id(source.identity)  # of the whole source: known before the mode
        info = self._wait_for(lambda: self.target_info(upload_id))
        offset = info.offset
        if info.block:
            source = source.only_disk()
        if source.skipped:
            self.notice(f"not cloned (not regular files, or not for a block volume): {', '.join(source.skipped)}")
        if source.disk_size > info.capacity:  # the other files are small: they fit in the filesystem's overhead
            raise UploadError(str(TargetTooSmall(source.disk_size, info.capacity)))
        sent = resumed = 0
        breaks = 0
        while True:
            try:
                answer, count = self._attempt(source, upload_id, offset)
                sent += count
            except _Broken as err:
                breaks += 1
                if breaks > self.request.retries:
                    raise UploadError(f"{err}; giving up after {self.request.retries} retries (--retries)") from err
                self.notice(f"{err}; resuming (retry {breaks} of {self.request.retries})")
                time.sleep(FIRST_RETRY_DELAY)
                offset = self._wait_for(lambda: self.target_info(upload_id)).offset
                resumed += 1
                continue
            if answer.status == 409 and answer.offset is not None and breaks < self.request.retries:
                breaks += 1
                self.notice(f"{self.url} answered {answer.describe()}; continuing at byte {answer.offset}")
                offset = answer.offset
                continue
            break
        if answer.status // 100 != 2:
            raise UploadError(f"clone to {self.url} refused: {answer.describe()}")
        return CloneOutcome(source.disk_size, source.data_bytes(), sent, time.monotonic() - started, resumed)

    def _wait_for(self, ask: Callable[[], TargetInfo]) -> TargetInfo:
        deadline = time.monotonic() + self.request.wait_ready
        delay = FIRST_RETRY_DELAY
        while True:
            try:
                return ask()
            except _NotReady as err:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UploadError(f"{self.url} was not ready within {self.request.wait_ready:g} s (--wait-ready):"
                                      f" {err}") from err
                self.notice(f"{self.url} is not ready ({err}); retrying")
                time.sleep(min(delay, left))
                delay = min(delay * 2, 2.0)

    def _headers(self, method: str, upload_id: str) -> list[str]:
        return [f"{method} {self.path} HTTP/1.1", f"Host: {self._http.host_header}", f"User-Agent: {USER_AGENT}",
                f"Authorization: Bearer {self.request.token}", f"{CONTENT_TYPE_HEADER}: {CONTENT_TYPE}",
                f"{ID_HEADER}: {upload_id}", "Connection: close"]

    def target_info(self, upload_id: str) -> TargetInfo:
        """What the target can hold, its mode, and where an interrupted clone of upload_id stands (0: none)."""
        sock = self._http._connect()
        try:
            reader = _Reader(sock)
            sock.sendall(("\r\n".join(self._headers("GET", upload_id)) + "\r\n\r\n").encode())
            sock.settimeout(self.request.response_timeout)
            answer = self._http._answer(reader)
        except (OSError, ValueError) as err:
            raise _NotReady(f"asking the target failed: {err}") from err
        finally:
            sock.close()
        if answer.status == 503:
            raise _NotReady(f"it answered {answer.describe()}")
        if answer.status != 200:
            raise UploadError(f"{self.url} refused the clone: {answer.describe()}")
        try:
            doc = json.loads(answer.text)
            info = TargetInfo(int(doc["capacity"]), doc["volumeMode"] == "block", int(doc["offset"]))
        except (ValueError, KeyError, TypeError) as err:
            raise UploadError(f"{self.url} is not a clone target (it answered {answer.text[:80]!r})") from err
        if info.offset:
            self.notice(f"the target holds this clone up to byte {info.offset}; resuming there")
        return info

    def _attempt(self, source: CloneSource, upload_id: str, offset: int) -> tuple[Answer, int]:
        sock = self._http._connect()
        sent = 0
        try:
            reader = _Reader(sock)
            lines = [*self._headers("POST", upload_id), "Content-Type: application/octet-stream",
                     "Transfer-Encoding: chunked", f"{OFFSET_HEADER}: {offset}"]
            if self.request.preallocation:
                lines.append(f"{PREALLOCATION_HEADER}: true")
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            sock.settimeout(self.request.stall_timeout or None)
            try:
                # One chunk per record; the payload goes out of the reader's buffer, never copied, and the small
                # pieces around it travel with the next head (no tiny segment left waiting for an ACK).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                pending = b""
                for head, payload in self._records(source, offset):
                    sock.sendall(b"%s%x\r\n%s" % (pending, len(head) + len(payload), head))
                    if payload:
                        sock.sendall(payload)
                    pending = b"\r\n"
                    sent += len(head) + len(payload)
                sock.sendall(pending + b"0\r\n\r\n")
            except OSError as err:
                answer = self._http._answer_after_break(sock, reader)
                if answer is not None:
                    return answer, sent
                raise _Broken(f"the connection to {self._http.host}:{self._http.port} broke after {sent} bytes: "
                              f"{err.strerror or err}") from err
            finally:
                if self.progress is not None:
                    self.progress.finish()
            sock.settimeout(self.request.response_timeout)
            try:
                return self._http._answer(reader), sent
            except (OSError, ValueError) as err:
                raise _Broken(f"no answer after the whole clone was sent: {err}") from err
        finally:
            sock.close()

    def _records(self, source: CloneSource, offset: int) -> Iterator[tuple[bytes, bytes | memoryview]]:
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL) if self.request.compress else None
        digest = Digest()
        done = 0
        total = source.data_bytes()
        if self.progress is not None:
            self.progress.restart(total, 0)

        def count(length: int) -> None:
            nonlocal done
            done += length
            if self.progress is not None:
                self.progress.update(done)

        yield encode_header(source.manifest, compressor is not None, offset), b""
        for file, block_offset, data in source.blocks(offset, digest, count):
            yield encode_block_parts(file, block_offset, data, compressor)
        yield END_HEAD + digest.final(source.manifest), b""

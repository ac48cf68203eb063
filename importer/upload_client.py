"""`hpp-importer upload`: stream a disk image to an upload server with a bearer token.

Speaks CDI's upload protocol (POST /v1beta1/upload[-form][-async], `Authorization: Bearer <token>`), so the same
client serves our node daemon, our `upload-server`, and CDI's upload proxy. One attempt is one connection; the
loop around attempts (Uploader.run) is the only place that decides to wait, retry or give up.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import queue
import re
import secrets
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from importer.deadline import DEFAULT_STALL_TIMEOUT
from importer.errors import ConfigError, ImporterError
from importer.progress_bar import TransferProgress
from importer.units import KiB, MiB, human
from importer.units import parse_duration as parse_duration  # its home before importer.units

API_PREFIX = "/v1beta1"
USER_AGENT = "hpp-importer"
BLOCK = MiB  # one read of the image, by the reader thread
FIRST_SEND = 64 * KiB  # one send at first; it grows to BLOCK while sends finish well within the stall timeout
MIN_SEND = 16 * KiB  # one TLS record
PREFETCH = 4  # blocks read ahead of the socket
ANSWER_LIMIT = 64 * KiB  # an error text longer than this is not a message, it is noise
MESSAGE_LIMIT = 300  # characters of the server's text kept in our one-line error
DEFAULT_WAIT_READY = 60.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_RESPONSE_TIMEOUT = 3600.0  # a synchronous upload answers only after conversion, which can take long
DEFAULT_CONTINUE_WAIT = 1.0  # as curl: a server that never answers `Expect: 100-continue` gets the body anyway
EARLY_ANSWER_WAIT = 2.0  # after the server cut the body short, how long its reason may take to arrive
FIRST_RETRY_DELAY = 0.25
MAX_RETRY_DELAY = 2.0
DEFAULT_RETRIES = 5  # resumptions after a broken connection
ID_SAMPLE = MiB  # the upload id covers the image's size, mtime and first and last MiB
# The resume protocol (docs/upload.md); the server's names live in importer.serve.resume.
ID_HEADER, LENGTH_HEADER, OFFSET_HEADER, CHECKSUM_HEADER = "Upload-Id", "Upload-Length", "Upload-Offset", \
    "Upload-Checksum"


class UploadError(ImporterError):
    """The upload failed: the server refused it, the connection broke, or a deadline fired."""


def endpoint_path(base_path: str, asynchronous: bool, form: bool) -> str:
    """/v1beta1/upload, -form, -async, -form-async, below whatever path the URL already has (a proxy prefix)."""
    return f"{base_path.rstrip('/')}{API_PREFIX}/upload{'-form' if form else ''}{'-async' if asynchronous else ''}"


def read_token(token: str | None, token_file: Path | None) -> str:
    """The bearer token from --token or --token-file, refused if it could break the header it travels in."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as err:
            raise ConfigError(f"cannot read the token file {token_file}: {err.strerror or err}") from err
        except UnicodeDecodeError as err:
            raise ConfigError(f"the token file {token_file} is not text") from err
    token = (token or "").strip()
    if not token:
        raise ConfigError("no token: pass --token TOKEN or --token-file FILE")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError("invalid token: expected one word of printable ASCII characters")
    return token


def tls_context(ca_file: Path | None, insecure: bool) -> ssl.SSLContext:
    """Verification against --ca alone when given, else the system store; --insecure verifies nothing."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"cannot load the CA certificate {ca_file}: {getattr(err, 'strerror', None) or err}") \
            from err
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class UploadRequest:
    url: str
    token: str
    image: Path
    ca_file: Path | None = None
    insecure: bool = False
    asynchronous: bool = False
    form: bool = False
    wait_ready: float = DEFAULT_WAIT_READY  # how long 503s and refused connections are retried
    stall_timeout: float = DEFAULT_STALL_TIMEOUT  # the server accepts no byte of the body for this long: fail
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT  # TCP connect plus TLS handshake
    response_timeout: float = DEFAULT_RESPONSE_TIMEOUT  # from the last byte sent to the server's answer
    continue_wait: float = DEFAULT_CONTINUE_WAIT
    retries: int = DEFAULT_RETRIES  # how many times a broken connection is resumed (or restarted)
    resume: bool = True  # send the resume headers (never with --form)


@dataclass(frozen=True)
class Answer:
    """The server's final HTTP answer: status, reason phrase and its text, already on one line."""

    status: int
    reason: str
    text: str
    offset: int | None = None  # Upload-Offset: where the server wants a resumable upload to continue

    def describe(self) -> str:
        return f"{self.status} {self.reason}" + (f": {self.text}" if self.text else "")


@dataclass(frozen=True)
class UploadResult:
    url: str
    size: int
    seconds: float
    answer: Answer
    asynchronous: bool

    def summary(self, image: Path) -> str:
        rate = self.size / self.seconds if self.seconds > 0 else 0.0
        what = "accepted; the server converts it in the background" if self.asynchronous else "complete"
        return (f"uploaded {image} ({human(self.size)}) to {self.url} in {self.seconds:.1f} s "
                f"({human(int(rate))}/s): {self.answer.status} {self.answer.reason}, {what}")


class _NotReady(Exception):
    """This attempt met a server that is not up yet or busy: worth another try until --wait-ready expires."""


class _Broken(UploadError):
    """The connection broke while the body was sent: a resumable upload asks where to continue and goes on."""


class ImageFile:
    """The local image, opened once: a regular file or a block device, whose size must not change under us."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise ConfigError(f"cannot open the image {path}: {err.strerror or err}") from err
        mode = os.fstat(self.fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            os.close(self.fd)
            raise ConfigError(f"the image {path} is not a regular file or block device (its size must be known)")
        self.size = os.lseek(self.fd, 0, os.SEEK_END)

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill view from offset (no allocation per block: the same buffers go round)."""
        got = 0
        while got < len(view):
            n = os.preadv(self.fd, [view[got:]], offset + got)
            if n == 0:
                raise UploadError(f"the image {self.path} shrank while uploading: {offset + got} bytes readable, "
                                  f"{self.size} announced")
            got += n

    def upload_id(self) -> str:
        """Stable for one image: a client started again with the same file finds its interrupted upload."""
        digest = hashlib.sha256(f"{self.size}:{os.fstat(self.fd).st_mtime_ns}:".encode())
        digest.update(os.pread(self.fd, ID_SAMPLE, 0))
        digest.update(os.pread(self.fd, ID_SAMPLE, max(0, self.size - ID_SAMPLE)))
        return digest.hexdigest()[:40]

    def sha256(self) -> str:
        """The whole image's digest, checked by the server over all the bytes it took, across connections."""
        digest = hashlib.sha256()
        blocks = Prefetcher(self, 0)  # reading the next block overlaps hashing this one
        try:
            for block in blocks.blocks():
                digest.update(block)  # hashlib lets go of the GIL on large buffers
        finally:
            blocks.close()
        return digest.hexdigest()

    def close(self) -> None:
        os.close(self.fd)


def next_send_size(size: int, seconds: float, stall: float) -> int:
    """The next send's size: one send must finish within the stall timeout (it is one deadline for the whole
    send), so sends grow to BLOCK while they take under 1/8 of it and shrink when one takes over 1/4."""
    if stall <= 0 or seconds < stall / 8:
        return min(size * 2, BLOCK)
    if seconds > stall / 4:
        return max(size // 2, MIN_SEND)
    return size


class Prefetcher:
    """Reads the image from offset on in a thread, BLOCK at a time into a few reused buffers, so reading the
    file overlaps encrypting and sending; the sending thread takes blocks in order and hands each buffer back."""

    def __init__(self, image: ImageFile, offset: int) -> None:
        self._image = image
        self._full: queue.Queue[tuple[memoryview, int] | BaseException | None] = queue.Queue()
        self._free: queue.Queue[memoryview | None] = queue.Queue()
        for _ in range(PREFETCH):
            self._free.put(memoryview(bytearray(BLOCK)))
        self._thread = threading.Thread(target=self._run, args=(offset,), name="image-reader", daemon=True)
        self._thread.start()

    def _run(self, offset: int) -> None:
        try:
            while offset < self._image.size and (buf := self._free.get()) is not None:
                count = min(BLOCK, self._image.size - offset)
                self._image.read_into(offset, buf[:count])
                self._full.put((buf, count))
                offset += count
            self._full.put(None)
        except BaseException as err:  # handed to the sending thread
            self._full.put(err)

    def blocks(self) -> Iterator[memoryview]:
        """The image's blocks in order; a block's buffer is reused once the next block is asked for."""
        while (item := self._full.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            buf, count = item
            yield buf[:count]
            self._free.put(buf)

    def close(self) -> None:
        self._free.put(None)
        self._thread.join()


@dataclass(frozen=True)
class Resume:
    """A resumable upload's identity: its id and the whole image's checksum."""

    upload_id: str
    checksum: str


class Body:
    """What follows the request headers: the image alone, or the image as multipart form field `file`."""

    def __init__(self, image: ImageFile, form: bool) -> None:
        self.image = image
        if form:
            boundary = secrets.token_hex(16)  # 128 random bits: never met inside an image by chance
            # The name is a courtesy; servers must not let it choose a path (ours ignore it).
            name = re.sub(r'[^A-Za-z0-9._+-]', "_", image.path.name) or "disk.img"
            self.prefix = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                           "Content-Type: application/octet-stream\r\n\r\n").encode()
            self.suffix = f"\r\n--{boundary}--\r\n".encode()
            self.content_type = f"multipart/form-data; boundary={boundary}"
        else:
            self.prefix = self.suffix = b""
            self.content_type = "application/octet-stream"
        self.length = len(self.prefix) + image.size + len(self.suffix)


class Uploader:
    """Runs attempts until one gets a final answer, retrying a busy or absent server until --wait-ready expires."""

    def __init__(self, request: UploadRequest, progress: TransferProgress | None = None,
                 notice: Callable[[str], None] = lambda message: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        parts = urlsplit(request.url)
        try:
            port = parts.port or 443
        except ValueError as err:
            raise ConfigError(f"invalid URL {request.url!r}: {err}") from err
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError(f"invalid URL {request.url!r}: expected https://HOST[:PORT] (the token is a secret)")
        if parts.query or parts.fragment or not parts.path.isascii() or not parts.path.isprintable() \
                or " " in parts.path:
            raise ConfigError(f"invalid URL {request.url!r}: expected a plain path prefix, no query or fragment")
        self.request = request
        self.host, self.port = parts.hostname, port
        self.host_header = parts.netloc.rpartition("@")[2]
        self.path = endpoint_path(parts.path, request.asynchronous, request.form)
        self.url = f"https://{self.host_header}{self.path}"
        self.progress = progress
        self.notice = notice
        self.clock = clock
        self.context = tls_context(request.ca_file, request.insecure)

    def run(self) -> UploadResult:
        image = ImageFile(self.request.image)
        try:
            return self._run(image)
        finally:
            image.close()

    def _run(self, image: ImageFile) -> UploadResult:
        body = Body(image, self.request.form)
        resume = None
        if self.request.resume and not self.request.form:
            resume = Resume(image.upload_id(), f"sha256:{image.sha256()}")
        deadline = self.clock() + self.request.wait_ready
        delay = FIRST_RETRY_DELAY
        breaks = 0
        offset: int | None = None  # None: ask the server
        started = self.clock()
        while True:
            try:
                if offset is None:
                    offset = self._ask_offset(resume, image.size) if resume is not None else 0
                answer = self._attempt(body, resume, offset)
            except _NotReady as err:
                waiting_for = str(err)
            except _Broken as err:
                if resume is None:
                    raise
                breaks += 1
                if breaks > self.request.retries:
                    self.notice(f"giving up after {self.request.retries} retries (--retries)")
                    raise
                self.notice(f"{err}; resuming (retry {breaks} of {self.request.retries})")
                offset, deadline, delay = None, self.clock() + self.request.wait_ready, FIRST_RETRY_DELAY
                time.sleep(FIRST_RETRY_DELAY)
                continue
            else:
                if answer.status == 409 and resume is not None and answer.offset is not None \
                        and breaks < self.request.retries:
                    breaks += 1
                    self.notice(f"{self.url} answered {answer.describe()}; continuing at byte {answer.offset}")
                    offset = answer.offset
                    continue
                if answer.status != 503:
                    break
                waiting_for = f"it answered {answer.describe()}"
                offset = None
            left = deadline - self.clock()
            if left <= 0:
                raise UploadError(f"{self.url} was not ready to take the upload within {self.request.wait_ready:g} s "
                                  f"(--wait-ready); last time {waiting_for}")
            self.notice(f"{self.url} is not ready ({waiting_for}); retrying for up to {left:.0f} s more")
            time.sleep(min(delay, left))
            delay = min(delay * 2, MAX_RETRY_DELAY)
        if answer.status // 100 != 2:
            raise UploadError(f"upload to {self.url} refused: {answer.describe()}")
        return UploadResult(self.url, image.size, self.clock() - started, answer, self.request.asynchronous)

    # -- one attempt: one connection -------------------------------------------------------------------

    def _attempt(self, body: Body, resume: Resume | None, offset: int) -> Answer:
        sock = self._connect()
        try:
            reader = _Reader(sock)
            sock.sendall(self._head(body, resume, offset))
            early = self._await_continue(sock, reader)
            if early is not None:
                return early
            return self._send_body(sock, reader, body, offset)
        finally:
            sock.close()

    def _ask_offset(self, resume: Resume, size: int) -> int:
        """Where the server stands with this image's upload: HEAD with its id; 0 when it holds none."""
        sock = self._connect()
        try:
            reader = _Reader(sock)
            lines = [f"HEAD {self.path} HTTP/1.1", f"Host: {self.host_header}", f"User-Agent: {USER_AGENT}",
                     f"Authorization: Bearer {self.request.token}", f"{ID_HEADER}: {resume.upload_id}",
                     "Connection: close"]
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            sock.settimeout(self.request.stall_timeout or self.request.response_timeout)
            status, _reason = self._status_line(reader)
            headers = http.client.parse_headers(reader)
        except (OSError, http.client.HTTPException, ValueError) as err:
            raise _NotReady(f"asking where the upload stands failed: {err}") from err
        finally:
            sock.close()
        offset, length = _offset(headers.get(OFFSET_HEADER)), _offset(headers.get(LENGTH_HEADER))
        if status == 503:
            raise _NotReady("it answered 503 to the resume query")
        if status != 200 or offset is None or length != size or offset >= size:
            return 0  # no interrupted upload of this image there (or a server that does not resume: CDI)
        self.notice(f"{self.host} holds {offset} of {size} bytes of this image; resuming at byte {offset}")
        return offset

    def _connect(self) -> ssl.SSLSocket:
        timeout = self.request.connect_timeout
        try:
            raw = socket.create_connection((self.host, self.port), timeout=timeout)
        except ConnectionRefusedError as err:
            raise _NotReady(f"the connection to {self.host}:{self.port} was refused") from err
        except TimeoutError as err:
            raise UploadError(f"no answer from {self.host}:{self.port} within {timeout:g} s (--connect-timeout)") \
                from err
        except OSError as err:
            raise UploadError(f"cannot connect to {self.host}:{self.port}: {err.strerror or err}") from err
        try:
            return self.context.wrap_socket(raw, server_hostname=self.host)  # handshake under the same timeout
        except ssl.SSLCertVerificationError as err:
            raw.close()
            raise UploadError(f"TLS verification of {self.host} failed: {err.verify_message}; pass --ca FILE with "
                              "the server's CA certificate (or --insecure to skip verification)") from err
        except TimeoutError as err:
            raw.close()
            raise UploadError(f"TLS handshake with {self.host}:{self.port} took over {timeout:g} s "
                              "(--connect-timeout)") from err
        except (ssl.SSLError, OSError) as err:
            raw.close()
            raise UploadError(f"TLS handshake with {self.host}:{self.port} failed: {err}") from err

    def _head(self, body: Body, resume: Resume | None, offset: int) -> bytes:
        lines = [
            f"POST {self.path} HTTP/1.1",
            f"Host: {self.host_header}",
            f"User-Agent: {USER_AGENT}",
            f"Authorization: Bearer {self.request.token}",
            f"Content-Type: {body.content_type}",
            f"Content-Length: {body.length - offset}",
            "Expect: 100-continue",  # a busy or refusing server answers before we send gigabytes for nothing
            "Connection: close",
        ]
        if resume is not None:
            lines += [f"{ID_HEADER}: {resume.upload_id}", f"{LENGTH_HEADER}: {body.length}",
                      f"{OFFSET_HEADER}: {offset}", f"{CHECKSUM_HEADER}: {resume.checksum}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _await_continue(self, sock: ssl.SSLSocket, reader: _Reader) -> Answer | None:
        """The final answer if the server gives one before the body (401, 503 ...); None means send the body."""
        sock.settimeout(self.request.continue_wait)
        try:
            try:
                status, reason = self._status_line(reader)
            except TimeoutError:
                return None  # a server that ignores Expect: it reads the body when it comes
            sock.settimeout(self.request.stall_timeout or self.request.response_timeout)
            headers = http.client.parse_headers(reader)
            if status == 100:
                return None
            return Answer(status, reason, self._text(reader, headers), _offset(headers.get(OFFSET_HEADER)))
        except (OSError, http.client.HTTPException, ValueError) as err:
            # Also how a server that wants a client certificate says so under TLS 1.3: an alert on first read.
            raise UploadError(f"{self.host}:{self.port} broke the connection before the upload started: {err}") \
                from err

    def _send_body(self, sock: ssl.SSLSocket, reader: _Reader, body: Body, offset: int = 0) -> Answer:
        """Streams the body from offset (a resumed upload; never with a form); every send must make progress
        within the stall timeout."""
        stall = self.request.stall_timeout
        sock.settimeout(stall if stall > 0 else None)
        image, sent = body.image, offset
        if self.progress is not None:
            self.progress.restart(body.length, offset)
        prefetch = Prefetcher(image, offset)
        try:
            sock.sendall(body.prefix)
            step = FIRST_SEND
            for block in prefetch.blocks():
                while block:
                    piece, block = block[:step], block[step:]
                    began = time.monotonic()
                    sock.sendall(piece)
                    step = next_send_size(step, time.monotonic() - began, stall)
                    sent += len(piece)
                    if self.progress is not None:
                        self.progress.update(len(body.prefix) + sent)
            sock.sendall(body.suffix)
            if self.progress is not None:
                self.progress.update(body.length)
        except TimeoutError as err:
            raise _Broken(f"the server accepted no data for {stall:g} s after {sent} of {image.size} bytes: "
                          "stall timeout (--stall-timeout)") from err
        except OSError as err:
            # The server may have stopped reading to say why (409, 400, a 503 when it got busy): read that.
            answer = self._answer_after_break(sock, reader)
            if answer is not None:
                return answer
            raise _Broken(f"the connection to {self.host}:{self.port} broke after {sent} of {image.size} "
                          f"bytes: {err.strerror or err}") from err
        finally:
            prefetch.close()
            if self.progress is not None:
                self.progress.finish()
        if not self.request.asynchronous:
            self.notice(f"all {image.size} bytes sent; waiting for {self.host} to write the disk")
        sock.settimeout(self.request.response_timeout)
        try:
            return self._answer(reader)
        except TimeoutError as err:
            raise UploadError(f"no answer from {self.host} within {self.request.response_timeout:g} s after the "
                              "whole image was sent (--response-timeout)") from err
        except (OSError, http.client.HTTPException, ValueError) as err:
            raise UploadError(f"{self.host} closed the connection without an answer after the whole image was "
                              f"sent: {err}") from err

    def _answer_after_break(self, sock: ssl.SSLSocket, reader: _Reader) -> Answer | None:
        try:
            sock.settimeout(EARLY_ANSWER_WAIT)
            return self._answer(reader)
        except (OSError, http.client.HTTPException, ValueError):
            return None

    def _answer(self, reader: _Reader) -> Answer:
        """The final answer, skipping interim 1xx answers that arrive late."""
        while True:
            status, reason = self._status_line(reader)
            headers = http.client.parse_headers(reader)
            if status >= 200:
                return Answer(status, reason, self._text(reader, headers), _offset(headers.get(OFFSET_HEADER)))

    @staticmethod
    def _status_line(reader: _Reader) -> tuple[int, str]:
        line = reader.readline(1024)
        if not line:
            raise http.client.RemoteDisconnected("the server closed the connection without an answer")
        match = re.match(rb"HTTP/1\.[01] (\d{3})(?: (.*))?\r?\n$", line)
        if match is None:
            raise http.client.BadStatusLine(line.decode("latin-1").strip())
        return int(match.group(1)), (match.group(2) or b"").decode("latin-1").strip()

    @staticmethod
    def _text(reader: _Reader, headers: http.client.HTTPMessage) -> str:
        """The answer's body as text, bounded: Content-Length, chunked, or up to the close."""
        data = b""
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            while len(data) < ANSWER_LIMIT:
                size = int(reader.readline(64).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                data += reader.read(min(size, ANSWER_LIMIT - len(data)))
                if len(data) >= ANSWER_LIMIT:
                    break
                reader.readline(8)
        elif headers.get("Content-Length") is not None:
            data = reader.read(min(int(headers["Content-Length"]), ANSWER_LIMIT))
        else:
            try:
                data = reader.read(ANSWER_LIMIT)
            except OSError:
                data = reader.drain()  # what arrived before the connection broke is all the text there is
        return one_line(data.decode("utf-8", errors="replace"))


def _offset(text: str | None) -> int | None:
    return int(text.strip()) if text is not None and text.strip().isdigit() else None


class _Reader:
    """Lines and bytes from the socket through our own buffer: a timeout (no early answer) loses nothing.

    (A socket's makefile() refuses every read after one timed out, and the wait for 100 Continue times out
    whenever the server ignores Expect.)
    """

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def _fill(self) -> bool:
        data = self._sock.recv(64 * KiB)
        self._buffer += data
        return bool(data)

    def _take(self, count: int) -> bytes:
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def readline(self, limit: int = -1) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                return self._take(end + 1 if limit < 0 else min(end + 1, limit))
            if 0 <= limit <= len(self._buffer) or not self._fill():
                return self._take(len(self._buffer) if limit < 0 else limit)

    def read(self, size: int) -> bytes:
        while len(self._buffer) < size and self._fill():
            pass
        return self._take(size)

    def drain(self) -> bytes:
        return self._take(len(self._buffer))

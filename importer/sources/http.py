"""HTTP(S) source: resumable streaming with Python's http.client, random access through nbdkit's curl plugin."""

from __future__ import annotations

import base64
import contextlib
import http.client
import logging
import re
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from importer.deadline import (
    DEFAULT_MIN_RATE,
    DEFAULT_MIN_RATE_WINDOW,
    DEFAULT_STALL_TIMEOUT,
    Deadlines,
    NbdkitLogCounter,
    ProgressWatch,
)
from importer.errors import ConfigError, SourceError, ToolError, TransferError
from importer.formats import HEADER_SIZE
from importer.pipeline import read_full
from importer.sources.base import Source, SourceInfo

log = logging.getLogger(__name__)

USER_AGENT = "hpp-importer"
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass
class HttpOptions:
    """Everything about talking to the server that is not the URL."""

    insecure_tls: bool = False
    cert_dir: Path | None = None
    username: str | None = None
    password: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    stall_timeout: float = DEFAULT_STALL_TIMEOUT  # seconds without a byte, across reconnections, before failing
    min_rate: int = DEFAULT_MIN_RATE  # bytes/s the source must average over min_rate_window
    min_rate_window: float = DEFAULT_MIN_RATE_WINDOW
    retries: int = 5  # consecutive failures without progress before giving up
    retry_delay: float = 1.0  # first backoff; doubles on each consecutive failure
    max_redirects: int = 10

    @property
    def deadlines(self) -> Deadlines:
        return Deadlines(self.stall_timeout, self.min_rate, self.min_rate_window)

    @property
    def io_timeout(self) -> float:
        """One socket operation's timeout: half the stall timeout, so a dead connection is retried once in time."""
        return self.stall_timeout / 2 if self.stall_timeout > 0 else DEFAULT_STALL_TIMEOUT


def parse_header(text: str) -> tuple[str, str]:
    """`Name: value` as CDI's IMPORTER_EXTRA_HEADER_<n> carries it."""
    name, sep, value = text.partition(":")
    if not sep or not name.strip() or any(c in name for c in " \t\r\n") or "\n" in value or "\r" in value:
        raise ConfigError(f"invalid extra header {text!r}: expected 'Name: value'")
    return name.strip(), value.strip()


class HttpSource(Source):
    watch: ProgressWatch

    def __init__(self, url: str, options: HttpOptions | None = None) -> None:
        try:  # urlsplit and .port raise ValueError on "http://[" or a port above 65535
            parts = urlsplit(url)
            origin = (parts.scheme, parts.hostname, parts.port)
        except ValueError as err:
            raise ConfigError(f"invalid HTTP endpoint {url!r}: {err}") from err
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"invalid HTTP endpoint {url!r}: expected http:// or https:// with a host")
        self.url = url
        self.options = options or HttpOptions()
        self.description = url
        self._origin = origin
        self._ssl = self._ssl_context()  # also for a redirect from http:// to https://
        self.size: int | None = None  # as probed; ranged reads check every answer against it
        self.watch = ProgressWatch(self.options.deadlines)

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        for cert in self._ca_files():
            try:
                ctx.load_verify_locations(cafile=str(cert))
            except (ssl.SSLError, OSError) as err:
                log.warning("ignoring %s in the certificate directory: %s", cert, err)
        if self.options.insecure_tls:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _ca_files(self) -> list[Path]:
        directory = self.options.cert_dir
        if directory is None:
            return []
        if not directory.is_dir():
            raise ConfigError(f"certificate directory {directory} does not exist")
        # Kubernetes ConfigMap mounts hold ..data symlinks and timestamped dirs; only plain files are certs.
        return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))

    # -- requests -----------------------------------------------------------------------------------

    def _headers(self, url: str, offset: int | None, end: int | None) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        headers.update(dict(self.options.headers))
        parts = urlsplit(url)
        # Credentials go to the host the user named, never to wherever a redirect points (as curl does).
        if self.options.username is not None and (parts.scheme, parts.hostname, parts.port) == self._origin:
            token = f"{self.options.username}:{self.options.password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        if offset is not None:
            headers["Range"] = f"bytes={offset}-" + ("" if end is None else str(end))
        return headers

    def get(self, offset: int | None = None, end: int | None = None) -> http.client.HTTPResponse:
        """GET following redirects; returns a 200, 206 or 416 response, raises SourceError for the rest."""
        url = self.url
        chain = [url]
        for _ in range(self.options.max_redirects + 1):
            parts = urlsplit(url)
            conn: http.client.HTTPConnection
            if parts.scheme == "https":
                conn = http.client.HTTPSConnection(
                    parts.hostname or "", parts.port, timeout=self.options.io_timeout, context=self._ssl
                )
            else:
                conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=self.options.io_timeout)
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            try:
                conn.request("GET", path, headers=self._headers(url, offset, end))
                resp = conn.getresponse()
            except ssl.SSLCertVerificationError as err:
                conn.close()
                raise SourceError(f"TLS verification of {parts.netloc} failed: {err.verify_message}; "
                                  "add its CA with --cert-dir (IMPORTER_CERT_DIR)") from err
            except BaseException:
                conn.close()
                raise
            if resp.status in _REDIRECTS and resp.getheader("Location"):
                conn.close()
                url = next_hop(url, resp.status, resp.getheader("Location", ""), chain)
                chain.append(url)
                continue
            if resp.status in (200, 206, 416):
                return resp
            conn.close()
            hint = " (check IMPORTER_ACCESS_KEY_ID / IMPORTER_SECRET_KEY)" if resp.status in (401, 403) else ""
            raise SourceError(f"GET {url}: HTTP {resp.status} {resp.reason}{hint}")
        raise SourceError(f"GET {self.url}: too many redirects (more than {self.options.max_redirects}): "
                          f"{' -> '.join(chain[:3])} -> ... -> {chain[-1]}")

    def probe(self) -> SourceInfo:
        failures = 0
        while True:
            try:
                return self._probe_once()
            except (OSError, http.client.HTTPException) as err:
                self.watch.check()
                failures += 1
                if failures > self.options.retries:
                    raise SourceError(f"cannot reach {self.url}: {_describe(err)}") from err
                time.sleep(min(self.options.retry_delay * 2 ** (failures - 1), max(0.0, self.watch.stall_left())))

    def _probe_once(self) -> SourceInfo:
        with contextlib.closing(self.get(0, HEADER_SIZE - 1)) as resp:
            if resp.status == 416:  # an empty file cannot satisfy bytes=0-511
                return SourceInfo(size=0, random_access=False, header=b"")
            total = _total_size(resp)
            # nbdkit's curl plugin refuses servers that do not say Accept-Ranges: bytes, even if they honour Range.
            accepts = resp.getheader("Accept-Ranges", "").strip().lower() == "bytes"
            random_access = resp.status == 206 and accepts
            header = read_full(_WatchedResponse(resp, self.watch), HEADER_SIZE)
        self.size = total
        return SourceInfo(size=total, random_access=random_access, header=header)

    def open(self) -> HttpStream:
        return HttpStream(self)

    def open_range(self, start: int, end: int) -> HttpStream:
        """Bytes [start, end) in one Range request, resumed from where it broke off like open()."""
        return HttpStream(self, start, end)

    # -- random access through nbdkit -----------------------------------------------------------------

    def qemu_input(self, stack: contextlib.ExitStack, workdir: Path) -> str:
        """Serve the URL as an NBD export over a Unix socket; qemu-img then reads only what it needs."""
        sock = workdir / "nbdkit.sock"
        logfile = workdir / "nbdkit.log"
        opts = self.options
        requests = workdir / "nbdkit-requests.log"
        # The log filter records every read nbdkit answers: how the deadlines see progress on this route.
        # protocols= also limits redirects: curl never follows one to file:// or anything but HTTP(S).
        cmd = [
            "nbdkit", "--exit-with-parent", "--foreground", "--readonly", "--unix", str(sock),
            "--filter=log", "--filter=retry", "curl", f"url={self.url}", "protocols=http,https", f"logfile={requests}",
            f"retries={opts.retries}", f"retry-delay={max(1, round(opts.retry_delay))}",
        ]
        if opts.stall_timeout > 0:
            cmd.append(f"timeout={max(1, round(opts.stall_timeout))}")
        if opts.username is not None:
            secret = workdir / "password"
            secret.touch(mode=0o600)
            secret.write_text(opts.password or "")
            cmd += [f"user={opts.username}", f"password=+{secret}"]  # never on the command line
        if opts.insecure_tls:
            cmd.append("sslverify=false")
        if opts.cert_dir is not None:
            bundle = workdir / "ca-bundle.pem"
            pems = [SYSTEM_CA_BUNDLE] if SYSTEM_CA_BUNDLE.exists() else []
            bundle.write_text("\n".join(p.read_text(errors="replace") for p in [*pems, *self._ca_files()]))
            cmd.append(f"cainfo={bundle}")
        cmd += [f"header={name}: {value}" for name, value in opts.headers]
        try:
            log_handle = logfile.open("wb")
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_handle, stderr=log_handle)
        except OSError as err:
            raise ToolError(f"cannot start nbdkit: {err}") from err
        stack.callback(_stop, proc, log_handle)
        deadline = time.monotonic() + 15
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ToolError(f"nbdkit did not start: {last_line(logfile)}")
            time.sleep(0.02)
        self.nbdkit_log = logfile
        self.served = NbdkitLogCounter(requests)
        return f"nbd+unix:///?socket={sock}"


def last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"


def _stop(proc: subprocess.Popen[bytes], log_handle: object) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    close = getattr(log_handle, "close", None)
    if close is not None:
        close()


def _total_size(resp: http.client.HTTPResponse) -> int | None:
    """The full size of the resource from Content-Range (206) or Content-Length (200)."""
    if resp.status == 206:
        match = _CONTENT_RANGE.match(resp.getheader("Content-Range", ""))
        if match and match.group(3) != "*":
            return int(match.group(3))
        return None
    length = resp.getheader("Content-Length")
    return int(length) if length and length.isdigit() else None


class HttpStream:
    """The body as a stream that survives dropped connections: it reconnects with Range where it left off."""

    def __init__(self, source: HttpSource, start: int = 0, end: int | None = None) -> None:
        self._source = source
        self._opts = source.options
        self._resp: http.client.HTTPResponse | None = None
        self._pos = start
        self._end = end  # exclusive; None: to the end of the resource
        self._size: int | None = None if end is None else source.size
        self._failures = 0
        self._last_error = ""

    def read(self, size: int, /) -> bytes:
        while True:
            try:
                if self._resp is None:
                    self._connect()
                assert self._resp is not None
                # read1: whatever arrived, so a trickling server is measured instead of waited for.
                data = self._resp.read1(size)
                if data:
                    self._pos += len(data)
                    self._failures = 0
                    self._source.watch.received(len(data))
                    self._source.watch.check()
                    return data
                until = self._size if self._end is None else self._end
                if until is not None and self._pos < until:
                    raise http.client.IncompleteRead(b"", until - self._pos)
                return b""
            except (OSError, http.client.HTTPException) as err:
                self._drop()
                self._source.watch.check()
                self._failures += 1
                self._last_error = _describe(err)
                if self._failures > self._opts.retries:
                    expected = f" of {self._size}" if self._size is not None else ""
                    raise TransferError(
                        f"download of {self._source.url} failed after {self._pos}{expected} bytes and "
                        f"{self._opts.retries} retries: {self._last_error}"
                    ) from err
                delay = self._opts.retry_delay * 2 ** (self._failures - 1)
                delay = min(delay, max(0.0, self._source.watch.stall_left()))
                log.warning("download interrupted at byte %d (%s); retrying in %.1fs", self._pos, err, delay)
                time.sleep(delay)

    def _connect(self) -> None:
        ranged = self._end is not None
        last = None if self._end is None else self._end - 1
        resp = self._source.get(self._pos if self._pos or ranged else None, last)
        if resp.status == 416:
            resp.close()
            raise TransferError(
                f"{self._source.url} ends at byte {self._pos} but the server announced {self._size} bytes "
                "(wrong Content-Length)"
            )
        total = _total_size(resp)
        if self._size is None:
            self._size = total
        elif total is not None and total != self._size:
            resp.close()
            raise TransferError(f"{self._source.url} changed during the download (size {self._size}, now {total})")
        self._resp = resp
        if resp.status == 206:
            match = _CONTENT_RANGE.match(resp.getheader("Content-Range", ""))
            if not match or int(match.group(1)) != self._pos or (last is not None and int(match.group(2)) != last):
                self._drop()
                raise TransferError(f"{self._source.url} answered a request for bytes {self._pos}-"
                                    f"{'' if last is None else last} with the wrong range")
            length = resp.getheader("Content-Length")
            if last is not None and length is not None and length.strip() != str(last - self._pos + 1):
                self._drop()
                raise TransferError(f"{self._source.url} answered bytes {self._pos}-{last} with Content-Length "
                                    f"{length.strip()} (wrong Content-Length)")
        elif ranged:
            self._drop()
            raise TransferError(f"{self._source.url} ignored a Range request (HTTP 200) it said it supports")
        elif self._pos:
            # No Range support: start over and throw away what we already have (bounded by the retries).
            skip = self._pos
            while skip:
                chunk = resp.read1(min(skip, 1024 * 1024))
                if not chunk:
                    raise http.client.IncompleteRead(b"", skip)
                skip -= len(chunk)
                self._source.watch.received(len(chunk))
                self._source.watch.check()

    def _drop(self) -> None:
        if self._resp is not None:
            with contextlib.suppress(Exception):
                self._resp.close()
            self._resp = None

    def close(self) -> None:
        self._drop()


def next_hop(url: str, status: int, location: str, chain: list[str]) -> str:
    """Where a redirect leads; only to http(s) and never back to a URL already visited."""
    try:
        target = urljoin(url, location)
        parts = urlsplit(target)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a bad port or bracket: not a URL we can follow
        valid = False
    if not valid:
        raise SourceError(f"refusing redirect from {url} (HTTP {status}) to {location!r}: only http:// and https:// "
                          "URLs with a host are followed")
    if target in chain:
        raise SourceError(f"redirect loop: {' -> '.join([*chain[chain.index(target):], target])}")
    return target


class _WatchedResponse:
    """A response read in whatever pieces arrive, each counted by the watch (the probe's 512 bytes)."""

    def __init__(self, resp: http.client.HTTPResponse, watch: ProgressWatch) -> None:
        self._resp, self._watch = resp, watch

    def read(self, size: int, /) -> bytes:
        data = self._resp.read1(size)
        self._watch.received(len(data))
        self._watch.check()
        return data

    def close(self) -> None:
        self._resp.close()


def _describe(err: BaseException) -> str:
    if isinstance(err, http.client.IncompleteRead):
        return f"connection closed with {err.expected} bytes still expected (Content-Length not met)"
    if isinstance(err, TimeoutError):
        return "no data received within the stall timeout"
    return str(err) or type(err).__name__

"""HTTP(S) source: resumable streaming on urllib3 (proxy-aware), random access through nbdkit's curl plugin."""

from __future__ import annotations

import base64
import contextlib
import http.client
import logging
import os
import re
import shlex
import ssl
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    ReadTimeoutError,
    SSLError,
)

from importer.deadline import (
    NbdkitLogCounter,
    ProgressWatch,
)
from importer.errors import ConfigError, SourceError, ToolError, TransferError
from importer.formats import HEADER_SIZE
from importer.net.pools import USER_AGENT, Pools
from importer.net.proxy import Proxy, ProxySettings
from importer.net.redirects import next_hop
from importer.net.tls import TlsSettings
from importer.net.transfer import TransferOptions
from importer.pipeline import read_full
from importer.sources.base import Source, SourceInfo

log = logging.getLogger(__name__)

Response = urllib3.BaseHTTPResponse
E = TypeVar("E", bound=BaseException)
# What a dropped, refused or timed-out connection raises somewhere between urllib3 and the socket: retried.
NETWORK_ERRORS = (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError)
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY",
                   "all_proxy", "ALL_PROXY")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass
class HttpOptions(TransferOptions):
    """Everything about talking to the server that is not the URL."""

    insecure_tls: bool = False
    cert_dir: Path | None = None
    proxy_cert_dir: Path | None = None  # IMPORTER_PROXY_CERT_DIR: the proxy's CA
    proxy: ProxySettings | None = None  # CDI's HTTP_PROXY / HTTPS_PROXY / NO_PROXY
    username: str | None = None
    password: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def tls(self) -> TlsSettings:
        return TlsSettings(self.insecure_tls, self.cert_dir, self.proxy_cert_dir)


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
        self.tls = self.options.tls
        self.tls.origin_ca_files()  # a missing certificate directory is a configuration error, found now
        self.pools = Pools(self.tls, self.options.proxy, self.options.io_timeout)
        self.size: int | None = None  # as probed; ranged reads check every answer against it
        self.watch = ProgressWatch(self.options.deadlines)

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

    def get(self, offset: int | None = None, end: int | None = None) -> Response:
        """GET following redirects; returns a 200, 206 or 416 response, raises SourceError for the rest."""
        url = self.url
        chain = [url]
        for _ in range(self.options.max_redirects + 1):
            proxy = self.pools.route(url)
            try:
                resp = self.pools.for_url(url).request(
                    "GET", url, headers=self._headers(url, offset, end), preload_content=False,
                    decode_content=False, redirect=False, retries=False)
            except SSLError as err:
                verify = _find(err, ssl.SSLCertVerificationError)
                if verify is None:
                    raise
                netloc = urlsplit(url).netloc
                raise SourceError(f"TLS verification of {netloc} failed: {verify.verify_message}; add its CA with "
                                  "--cert-dir (IMPORTER_CERT_DIR)" + _proxy_hint(proxy)) from err
            except ProxyError as err:
                verify = _find(err, ssl.SSLCertVerificationError)
                if verify is not None:
                    raise SourceError(f"TLS verification of proxy {proxy} failed: {verify.verify_message}; add its CA "
                                      "with --proxy-cert-dir (IMPORTER_PROXY_CERT_DIR)") from err
                raise ProxyUnreachable(f"proxy {proxy}: {_describe(err.original_error)}") from err
            location = resp.headers.get("Location")
            if resp.status in _REDIRECTS and location:
                _close(resp)
                url = next_hop(url, resp.status, location, chain)
                chain.append(url)
                continue
            if resp.status in (200, 206, 416):
                return resp
            _close(resp)
            raise SourceError(f"GET {url}: HTTP {resp.status} {resp.reason}{_status_hint(resp.status, proxy)}")
        raise SourceError(f"GET {self.url}: too many redirects (more than {self.options.max_redirects}): "
                          f"{' -> '.join(chain[:3])} -> ... -> {chain[-1]}")

    def probe(self) -> SourceInfo:
        failures = 0
        while True:
            try:
                return self._probe_once()
            except NETWORK_ERRORS as err:
                self.watch.check()
                failures += 1
                if failures > self.options.retries:
                    raise SourceError(f"cannot reach {self.url}: {_describe(err)}") from err
                time.sleep(min(self.options.retry_delay * 2 ** (failures - 1), max(0.0, self.watch.stall_left())))

    def _probe_once(self) -> SourceInfo:
        with _closing(self.get(0, HEADER_SIZE - 1)) as resp:
            if resp.status == 416:  # an empty file cannot satisfy bytes=0-511
                return SourceInfo(size=0, random_access=False, header=b"")
            total = _total_size(resp)
            # nbdkit's curl plugin refuses servers that do not say Accept-Ranges: bytes, even if they honour Range.
            accepts = resp.headers.get("Accept-Ranges", "").strip().lower() == "bytes"
            random_access = resp.status == 206 and accepts
            blocker = self._nbdkit_blocker()
            if random_access and blocker:
                random_access, self.sequential_reason = False, blocker
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
        # Secrets go in 0600 files nbdkit reads, never on its command line (ps shows that to everyone).
        if opts.username is not None:
            cmd += [f"user={opts.username}", f"password=+{_secret_file(workdir / 'password', opts.password or '')}"]
        if opts.headers:
            lines = "".join(f"{name}: {value}\n" for name, value in opts.headers)
            cmd.append(f"header-script=cat {shlex.quote(str(_secret_file(workdir / 'headers', lines)))}")
        if opts.insecure_tls:
            cmd.append("sslverify=false")
        bundle = self.tls.ca_bundle(workdir / "ca-bundle.pem")
        if bundle is not None:
            cmd.append(f"cainfo={bundle}")
        cmd += self._nbdkit_proxy(workdir)
        try:
            log_handle = logfile.open("wb")
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_handle, stderr=log_handle,
                                    env=_without_proxy_variables(os.environ))
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

    def _nbdkit_blocker(self) -> str:
        """Why nbdkit cannot read this URL in place, or "": it cannot be told to trust an https:// proxy's CA."""
        proxy = self.pools.route(self.url)
        if proxy is not None and proxy.scheme == "https" and self.tls.proxy_cert_dir is not None:
            return (f"nbdkit's curl plugin has no option for the CA of the https:// proxy {proxy} "
                    "(IMPORTER_PROXY_CERT_DIR)")
        return ""

    def _nbdkit_proxy(self, workdir: Path) -> list[str]:
        """curl's proxy options for our proxy decision (libcurl's own reading of the environment is switched off:
        its NO_PROXY rules are not Go's)."""
        proxy = self.pools.route(self.url)
        if proxy is None:
            return []
        blocker = self._nbdkit_blocker()
        if blocker:
            raise ConfigError(blocker)
        args = [f"proxy={proxy.url}"]
        if proxy.username is not None:
            secret = _secret_file(workdir / "proxy-password", proxy.password or "")
            args += [f"proxy-user={proxy.username}", f"proxy-password=+{secret}"]
        return args


def _secret_file(path: Path, content: str) -> Path:
    path.touch(mode=0o600)
    path.write_text(content)
    return path


def _without_proxy_variables(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in PROXY_VARIABLES}


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


def _total_size(resp: Response) -> int | None:
    """The full size of the resource from Content-Range (206) or Content-Length (200)."""
    if resp.status == 206:
        match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if match and match.group(3) != "*":
            return int(match.group(3))
        return None
    length = resp.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


class HttpStream:
    """The body as a stream that survives dropped connections: it reconnects with Range where it left off."""

    def __init__(self, source: HttpSource, start: int = 0, end: int | None = None) -> None:
        self._source = source
        self._opts = source.options
        self._resp: Response | None = None
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
            except NETWORK_ERRORS as err:
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
            _close(resp)
            raise TransferError(
                f"{self._source.url} ends at byte {self._pos} but the server announced {self._size} bytes "
                "(wrong Content-Length)"
            )
        total = _total_size(resp)
        if self._size is None:
            self._size = total
        elif total is not None and total != self._size:
            _close(resp)
            raise TransferError(f"{self._source.url} changed during the download (size {self._size}, now {total})")
        self._resp = resp
        if resp.status == 206:
            match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != self._pos or (last is not None and int(match.group(2)) != last):
                self._drop()
                raise TransferError(f"{self._source.url} answered a request for bytes {self._pos}-"
                                    f"{'' if last is None else last} with the wrong range")
            length = resp.headers.get("Content-Length")
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
            _close(self._resp)
            self._resp = None

    def close(self) -> None:
        self._drop()


class _WatchedResponse:
    """A response read in whatever pieces arrive, each counted by the watch (the probe's 512 bytes)."""

    def __init__(self, resp: Response, watch: ProgressWatch) -> None:
        self._resp, self._watch = resp, watch

    def read(self, size: int, /) -> bytes:
        data = self._resp.read1(size)
        self._watch.received(len(data))
        self._watch.check()
        return data

    def close(self) -> None:
        _close(self._resp)


class ProxyUnreachable(ConnectionError):
    """The proxy refused, dropped or timed out the connection (retried like any network failure)."""


def _close(resp: Response) -> None:
    """Close the response and its connection: a half-read body must not go back to the pool."""
    with contextlib.suppress(Exception):
        resp.close()
    with contextlib.suppress(Exception):
        resp.release_conn()


@contextlib.contextmanager
def _closing(resp: Response) -> Iterator[Response]:
    try:
        yield resp
    finally:
        _close(resp)


def _find(err: BaseException, kind: type[E]) -> E | None:
    """The first exception of kind in err's chain of causes and arguments (urllib3 wraps them deeply)."""
    seen: set[int] = set()
    todo: list[BaseException] = [err]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        todo += [c for c in (current.__cause__, current.__context__, *current.args) if isinstance(c, BaseException)]
        inner = getattr(current, "original_error", None) or getattr(current, "reason", None)
        if isinstance(inner, BaseException):
            todo.append(inner)
    return None


def _status_hint(status: int, proxy: Proxy | None) -> str:
    if status == 407:
        return f" from proxy {proxy}: it wants credentials, given as http://USER:PASSWORD@HOST:PORT in its variable"
    via = f" via proxy {proxy}" if proxy is not None else ""
    if status in (401, 403):
        proxy_creds = " or the proxy's credentials" if proxy is not None else ""
        return f"{via} (check IMPORTER_ACCESS_KEY_ID / IMPORTER_SECRET_KEY{proxy_creds})"
    return via


def _proxy_hint(proxy: Proxy | None) -> str:
    if proxy is None:
        return ""
    return f" (through proxy {proxy}: a TLS-inspecting proxy's CA goes in IMPORTER_PROXY_CERT_DIR)"


def _describe(err: BaseException) -> str:
    """What went wrong on the wire, in words, whichever layer (socket, http.client, urllib3) raised it."""
    if isinstance(err, ProxyUnreachable):
        return str(err)
    incomplete = _find(err, http.client.IncompleteRead)
    if incomplete is not None:
        return f"connection closed with {incomplete.expected} bytes still expected (Content-Length not met)"
    if isinstance(err, NewConnectionError) or (isinstance(err, OSError) and err.strerror):
        cause = _find(err, OSError) if isinstance(err, NewConnectionError) else err
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause or err)
        return f"cannot connect: {reason}"
    if isinstance(err, ConnectTimeoutError):
        return "connection timed out"
    if isinstance(err, TimeoutError | ReadTimeoutError):
        return "no data received within the stall timeout"
    if isinstance(err, ProtocolError) and err.args:
        return str(err.args[0])
    return str(err) or type(err).__name__

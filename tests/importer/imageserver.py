"""A real HTTP(S) image server on 127.0.0.1 with switchable misbehaviour, for tests and the benchmark."""

from __future__ import annotations

import base64
import os
import re
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass
class Route:
    """One served file and how the server behaves for it."""

    path: Path
    ranges: bool = True  # honour Range and advertise Accept-Ranges: bytes
    auth: tuple[str, str] | None = None  # required basic-auth user and password
    drop_at: int | None = None  # close the connection after this many body bytes ...
    drops: int = 1  # ... this many times
    stall_at: int | None = None  # stop sending (but keep the connection) after this many bytes ...
    stall_seconds: float = 5.0
    stalls: int = 1  # ... on this many responses
    trickle_at: int | None = None  # past this byte, send one byte every trickle_interval seconds
    trickle_interval: float = 0.5
    extra_length: int = 0  # announce this many more bytes than exist, then close (a lying Content-Length)
    redirect_to: str | None = None  # answer 302 to this path instead
    required_headers: dict[str, str] = field(default_factory=dict)
    rate: int | None = None  # pace every response to this many bytes per second (a network-like link)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client hung up (it gave up on a stalled or trickling answer): nothing to report
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class ImageServer:
    """Serves Routes by URL path; records each request as (method, path, Range header, headers)."""

    def __init__(self, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1", name: str | None = None) -> None:
        """host: the address to listen on; name: the host URLs use (a name, for tests that must not say 127.0.0.1)."""
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str, str | None, dict[str, str]]] = []
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"server_state": self})
        self._httpd = _Server((host, 0), handler)
        self.name = name or host
        self._httpd.daemon_threads = True
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self.scheme = "https" if tls else "http"
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def add(self, url_path: str, route: Route) -> str:
        self.routes[url_path] = route
        return self.url(url_path)

    def url(self, url_path: str) -> str:
        return f"{self.scheme}://{self.name}:{self.port}{url_path}"

    def record(self, entry: tuple[str, str, str | None, dict[str, str]]) -> None:
        with self._lock:
            self.requests.append(entry)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as production servers do; otherwise small replies wait 40 ms for an ACK
    server_state: ImageServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        state = self.server_state
        state.record((self.command, self.path, self.headers.get("Range"), dict(self.headers.items())))
        route = state.routes.get(self.path.split("?", 1)[0])
        if route is None:
            return self._status(404)
        if route.auth is not None:
            expected = "Basic " + base64.b64encode(f"{route.auth[0]}:{route.auth[1]}".encode()).decode()
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="images"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
        for name, value in route.required_headers.items():
            if self.headers.get(name) != value:
                return self._status(403)
        if route.redirect_to is not None:
            self.send_response(302)
            self.send_header("Location", route.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        size = route.path.stat().st_size
        start, end, status = 0, size - 1, 200
        requested = self.headers.get("Range")
        if route.ranges and requested:
            match = _RANGE.match(requested.strip())
            if match:
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                status = 206
        length = end - start + 1
        self.send_response(status)
        if route.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(length + route.extra_length))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if not body:
            return None
        limit = length
        close = route.extra_length > 0
        # Misbehave only on responses that actually cross the trigger point (not on a 512-byte probe).
        if route.drop_at is not None and route.drops > 0 and start < route.drop_at < start + length:
            route.drops -= 1
            limit, close = route.drop_at - start, True
        stall = route.stall_at is not None and start <= route.stall_at < start + length
        if stall:
            limit = route.stall_at - start  # type: ignore[operator]
        count = min(limit, length)
        if route.trickle_at is not None and start + count > route.trickle_at:
            fast = max(0, route.trickle_at - start)
            self._send_file(route.path, start, fast, route.rate)
            self._send_trickle(route.path, start + fast, count - fast, route.trickle_interval)
        else:
            self._send_file(route.path, start, count, route.rate)
        if stall:
            route.stalls -= 1
            if route.stalls <= 0:
                route.stall_at = None
            time.sleep(route.stall_seconds)
            close = True
        if close:
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        return None

    def _send_file(self, path: Path, offset: int, count: int, rate: int | None = None) -> None:
        self.wfile.flush()
        with path.open("rb") as f:
            if rate is not None:
                self._send_paced(f.fileno(), offset, count, rate)
                return
            if isinstance(self.connection, ssl.SSLSocket):
                f.seek(offset)
                while count > 0:
                    data = f.read(min(count, 1024 * 1024))
                    if not data:
                        break
                    self.wfile.write(data)
                    count -= len(data)
                return
            while count > 0:
                sent = os.sendfile(self.connection.fileno(), f.fileno(), offset, count)
                if sent == 0:
                    break
                offset += sent
                count -= sent

    def _send_trickle(self, path: Path, offset: int, count: int, interval: float) -> None:
        """One byte at a time: the server that never stalls long enough to time out, and never finishes."""
        with path.open("rb") as f:
            f.seek(offset)
            try:
                for _ in range(count):
                    self.wfile.write(f.read(1))
                    self.wfile.flush()
                    time.sleep(interval)
            except OSError:
                pass  # the client gave up

    def _send_paced(self, fd: int, offset: int, count: int, rate: int) -> None:
        """sendfile in 256 KiB slices, sleeping so that the response never runs ahead of rate bytes/s."""
        start = time.monotonic()
        sent_total = 0
        while sent_total < count:
            ahead = sent_total / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
            sent = os.sendfile(self.connection.fileno(), fd, offset + sent_total, min(count - sent_total, 256 * 1024))
            if sent == 0:
                break
            sent_total += sent

    def _status(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

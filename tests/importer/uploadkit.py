"""Upload-server test parts: trustme certificates, a real `hpp-importer upload-server` process, real curl."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[2])
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # bench/ is not installed; its certificate maker serves the tests too

from bench.certs import make_server_certs  # noqa: E402

HPP_IMPORTER = str(Path(sys.executable).with_name("hpp-importer"))
PROXY_NAME = "cdi-uploadproxy"  # CDI's upload proxy is the one client the pod serves
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+), healthz on 127\.0\.0\.1:(\d+)")


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path
    client: Path  # key and certificate of the right common name
    wrong_client: Path  # same CA, another common name


def make_certs(root: Path) -> Certs:
    """The server's files as the benchmark makes them, plus two client certificates of the same CA."""
    server = make_server_certs(root)
    server.authority.issue_cert("proxy.test", common_name=PROXY_NAME).private_key_and_cert_chain_pem.write_to_path(
        str(root / "client.pem"))
    server.authority.issue_cert("other.test", common_name="not-the-proxy") \
        .private_key_and_cert_chain_pem.write_to_path(str(root / "wrong.pem"))
    return Certs(server.ca, server.cert, server.key, root / "client.pem", root / "wrong.pem")


class UploadServerProcess:
    """`hpp-importer upload-server` on 127.0.0.1 (ports chosen by the kernel, read from its first line)."""

    def __init__(self, certs: Certs, dest: Path, tmp: Path, *args: str, env: dict[str, str] | None = None,
                 mutual: bool = True) -> None:
        self.certs = certs
        self.termination_log = tmp / "termination-log"
        self.stderr_path = tmp / "server.stderr"
        cmd = [HPP_IMPORTER, "upload-server", "--listen", "127.0.0.1:0", "--healthz-address", "127.0.0.1:0",
               "--dest", str(dest), "--termination-log", str(self.termination_log),
               "--tls-cert", str(certs.cert), "--tls-key", str(certs.key), *args]
        if mutual:
            cmd += ["--client-ca", str(certs.ca), "--client-name", PROXY_NAME]
        full_env = {"PATH": os.environ["PATH"], **(env or {})}
        self._stderr = self.stderr_path.open("w+")
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.port, self.healthz_port = self._ports()

    def _ports(self) -> tuple[int, int]:
        end = time.monotonic() + 15
        while time.monotonic() < end:
            found = _LISTENING.search(self.stderr_path.read_text())
            if found:
                return int(found.group(1)), int(found.group(2))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.close()
        raise AssertionError(f"upload server did not start: {self.stderr_path.read_text()}")

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def healthz(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.healthz_port}/healthz", timeout=5) as resp:
            return str(resp.read().decode())

    def curl(self, path: str, *args: str, client: Path | None = None, timeout: float = 60) -> tuple[int, str, int]:
        return curl(self.certs, self.port, path, *args, client=client, timeout=timeout)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def termination(self) -> dict[str, object]:
        return dict(json.loads(self.termination_log.read_text()))

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


def curl(certs: Certs, port: int, path: str, *args: str, client: Path | None = None,
         timeout: float = 60) -> tuple[int, str, int]:
    """(HTTP status, body, curl exit code) of one request with real curl."""
    cert = ["--cert", str(client)] if client is not None else []
    done = subprocess.run(["curl", "-sS", "--cacert", str(certs.ca), *cert, "-w", "\n%{http_code}", *args,
                           f"https://127.0.0.1:{port}{path}"], capture_output=True, text=True, timeout=timeout,
                          check=False)
    body, _, status = done.stdout.rpartition("\n")
    return int(status or 0), body.rstrip("\n"), done.returncode


def open_upload(server: UploadServerProcess, path: str, length: int, client: Path) -> ssl.SSLSocket:
    """A raw TLS connection that announced a body of length bytes and sent none of it yet."""
    ctx = ssl.create_default_context(cafile=str(server.certs.ca))
    ctx.load_cert_chain(str(client))
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=10),
                           server_hostname="127.0.0.1")
    sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n\r\n".encode())
    return sock


def leftovers(dest: Path) -> list[str]:
    """Everything in a destination directory (a clean failure leaves nothing: no disk.img, no .part file)."""
    return sorted(p.name for p in dest.iterdir())


class CuttingProxy:
    """A TCP forwarder on 127.0.0.1 (or `listen`) that breaks transfers mid-way; counts the bytes it carries in the
    cut direction over all connections.

    The first `cuts` connections that carry `cut_after` bytes from the client (downstream=True: to the client) are
    cut there: closed at once, or, with hold=True, held (nothing more forwarded) until release() closes them.
    """

    def __init__(self, target_port: int, cut_after: int, cuts: int = 1, hold: bool = False,
                 downstream: bool = False, listen: str = "127.0.0.1") -> None:
        self.target_port, self.cut_after, self.cuts, self.hold = target_port, cut_after, cuts, hold
        self.downstream, self.listen = downstream, listen
        self.cut_done = 0
        self.forwarded = 0  # in the cut direction, every connection, TLS records and headers included
        self.connections = 0
        self.holding = threading.Event()  # a connection reached cut_after and is held
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server((listen, 0))
        self.port = int(self._listener.getsockname()[1])
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def host(self) -> str:
        return f"{self.listen}:{self.port}"

    def release(self) -> None:
        """Held connections are closed now."""
        self._released.set()

    def close(self) -> None:
        self._released.set()
        _close(self._listener)  # shutdown() wakes the accept() in progress; close() alone would not
        with self._lock:
            for sock in self._sockets:
                _close(sock)
        for thread in self._threads:
            thread.join(10)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            server.settimeout(None)
            with self._lock:
                self.connections += 1
                self._sockets += [client, server]
            for args in ((client, server, not self.downstream), (server, client, self.downstream)):
                thread = threading.Thread(target=self._pump, args=args, daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, src: socket.socket, dst: socket.socket, cutting: bool) -> None:
        carried = 0
        try:
            while data := src.recv(256 * 1024):
                if cutting:
                    with self._lock:
                        cut = self.cuts > 0 and carried + len(data) >= self.cut_after
                        if cut:
                            self.cuts -= 1
                            self.cut_done += 1
                            data = data[: self.cut_after - carried]
                        self.forwarded += len(data)
                    dst.sendall(data)
                    carried += len(data)
                    if cut:
                        if self.hold:
                            self.holding.set()
                            self._released.wait(60)
                        break
                else:
                    dst.sendall(data)
        except OSError:
            pass
        _close(src)
        _close(dst)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()

"""`hpp-importer upload` as a user runs it: a real process against real HTTPS servers on 127.0.0.1."""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme
from impkit import MiB, compare, run
from uploadkit import UploadServerProcess, make_certs, open_upload

from importer.errors import ConfigError
from importer.progress_bar import bar_line, format_eta, plain_line
from importer.upload_client import (
    BLOCK,
    FIRST_SEND,
    MIN_SEND,
    ImageFile,
    Prefetcher,
    UploadError,
    endpoint_path,
    next_send_size,
    parse_duration,
    read_token,
)

HPP_IMPORTER = str(Path(sys.executable).with_name("hpp-importer"))
TOKEN = "tok.en-123"
CDI_TOO_LARGE = ("virtual image size 1073741824 is larger than the reported available storage 10485760; "
                 "a larger volume is required")


@dataclass
class Received:
    """One request as the server saw it; the body is kept whole only when small."""

    path: str
    headers: dict[str, str]
    length: int = 0
    sha256: str = ""
    body: bytes = b""


@dataclass
class Behaviour:
    """What the server does: early answers (before the body) first, then it reads the body and answers 200."""

    token: str = TOKEN
    early: list[tuple[int, str]] = field(default_factory=list)  # consumed one per request
    send_continue: bool = True  # False: a server that ignores Expect: 100-continue
    read_rate: int | None = None  # bytes/s it reads the body at
    stall_after: int | None = None  # stop reading after this many body bytes, until the server closes
    drop_after: int | None = None  # close the connection after this many body bytes, with no answer
    answer_delay: float = 0.0  # wait this long between the last byte and the answer


class UploadServer:
    """CDI's upload protocol on 127.0.0.1 over TLS, with switchable misbehaviour; records every request."""

    def __init__(self, ctx: ssl.SSLContext, behaviour: Behaviour | None = None, port: int = 0,
                 rcvbuf: int | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.received: list[Received] = []
        self.stop = threading.Event()
        handler = type("Handler", (_Handler,), {"state": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), handler, bind_and_activate=False)
        self._httpd.daemon_threads = True
        self._httpd.allow_reuse_address = True
        if rcvbuf is not None:  # inherited by accepted sockets: a full pipe after a few KiB, not megabytes
            self._httpd.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self._httpd.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._httpd.server_bind()
        self._httpd.server_activate()
        self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: UploadServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def handle_expect_100(self) -> bool:
        return True  # as Go's server (CDI): 100 Continue only once the handler decides to read the body

    def do_POST(self) -> None:
        state, how = self.state, self.state.behaviour
        seen = Received(self.path, dict(self.headers.items()))
        state.received.append(seen)
        if self.headers.get("Authorization") != f"Bearer {how.token}":
            return self._answer(401, "authentication failed: invalid token")
        if how.early:
            return self._answer(*how.early.pop(0))
        if how.send_continue and self.headers.get("Expect", "").lower() == "100-continue":
            self.send_response_only(100)
            self.end_headers()
        length = int(self.headers["Content-Length"])
        digest, body, start = hashlib.sha256(), bytearray(), time.monotonic()
        while seen.length < length:
            if how.stall_after is not None and seen.length >= how.stall_after:
                state.stop.wait(10)
                return self._drop()
            if how.drop_after is not None and seen.length >= how.drop_after:
                return self._drop()
            data = self.rfile.read(min(64 * 1024, length - seen.length))
            if not data:
                return None
            digest.update(data)
            seen.length += len(data)
            if seen.length <= 8 * MiB:
                body += data
            seen.sha256, seen.body = digest.hexdigest(), bytes(body)
            if how.read_rate is not None:
                time.sleep(max(0.0, seen.length / how.read_rate - (time.monotonic() - start)))
        state.stop.wait(how.answer_delay)
        return self._answer(200, "")

    def _answer(self, status: int, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def _drop(self) -> None:
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path_factory.mktemp("upload-ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


@pytest.fixture(scope="module")
def server_tls(ca: tuple[trustme.CA, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca[0].issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("upload-image") / "disk.raw"
    path.write_bytes(os.urandom(3 * MiB + 1234))  # not a multiple of any chunk size
    return path


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sparse, and larger than every socket buffer between the client and a server with a small SO_RCVBUF."""
    path = tmp_path_factory.mktemp("upload-big") / "big.raw"
    with path.open("wb") as f:
        f.truncate(16 * MiB)
    return path


MakeServer = Callable[..., UploadServer]


@pytest.fixture
def make_server(server_tls: ssl.SSLContext) -> Iterator[MakeServer]:
    """UploadServer(behaviour, port=, rcvbuf=) with the test CA's certificate, closed after the test."""
    started: list[UploadServer] = []

    def make(behaviour: Behaviour | None = None, port: int = 0, rcvbuf: int | None = None) -> UploadServer:
        started.append(UploadServer(server_tls, behaviour, port, rcvbuf))
        return started[-1]

    yield make
    for srv in started:
        srv.close()


def upload(*args: str, ca: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    trust = ["--ca", str(ca)] if ca is not None else []
    return subprocess.run([HPP_IMPORTER, "upload", *trust, *args], capture_output=True, text=True,
                          timeout=timeout, check=False, env={"PATH": os.environ["PATH"]})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The last stderr line, which must be the only error line."""
    lines = done.stderr.splitlines()
    assert [line for line in lines if "error:" in line] == lines[-1:], done.stderr
    assert lines[-1].startswith("hpp-importer: error: ")
    return lines[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the protocol -------------------------------------------------------------------------------------------


def test_raw_upload_streams_the_image_with_length_and_token(make_server: MakeServer, image: Path,
                                                            ca: tuple[trustme.CA, Path]) -> None:
    srv = make_server()
    done = upload("--url", srv.url, "--token", TOKEN, "--image-path", str(image), ca=ca[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and done.stdout.startswith(f"uploaded {image} (3.0 MiB) to {srv.url}")
    [seen] = srv.received
    assert seen.path == "/v1beta1/upload"
    assert seen.headers["Authorization"] == f"Bearer {TOKEN}"
    assert seen.headers["Content-Length"] == str(image.stat().st_size)
    assert seen.headers["Content-Type"] == "application/octet-stream"
    assert seen.length == image.stat().st_size and seen.sha256 == sha256(image)


@pytest.mark.parametrize(("flags", "path"), [
    (["--async"], "/v1beta1/upload-async"),
    (["--form"], "/v1beta1/upload-form"),
    (["--form", "--async"], "/v1beta1/upload-form-async"),
])
def test_async_and_form_endpoints(flags: list[str], path: str, make_server: MakeServer, image: Path,
                                  ca: tuple[trustme.CA, Path], tmp_path: Path) -> None:
    srv = make_server()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    done = upload("--url", srv.url + "/", "--token-file", str(token_file), "--image-path", str(image), *flags,
                  ca=ca[1])
    assert done.returncode == 0, done.stderr
    assert ("background" in done.stdout) == ("--async" in flags)
    [seen] = srv.received
    assert seen.path == path
    assert seen.headers["Content-Length"] == str(seen.length)
    if "--form" not in flags:
        assert seen.sha256 == sha256(image)
        return
    # A proper multipart body, read by an independent parser: one part, field `file`, the image exactly.
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {seen.headers['Content-Type']}\r\n\r\n".encode() + seen.body)
    assert message.is_multipart()
    [part] = message.iter_parts()  # type: ignore[attr-defined]
    assert part.get_param("name", header="content-disposition") == "file"
    assert part.get_param("filename", header="content-disposition") == image.name
    assert part.get_payload(decode=True) == image.read_bytes()


def test_server_ignoring_expect_still_gets_the_body(make_server: MakeServer, image: Path,
                                                    ca: tuple[trustme.CA, Path]) -> None:
    srv = make_server(Behaviour(send_continue=False))
    done = upload("--url", srv.url, "--token", TOKEN, "--image-path", str(image), ca=ca[1])
    assert done.returncode == 0, done.stderr
    assert srv.received[0].sha256 == sha256(image)


# -- waiting for a server that is busy or not up yet ---------------------------------------------------------


def test_retries_while_the_server_answers_503(make_server: MakeServer, image: Path,
                                              ca: tuple[trustme.CA, Path]) -> None:
    srv = make_server(Behaviour(early=[(503, "upload in progress")] * 2))
    done = upload("--url", srv.url, "--token", TOKEN, "--image-path", str(image), ca=ca[1])
    assert done.returncode == 0, done.stderr
    assert len(srv.received) == 3
    assert srv.received[-1].sha256 == sha256(image)
    assert [s.length for s in srv.received[:2]] == [0, 0]  # Expect: 100-continue: nothing sent to a busy server
    assert done.stderr.count("(it answered 503 Service Unavailable: upload in progress); retrying") == 2


def test_server_that_comes_up_late(server_tls: ssl.SSLContext, image: Path, ca: tuple[trustme.CA, Path]) -> None:
    port = free_port()
    started: list[UploadServer] = []
    timer = threading.Timer(1.0, lambda: started.append(UploadServer(server_tls, port=port)))
    timer.start()
    try:
        begin = time.monotonic()
        done = upload("--url", f"https://127.0.0.1:{port}", "--token", TOKEN, "--image-path", str(image), ca=ca[1])
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - begin >= 1.0
        assert "was refused" in done.stderr
        assert started[0].received[0].sha256 == sha256(image)
    finally:
        timer.join()
        for srv in started:
            srv.close()


def test_wait_ready_expiry_says_what_it_waited_for(make_server: MakeServer, image: Path,
                                                   ca: tuple[trustme.CA, Path]) -> None:
    srv = make_server(Behaviour(early=[(503, "upload in progress")] * 100))
    begin = time.monotonic()
    done = upload("--url", srv.url, "--token", TOKEN, "--image-path", str(image), "--wait-ready", "1s", ca=ca[1])
    assert done.returncode == 1
    assert 1.0 <= time.monotonic() - begin < 10
    line = one_error_line(done)
    assert f"{srv.url}/v1beta1/upload was not ready to take the upload within 1 s (--wait-ready)" in line
    assert line.endswith("last time it answered 503 Service Unavailable: upload in progress")
    assert len(srv.received) >= 2

    port = free_port()  # nobody listens there
    done = upload("--url", f"https://127.0.0.1:{port}", "--token", TOKEN, "--image-path", str(image),
                  "--wait-ready", "500ms", ca=ca[1])
    assert done.returncode == 1
    assert one_error_line(done).endswith(f"last time the connection to 127.0.0.1:{port} was refused")


# -- refusals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("early", "token", "expected"), [
    ([], "forged", "401 Unauthorized: authentication failed: invalid token"),
    ([(409, "upload already completed")], TOKEN, "409 Conflict: upload already completed"),
    ([(400, CDI_TOO_LARGE)], TOKEN, f"400 Bad Request: {CDI_TOO_LARGE}"),
])
def test_refusals_pass_the_server_text_through(early: list[tuple[int, str]], token: str, expected: str,
                                               make_server: MakeServer, image: Path,
                                               ca: tuple[trustme.CA, Path]) -> None:
    srv = make_server(Behaviour(early=list(early)))
    done = upload("--url", srv.url, "--token", token, "--image-path", str(image), ca=ca[1])
    assert done.returncode == 1
    assert done.stdout == ""
    assert one_error_line(done) == f"hpp-importer: error: upload to {srv.url}/v1beta1/upload refused: {expected}"
    assert len(srv.received) == 1  # no retry of a refusal


def test_tls_verification(make_server: MakeServer, image: Path, tmp_path: Path) -> None:
    srv = make_server()
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    for trust in (["--ca", str(other)], []):  # a wrong CA, and the system store, which knows no test CA
        done = upload("--url", srv.url, "--token", TOKEN, "--image-path", str(image), *trust)
        assert done.returncode == 1
        line = one_error_line(done)
        assert "TLS verification of 127.0.0.1 failed" in line and "--ca FILE" in line
    assert srv.received == []  # not even the token left the client
    done = upload("--url", srv.url, "--token", TOKEN, "--image-path", str(image), "--insecure")
    assert done.returncode == 0, done.stderr
    assert srv.received[0].sha256 == sha256(image)


@pytest.mark.parametrize(("args", "expected"), [
    (["--url", "http://127.0.0.1:1"], "expected https://HOST[:PORT]"),
    (["--url", "https://127.0.0.1:1", "--wait-ready", "soon"], "invalid --wait-ready 'soon'"),
    (["--url", "https://127.0.0.1:1", "--image-path", "/nonexistent/disk.img"], "cannot open the image"),
])
def test_configuration_errors(args: list[str], expected: str, image: Path) -> None:
    done = upload("--token", TOKEN, "--image-path", str(image), *args)
    assert done.returncode == 1
    assert expected in one_error_line(done)


# -- deadlines and broken transfers --------------------------------------------------------------------------


def test_stall_deadline(make_server: MakeServer, big_image: Path, ca: tuple[trustme.CA, Path]) -> None:
    big = big_image
    srv = make_server(Behaviour(stall_after=256 * 1024), rcvbuf=64 * 1024)
    begin = time.monotonic()
    done = upload("--url", srv.url, "--token", TOKEN, "--image-path", str(big), "--stall-timeout", "1",
                  "--retries", "1", ca=ca[1])
    assert done.returncode == 1
    assert time.monotonic() - begin < 5  # two attempts of about 1 s each (this server does not resume)
    assert done.stderr.count("stall timeout") == 2, done.stderr
    line = one_error_line(done)
    assert "the server accepted no data for 1 s after" in line and f"of {16 * MiB} bytes" in line
    assert line.endswith("stall timeout (--stall-timeout)")


def test_dropped_connection(make_server: MakeServer, image: Path, ca: tuple[trustme.CA, Path]) -> None:
    srv = make_server(Behaviour(drop_after=MiB))
    done = upload("--url", srv.url, "--token", TOKEN, "--image-path", str(image), ca=ca[1])
    assert done.returncode == 1
    line = one_error_line(done)
    assert "127.0.0.1" in line and ("broke after" in line or "closed the connection without an answer" in line)


def test_response_timeout(make_server: MakeServer, image: Path, ca: tuple[trustme.CA, Path]) -> None:
    srv = make_server(Behaviour(answer_delay=10))
    begin = time.monotonic()
    done = upload("--url", srv.url, "--token", TOKEN, "--image-path", str(image), "--response-timeout", "1s",
                  ca=ca[1])
    assert done.returncode == 1
    assert time.monotonic() - begin < 8
    assert one_error_line(done).endswith("within 1 s after the whole image was sent (--response-timeout)")
    assert srv.received[0].sha256 == sha256(image)


# -- progress --------------------------------------------------------------------------------------------------


def test_plain_progress_lines_when_not_a_terminal(make_server: MakeServer, big_image: Path,
                                                  ca: tuple[trustme.CA, Path]) -> None:
    srv = make_server(Behaviour(read_rate=12 * MiB), rcvbuf=64 * 1024)  # about a second
    done = upload("--url", srv.url, "--token", TOKEN, "--image-path", str(big_image), "--progress-interval", "0.1",
                  ca=ca[1])
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("sent ")]
    assert len(lines) >= 3, done.stderr
    assert all("/s, ETA " in line for line in lines)
    assert lines[-1].startswith("sent 16.0 MiB of 16.0 MiB (100%)")


def test_terminal_progress_bar_redraws_in_place(make_server: MakeServer, big_image: Path,
                                                ca: tuple[trustme.CA, Path]) -> None:
    srv = make_server(Behaviour(read_rate=12 * MiB), rcvbuf=64 * 1024)
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen([HPP_IMPORTER, "upload", "--ca", str(ca[1]), "--url", srv.url, "--token", TOKEN,
                                 "--image-path", str(big_image)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=slave, env={"PATH": os.environ["PATH"]})
        os.close(slave)
        slave = -1
        output = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            output += chunk
        assert proc.wait(timeout=30) == 0
        assert proc.stdout is not None
        assert proc.stdout.read().startswith(b"uploaded ")
        proc.stdout.close()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = output.decode().replace("\r\n", "\n")  # the terminal's own line endings (onlcr)
    bar, _, after = text.partition("\n")
    redraws = bar.split("\r")
    assert redraws[0] == "" and len(redraws) >= 4, text  # several states of one line, each drawn over the last
    assert all(r.startswith("[") and "ETA" in r and "/s" in r for r in redraws[1:]), text
    assert "100% 16.0 MiB / 16.0 MiB" in redraws[-1]
    assert after.startswith("hpp-importer: all 16777216 bytes sent")  # the bar's line was ended before


def test_progress_formatting() -> None:
    assert format_eta(None) == "--:--"
    assert format_eta(65) == "1:05"
    assert format_eta(3 * 3600 + 61) == "3:01:01"
    assert bar_line(MiB, 4 * MiB, MiB, width=8) == "[##......]  25% 1.0 MiB / 4.0 MiB  1.0 MiB/s  ETA 0:03"
    assert plain_line(4 * MiB, 4 * MiB, 0) == "sent 4.0 MiB of 4.0 MiB (100%), 0 B/s, ETA 0:00"


# -- plain functions ---------------------------------------------------------------------------------------------


def test_send_size_grows_while_sends_are_quick_and_shrinks_near_the_stall_timeout() -> None:
    assert next_send_size(FIRST_SEND, 0.001, 60) == 2 * FIRST_SEND
    assert next_send_size(BLOCK, 0.001, 60) == BLOCK  # never past one block
    assert next_send_size(BLOCK, 20, 60) == BLOCK // 2  # over a quarter of the stall timeout
    assert next_send_size(MIN_SEND, 20, 60) == MIN_SEND
    assert next_send_size(FIRST_SEND, 10, 60) == FIRST_SEND  # between an eighth and a quarter: kept
    assert next_send_size(FIRST_SEND, 100, 0) == 2 * FIRST_SEND  # no stall timeout: no reason to stay small


def test_prefetcher_reads_the_image_in_order_from_an_offset(image: Path) -> None:
    data = image.read_bytes()
    opened = ImageFile(image)
    try:
        blocks = Prefetcher(opened, 5000)
        try:
            got = b"".join(bytes(block) for block in blocks.blocks())  # copies: buffers are reused
        finally:
            blocks.close()
        assert got == data[5000:]
        assert opened.sha256() == hashlib.sha256(data).hexdigest()
    finally:
        opened.close()


def test_an_image_that_shrinks_while_read_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "shrinks.raw"
    path.write_bytes(b"x" * (3 * BLOCK))
    opened = ImageFile(path)  # its size is taken now
    try:
        os.truncate(path, BLOCK + 10)
        blocks = Prefetcher(opened, 0)
        try:
            with pytest.raises(UploadError, match=f"shrank while uploading: {BLOCK + 10} bytes readable, "
                               f"{3 * BLOCK} announced"):
                for _block in blocks.blocks():
                    pass
        finally:
            blocks.close()
    finally:
        opened.close()


def test_parse_duration() -> None:
    assert parse_duration("60s", "x") == 60
    assert parse_duration("1h30m", "x") == 5400
    assert parse_duration("500ms", "x") == 0.5
    assert parse_duration("2.5", "x") == 2.5
    for bad in ("", "5x", "s", "-1", "1m-2s", "inf", "nan"):
        with pytest.raises(ConfigError):
            parse_duration(bad, "x")


def test_endpoint_paths_and_tokens(tmp_path: Path) -> None:
    assert endpoint_path("", False, False) == "/v1beta1/upload"
    assert endpoint_path("/proxy/", True, True) == "/proxy/v1beta1/upload-form-async"
    for bad in ("a\r\nX-Injected: 1", "two words", "", "ünï"):
        with pytest.raises(ConfigError):
            read_token(bad, None)
    with pytest.raises(ConfigError, match="cannot read the token file"):
        read_token(None, tmp_path / "missing")


# -- end to end: our client into our upload-server ------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "flags"), [("raw", []), ("qcow2", ["--form", "--async"])])
def test_into_a_real_upload_server(fmt: str, flags: list[str], image: Path, dest: Path, tmp_path: Path) -> None:
    source = image
    if fmt != "raw":
        source = tmp_path / f"disk.{fmt}"
        run("qemu-img", "convert", "-f", "raw", "-O", fmt, image, source)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    certs = make_certs(tmp_path)
    server = UploadServerProcess(certs, dest, tmp_path, "--image-size", "16Mi", "--scratch", str(scratch),
                                 mutual=False)
    try:
        done = upload("--url", f"https://127.0.0.1:{server.port}", "--token", TOKEN, "--image-path", str(source),
                      *flags, ca=certs.ca)
        assert done.returncode == 0, done.stderr + server.stderr()
        assert server.wait() == 0, server.stderr()
    finally:
        server.close()
    assert compare(image, dest / "disk.img").returncode == 0
    assert list(scratch.iterdir()) == []


def test_waits_while_a_real_upload_server_is_busy(image: Path, dest: Path, tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    server = UploadServerProcess(certs, dest, tmp_path, "--image-size", "16Mi", "--stall-timeout", "1",
                                 mutual=False)
    busy = open_upload(server, "/v1beta1/upload", 8 * MiB, certs.client)  # another client, stalled mid-body
    try:
        busy.sendall(bytes(MiB))
        url = f"https://127.0.0.1:{server.port}"
        done = upload("--url", url, "--token", TOKEN, "--image-path", str(image), "--wait-ready", "0.3s", ca=certs.ca)
        assert done.returncode == 1
        assert "(--wait-ready); last time it answered 503 Service Unavailable" in one_error_line(done)
        # The server drops the stalled client after its 1 s stall timeout; we keep asking until then.
        done = upload("--url", url, "--token", TOKEN, "--image-path", str(image), ca=certs.ca)
        assert done.returncode == 0, done.stderr + server.stderr()
        assert "503 Service Unavailable" in done.stderr
        assert server.wait() == 0, server.stderr()
    finally:
        busy.close()
        server.close()
    assert compare(image, dest / "disk.img").returncode == 0

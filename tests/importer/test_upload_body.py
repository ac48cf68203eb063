"""BodyReader against real sockets (plain and TLS): framing, whole reads from 16 KiB records, breaks, deadlines."""

from __future__ import annotations

import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest
import trustme

from importer.deadline import Deadlines, ProgressWatch
from importer.errors import ImporterError, ProgressStopped, SourceError
from importer.qcow2_stream import READ_CHUNK
from importer.serve import body as body_module
from importer.serve.body import BUFFER_SIZE, POLL_INTERVAL, BadRequest, BodyReader

MiB = 1024 * 1024


def reader(sock: socket.socket, length: int | None, chunked: bool = False, stall: float = 60.0,
           cancelled: threading.Event | None = None) -> BodyReader:
    watch = ProgressWatch(Deadlines(stall_timeout=stall, min_rate=0))
    return BodyReader(sock, length, chunked, watch, cancelled or threading.Event())


def read_all(body: BodyReader, size: int = MiB) -> bytes:
    parts = []
    while data := body.read(size):
        parts.append(data)
    return b"".join(parts)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    yield server, client
    server.close()
    client.close()


@pytest.fixture
def tls_pair() -> Iterator[tuple[ssl.SSLSocket, ssl.SSLSocket]]:
    """Both ends of a real TLS connection over a socket pair (records of at most 16 KiB)."""
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("body.test").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    raw_server, raw_client = socket.socketpair()
    raw_server.settimeout(10)
    raw_client.settimeout(10)
    server = server_ctx.wrap_socket(raw_server, server_side=True, do_handshake_on_connect=False)
    client = client_ctx.wrap_socket(raw_client, server_hostname="body.test", do_handshake_on_connect=False)
    handshake = threading.Thread(target=server.do_handshake)
    handshake.start()
    client.do_handshake()
    handshake.join(10)
    yield server, client
    server.close()
    client.close()


def send_later(sock: socket.socket, *parts: bytes, pause: float = 0.0, close: bool = False) -> threading.Thread:
    """Sends parts from a thread, pausing between them; closes the sending end at the end if asked."""
    def run() -> None:
        for i, part in enumerate(parts):
            if i and pause:
                time.sleep(pause)
            sock.sendall(part)
        if close:
            sock.shutdown(socket.SHUT_WR)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_content_length_body_over_tls_comes_in_whole_reads(tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket]) -> None:
    server, client = tls_pair
    data = os.urandom(4 * MiB + 123)
    sender = send_later(client, data, b"NEXT")  # bytes after the body belong to the next thing on the socket
    time.sleep(0.2)  # the socket buffers fill with records of at most 16 KiB
    body = reader(server, len(data))
    sizes = []
    while chunk := body.read(MiB):
        sizes.append(len(chunk))
    sender.join(10)
    assert sum(sizes) == len(data) and body.eof and body.count == len(data)
    # records waiting are joined into one read (before, each read returned a single record)
    assert sizes[0] > 8 * 16 * 1024 and len(sizes) < 20, sizes
    server.settimeout(5)
    assert server.recv(16) == b"NEXT"  # never a byte past the body


def test_chunked_body_with_extensions_and_trailers(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    pieces = [os.urandom(n) for n in (1, 5000, BUFFER_SIZE + 17, 3)]
    wire = b"".join(f"{len(p):x};ext=1\r\n".encode() + p + b"\r\n" for p in pieces) + b"0\r\nX-Trailer: 1\r\n\r\n"
    send_later(client, *[wire[i:i + 7001] for i in range(0, len(wire), 7001)])
    body = reader(server, None, chunked=True)
    assert read_all(body, 4096) == b"".join(pieces)
    assert body.eof and body.count == sum(map(len, pieces))


@pytest.mark.parametrize("wire, message", [
    (b"zz\r\nabc", "invalid chunk size"),
    (b"3\r\nabcXY", "malformed chunked body"),
    (b"1" * 2000, "chunk header line too long"),
])
def test_malformed_chunked_bodies_are_bad_requests(pair: tuple[socket.socket, socket.socket], wire: bytes,
                                                   message: str) -> None:
    server, client = pair
    client.sendall(wire)
    body = reader(server, None, chunked=True)
    with pytest.raises(BadRequest, match=message):
        read_all(body)


def test_a_pausing_sender_gets_what_it_sent_handed_over(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(b"x" * 1000)  # of an announced megabyte, then nothing for now
    body = reader(server, MiB)
    start = time.monotonic()
    assert body.read(MiB) == b"x" * 1000
    assert time.monotonic() - start < POLL_INTERVAL * 3


def test_bytes_before_a_break_are_handed_over_then_the_break(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(b"y" * 5000)
    client.shutdown(socket.SHUT_WR)
    body = reader(server, MiB)
    assert read_all_until_error(body) == b"y" * 5000


def read_all_until_error(body: BodyReader) -> bytes:
    got = body.read(MiB)
    with pytest.raises(SourceError, match="closed the connection after 5000 bytes"):
        body.read(MiB)
    return got


def test_stall_timeout_fires_while_waiting(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(b"z" * 10)
    body = reader(server, 100, stall=1.0)
    assert body.read(100) == b"z" * 10
    start = time.monotonic()
    with pytest.raises(ProgressStopped, match="stall timeout"):
        body.read(100)
    assert time.monotonic() - start < 1.0 + POLL_INTERVAL * 3


def test_cancellation_ends_a_waiting_read(pair: tuple[socket.socket, socket.socket]) -> None:
    server, _client = pair
    cancelled = threading.Event()
    body = reader(server, 100, cancelled=cancelled)
    threading.Timer(0.2, cancelled.set).start()
    with pytest.raises(ImporterError, match="cancelled"):
        body.read(100)


def test_drain_reads_to_the_end(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    send_later(client, b"a" * (3 * MiB), pause=0.05)
    body = reader(server, 3 * MiB)
    assert body.read(10) == b"a" * 10
    assert body.drain(10 * MiB, 10) and body.count == 3 * MiB


def test_many_small_chunks_across_the_buffer_edge(pair: tuple[socket.socket, socket.socket],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk headers that straddle the end of the receive buffer are moved to its front, not lost."""
    monkeypatch.setattr(body_module, "BUFFER_SIZE", 4096)  # many buffer edges in a small body
    server, client = pair
    rng = random.Random(7)
    # mostly tiny chunks, so chunk headers are a good share of the stream and some land on the buffer's edge
    pieces = [rng.randbytes(rng.randint(1, 40) if rng.random() < 0.9 else rng.randint(1, 3000))
              for _ in range(3000)]
    wire = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"
    cuts = sorted(rng.sample(range(1, len(wire)), 300))
    send_later(client, *[wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)])
    body = reader(server, None, chunked=True)
    got = []
    while data := body.read(rng.randint(1, 3 * 4096)):
        got.append(data)
    assert b"".join(got) == b"".join(pieces)


def test_tls_body_hands_over_whole_streaming_chunks(tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket]) -> None:
    """A read of the streaming reader's chunk size is one read of that size, not 1 MiB pieces joined later."""
    server, client = tls_pair
    data = os.urandom(3 * READ_CHUNK + 5000)
    # The last record holds the body's end and the next bytes: those stay for whatever reads the socket next.
    sender = threading.Thread(target=lambda: client.sendall(data + b"NEXT"), daemon=True)
    sender.start()
    body = BodyReader(server, len(data), False, ProgressWatch(Deadlines(stall_timeout=60, min_rate=0)),
                      threading.Event())
    sizes, parts = [], []
    while chunk := body.read(READ_CHUNK):
        sizes.append(len(chunk))
        parts.append(chunk)
    sender.join(10)
    assert b"".join(parts) == data and body.eof and body.count == len(data)
    # A read may come back short when the sender is slow (a read stays open at most POLL_INTERVAL), so not every
    # size is pinned: reads beyond the old 1 MiB cap must happen, and none beyond the chunk asked for.
    assert READ_CHUNK in sizes and max(sizes) == READ_CHUNK, sizes
    server.settimeout(5)
    assert server.recv(16) == b"NEXT"  # never a byte past the body

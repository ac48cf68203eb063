"""Resumable uploads across a server restart (docs/upload.md): a real `hpp-importer upload-server` (and a real node
daemon) over TLS on 127.0.0.1 is killed with SIGKILL while an upload is interrupted, started again on the same
port, and the upload continues from the committed prefix (raw in place) or, for a compressed stream or a qcow2
stream, starts again from byte 0. The resume record is then forged, replaced by a symlink, the prefix tampered
with, or the continuation changed: each is refused cleanly and the destination is left clean."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from impkit import MiB, compare, run
from nodekit import Daemon, Node
from test_upload_resume import request, resumed_at, upload
from uploadkit import HPP_IMPORTER, Certs, CuttingProxy, UploadServerProcess, leftovers, make_certs

from importer.serve.resume_state import RecordRefused, parse_record

IMAGE_SIZE = 8 * MiB
CUT = 3 * MiB
ID = "restart-upload-01"
RECORD = ".hpp-upload-resume.json"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 MiB of random extents with a hole in every fourth MiB (holes must stay holes after the resume)."""
    path = tmp_path_factory.mktemp("restart") / "disk.raw"
    rng = random.Random(11)
    with path.open("wb") as f:
        f.truncate(IMAGE_SIZE)
        for extent in range(IMAGE_SIZE // MiB):
            if extent % 4 != 3:
                f.seek(extent * MiB)
                f.write(rng.randbytes(MiB))
    return path


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


@dataclass
class Restartable:
    """An upload server that the test kills (SIGKILL) and starts again, on the same port, destination and scratch."""

    certs: Certs
    dest: Path
    scratch: Path | None
    root: Path
    port: int
    proc: UploadServerProcess | None = None
    starts: int = 0

    def start(self) -> UploadServerProcess:
        self.starts += 1
        run_dir = self.root / f"run{self.starts}"
        run_dir.mkdir()
        scratch = ["--scratch", str(self.scratch)] if self.scratch is not None else []
        self.proc = UploadServerProcess(self.certs, self.dest, run_dir, "--listen", f"127.0.0.1:{self.port}",
                                        "--image-size", "64Mi", "--resume-hold", "30", *scratch, "-v", mutual=False)
        return self.proc

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.proc.send_signal(signal.SIGKILL)
        self.proc.proc.wait(10)
        self.proc.close()

    @property
    def record(self) -> Path:
        return (self.scratch or self.dest) / RECORD

    def close(self) -> None:
        if self.proc is not None:
            self.proc.close()


def make_server(tmp_path: Path, scratch: bool) -> Restartable:
    dest = tmp_path / "dest"
    dest.mkdir()
    scratch_dir = tmp_path / "scratch" if scratch else None
    if scratch_dir is not None:
        scratch_dir.mkdir()
    server = Restartable(make_certs(tmp_path), dest, scratch_dir, tmp_path, free_port())
    server.start()
    return server


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[Restartable]:
    """Without scratch: the record lives beside disk.img, as a dotfile in the destination."""
    srv = make_server(tmp_path, scratch=False)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture()
def scratch_server(tmp_path: Path) -> Iterator[Restartable]:
    srv = make_server(tmp_path, scratch=True)
    try:
        yield srv
    finally:
        srv.close()


def committed(record: Path, timeout: float = 15) -> dict[str, object]:
    """The record once it says some bytes are committed (the server commits when the upload parks)."""
    end = time.monotonic() + timeout
    while True:
        try:
            value = json.loads(record.read_text())
            if value["offset"] > 0 or not value["resumable"]:
                return dict(value)
        except (FileNotFoundError, ValueError):
            pass
        assert time.monotonic() < end, f"{record} never recorded a committed offset"
        time.sleep(0.05)


def interrupt_with_client(port: int, image: Path, ca: Path) -> CuttingProxy:
    """Our client sends CUT bytes through a proxy, is killed, and its connection closed: the upload parks."""
    proxy = CuttingProxy(port, CUT, hold=True)
    client = subprocess.Popen([HPP_IMPORTER, "upload", "--url", f"https://127.0.0.1:{proxy.port}", "--token",
                               "unused", "--image-path", str(image), "--ca", str(ca), "--no-progress"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert proxy.holding.wait(30), "the client never sent the first part"
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait()
    proxy.release()
    return proxy


def restart_and_finish(server: Restartable, source: Path, proxy: CuttingProxy) -> subprocess.CompletedProcess[str]:
    server.kill()
    proc = server.start()
    try:
        return upload(proxy.port, source, proc.certs.ca)  # the same image: the same upload id
    finally:
        proxy.close()


def test_raw_resumes_after_the_server_is_killed(server: Restartable, image: Path) -> None:
    assert server.proc is not None
    proxy = interrupt_with_client(server.port, image, server.certs.ca)
    record = committed(server.record)
    assert record["route"] == "raw" and record["resumable"] is True, record
    assert isinstance(record["work"], str) and (server.dest / record["work"]).is_file()
    done = restart_and_finish(server, image, proxy)
    assert done.returncode == 0, done.stderr + server.proc.stderr()
    assert resumed_at(done.stderr) == record["offset"]
    assert "resumed after a restart" in server.proc.stderr()
    # Started over, the server would have been sent the cut part again: at least IMAGE_SIZE + CUT in all.
    assert IMAGE_SIZE < proxy.forwarded < IMAGE_SIZE + CUT, proxy.forwarded
    assert server.proc.wait() == 0
    assert compare(image, server.dest / "disk.img").returncode == 0
    assert os.stat(server.dest / "disk.img").st_blocks * 512 < IMAGE_SIZE  # the holes stayed holes
    assert leftovers(server.dest) == ["disk.img"]


def test_qcow2_restarts_from_zero_after_the_server_is_killed(scratch_server: Restartable, image: Path,
                                                            tmp_path: Path) -> None:
    """A qcow2 streams into the volume cluster by cluster, out of order: no prefix to resume, so it starts over
    (and never touches scratch)."""
    server = scratch_server
    assert server.proc is not None and server.scratch is not None
    source = tmp_path / "disk.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", image, source)
    proxy = interrupt_with_client(server.port, source, server.certs.ca)
    record = committed(server.record)
    assert record["route"] == "raw" and record["resumable"] is False, record
    assert any(name.endswith(".part") for name in leftovers(server.dest))
    done = restart_and_finish(server, source, proxy)
    assert done.returncode == 0, done.stderr + server.proc.stderr()
    assert "resuming at byte" not in done.stderr
    assert proxy.forwarded > source.stat().st_size + CUT // 2  # sent again from byte 0
    assert server.proc.wait() == 0
    assert compare(image, server.dest / "disk.img").returncode == 0
    assert leftovers(server.dest) == ["disk.img"]
    assert os.listdir(server.scratch) == []


def test_gz_restarts_from_zero_after_the_server_is_killed(server: Restartable, image: Path, tmp_path: Path) -> None:
    assert server.proc is not None
    source = tmp_path / "disk.raw.gz"
    source.write_bytes(gzip.compress(image.read_bytes(), compresslevel=0))  # stored blocks: as large
    proxy = interrupt_with_client(server.port, source, server.certs.ca)
    record = committed(server.record)
    assert record["resumable"] is False, record
    assert any(name.endswith(".part") for name in leftovers(server.dest))
    server.kill()
    proc = server.start()
    assert leftovers(server.dest) == []  # cleaned at start: a decoded stream cannot resume
    try:
        done = upload(proxy.port, source, proc.certs.ca)
    finally:
        proxy.close()
    assert done.returncode == 0, done.stderr + proc.stderr()
    assert "resuming at byte" not in done.stderr
    assert proxy.forwarded > source.stat().st_size + CUT // 2  # sent again from byte 0
    assert proc.wait() == 0
    assert compare(image, server.dest / "disk.img").returncode == 0
    assert leftovers(server.dest) == ["disk.img"]


def interrupt_with_curl(server: Restartable, data: bytes, checksum: str | None = None) -> dict[str, object]:
    """A resumable upload that breaks after CUT bytes, then the server is killed; the record it left."""
    assert server.proc is not None
    headers = {"Upload-Id": ID, "Upload-Length": str(len(data)), "Content-Length": str(len(data))}
    if checksum is not None:
        headers["Upload-Checksum"] = checksum
    ctx = ssl.create_default_context(cafile=str(server.certs.ca))
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=10),
                         server_hostname="127.0.0.1") as sock:
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        sock.sendall(f"PUT /v1beta1/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}\r\n".encode() + data[:CUT])
        # Closed only once the server wrote what it took: a close with its TLS tickets unread is a reset, which
        # drops what the server had not read yet.
        end = time.monotonic() + 15
        while max((p.stat().st_size for p in server.dest.glob(".*.part")), default=0) < CUT - MiB:
            assert time.monotonic() < end, "the server never wrote the first part"
            time.sleep(0.02)
    record = committed(server.record)
    server.kill()
    return record


def continuation(server: Restartable, tmp: Path, data: bytes, offset: int) -> tuple[int, str, dict[str, str]]:
    assert server.proc is not None
    tail = tmp / "tail"
    tail.write_bytes(data[offset:])
    return request(server.proc, tmp, "--data-binary", f"@{tail}", "-H", f"Upload-Id: {ID}",
                   "-H", f"Upload-Length: {len(data)}", "-H", f"Upload-Offset: {offset}")


@pytest.mark.parametrize("forgery", ["length", "offset", "symlink"])
def test_a_forged_record_is_refused_and_the_target_cleaned(server: Restartable, image: Path, tmp_path: Path,
                                                           forgery: str) -> None:
    data = image.read_bytes()
    record = interrupt_with_curl(server, data)
    offset = int(str(record["offset"]))
    elsewhere = tmp_path / "elsewhere.json"
    if forgery == "length":
        server.record.write_text(json.dumps({**record, "length": len(data) + MiB}))
    elif forgery == "offset":
        server.record.write_text(json.dumps({**record, "offset": len(data) - 1}))  # past the committed file
    else:
        elsewhere.write_text(json.dumps(record))
        server.record.unlink()
        server.record.symlink_to(elsewhere)
    proc = server.start()
    status, _, headers = request(proc, tmp_path, "-I", "-H", f"Upload-Id: {ID}")
    if forgery == "length":  # HEAD carries no length: the client compares the one answered with its own
        assert status == 200 and headers["upload-length"] == str(len(data) + MiB), headers
    else:
        assert status == 404
        assert leftovers(server.dest) == []
    status, body, headers = continuation(server, tmp_path, data, offset)
    assert status == 409 and headers["upload-offset"] == "0", (body, headers)
    assert leftovers(server.dest) == []  # no record, no temporary image
    if forgery == "symlink":
        assert json.loads(elsewhere.read_text()) == record  # the link was removed, never followed
    done = upload(server.port, image, server.certs.ca)  # and the destination takes a fresh upload
    assert done.returncode == 0, done.stderr + proc.stderr()
    assert compare(image, server.dest / "disk.img").returncode == 0


@pytest.mark.parametrize("changed", ["continuation", "prefix"])
def test_changed_bytes_fail_the_whole_image_checksum(server: Restartable, image: Path, tmp_path: Path,
                                                     changed: str) -> None:
    """The checksum covers the prefix read back from disk and the continuation: a change on either side fails."""
    data = image.read_bytes()
    record = interrupt_with_curl(server, data, "sha256:" + hashlib.sha256(data).hexdigest())
    offset = int(str(record["offset"]))
    sent = data
    if changed == "continuation":
        sent = data[:offset] + bytes(b ^ 0xFF for b in data[offset:offset + 16]) + data[offset + 16:]
    else:
        with (server.dest / str(record["work"])).open("r+b") as part:
            part.seek(offset // 2)
            part.write(b"tampered")
    proc = server.start()
    status, _, headers = request(proc, tmp_path, "-I", "-H", f"Upload-Id: {ID}")
    assert status == 200 and headers["upload-offset"] == str(offset), headers
    status, body, _ = continuation(server, tmp_path, sent, offset)
    assert status == 400 and "checksum mismatch" in body, body + proc.stderr()
    assert leftovers(server.dest) == []


def test_async_upload_resumes_after_a_cut_connection(tmp_path: Path, image: Path) -> None:
    """upload-async with resume: answered once the last byte is in, after the connection broke once."""
    dest = tmp_path / "dest"
    dest.mkdir()
    proc = UploadServerProcess(make_certs(tmp_path), dest, tmp_path, "--image-size", "64Mi", "-v", mutual=False)
    proxy = CuttingProxy(proc.port, CUT)
    try:
        done = subprocess.run([HPP_IMPORTER, "upload", "--url", f"https://127.0.0.1:{proxy.port}", "--token", "x",
                               "--image-path", str(image), "--ca", str(proc.certs.ca), "--no-progress", "--async"],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr + proc.stderr()
        assert 0 < resumed_at(done.stderr) <= CUT
        assert IMAGE_SIZE < proxy.forwarded < IMAGE_SIZE + CUT, proxy.forwarded
        assert proc.wait() == 0
        assert compare(image, dest / "disk.img").returncode == 0
        assert leftovers(dest) == ["disk.img"]
    finally:
        proxy.close()
        proc.close()


@pytest.mark.parametrize("mode", ["file", "block"])
def test_daemon_resumes_raw_after_it_is_killed(node: Node, image: Path, mode: str) -> None:
    """The node daemon, into a file volume (a temporary file beside disk.img) and a block volume (its image file,
    in place): the record lives in the pool's driver-owned folder, never in the volume."""
    port = free_port()
    volume_id, volume = node.volume(16 * MiB, block=mode == "block")
    token = node.token(volume_id)
    record_path = node.driver.pool_path() / ".hpp-csi" / "uploads" / f"{volume_id}.json"
    first = Daemon(node.driver, node.key_file, "--listen", f"127.0.0.1:{port}")
    second: Daemon | None = None
    proxy = CuttingProxy(port, CUT, hold=True)
    try:
        client = subprocess.Popen([HPP_IMPORTER, "upload", "--url", f"https://127.0.0.1:{proxy.port}", "--token",
                                   token, "--image-path", str(image), "--ca", str(first.cert), "--no-progress"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert proxy.holding.wait(30), "the client never sent the first part"
        finally:
            client.send_signal(signal.SIGKILL)
            client.wait()
        proxy.release()
        record = committed(record_path)
        assert record["route"] == "raw" and record["resumable"] is True, record
        assert (record["work"] == "") is (mode == "block"), record
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        second = Daemon(node.driver, node.key_file, "--listen", f"127.0.0.1:{port}")
        done = upload(proxy.port, image, second.cert, token=token)
        assert done.returncode == 0, done.stderr + second.log()
        assert resumed_at(done.stderr) == record["offset"]
        assert IMAGE_SIZE < proxy.forwarded < IMAGE_SIZE + CUT, proxy.forwarded
    finally:
        proxy.close()
        first.close()
        if second is not None:
            second.close()
    if mode == "block":
        assert volume.stat().st_size == 16 * MiB and compare(image, volume).returncode == 0
    else:
        assert compare(image, volume / "disk.img").returncode == 0
        assert sorted(os.listdir(volume)) == ["disk.img"]
    assert not record_path.exists()


GOOD_RECORD = {"version": 1, "upload_id": ID, "length": IMAGE_SIZE, "checksum": None, "route": "raw",
               "resumable": True, "offset": MiB, "work": ".disk.img.0123456789ab.part"}


@pytest.mark.parametrize("change", [
    {"version": 2}, {"upload_id": "short"}, {"upload_id": "../../etc/passwd"}, {"length": -1}, {"length": "8"},
    {"offset": IMAGE_SIZE + 1}, {"offset": True}, {"checksum": "sha256:abc"}, {"checksum": 5}, {"route": "stream"},
    {"resumable": "yes"}, {"work": "../disk.img"}, {"work": "/etc/shadow"}, {"work": "disk.img"},
    {"route": "scratch"},  # a temporary image's name where a scratch file's is expected
])
def test_every_field_of_a_record_is_checked(change: dict[str, object]) -> None:
    assert parse_record(json.dumps(GOOD_RECORD).encode()).offset == MiB
    with pytest.raises(RecordRefused):
        parse_record(json.dumps({**GOOD_RECORD, **change}).encode())
    with pytest.raises(RecordRefused):
        parse_record(b"\xff not json")

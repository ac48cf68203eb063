"""Resumable uploads (docs/upload.md): a real `hpp-importer upload-server` and a real node daemon over TLS on
127.0.0.1, our client through a TCP proxy that cuts the connection mid-way. The proxy counts the bytes the server
was sent in all: fewer than the image plus the cut part proves the upload continued instead of starting over."""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from impkit import MiB, compare, run
from nodekit import Node
from uploadkit import HPP_IMPORTER, CuttingProxy, UploadServerProcess, curl, leftovers, make_certs

from importer.upload_client import ImageFile

IMAGE_SIZE = 48 * MiB
CUT = 16 * MiB
ID = "test-upload-0001"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 MiB of random extents (some half full) and a hole in every sixth MiB: qcow2 keeps it over 2 cuts."""
    path = tmp_path_factory.mktemp("resume") / "disk.raw"
    rng = random.Random(10)
    with path.open("wb") as f:
        f.truncate(IMAGE_SIZE)
        for extent in range(IMAGE_SIZE // MiB):
            if extent % 6 != 5:
                f.seek(extent * MiB)
                f.write(rng.randbytes(MiB if extent % 7 else MiB // 2))
    return path


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[UploadServerProcess, Path]]:
    dest = tmp_path / "dest"
    dest.mkdir()
    certs = make_certs(tmp_path)
    proc = UploadServerProcess(certs, dest, tmp_path, "--image-size", "64Mi", "--resume-hold", "2", "-v", mutual=False)
    try:
        yield proc, dest
    finally:
        proc.close()


def upload(port: int, image: Path, ca: Path, token: str = "unused", timeout: float = 60,
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HPP_IMPORTER, "upload", "--url", f"https://127.0.0.1:{port}", "--token", token,
                           "--image-path", str(image), "--ca", str(ca), "--no-progress"],
                          capture_output=True, text=True, timeout=timeout, check=False)


def resumed_at(stderr: str) -> int:
    found = re.search(r"resuming at byte (\d+)", stderr)
    assert found, stderr
    return int(found.group(1))


def test_raw_resumes_after_a_cut_connection(server: tuple[UploadServerProcess, Path], image: Path) -> None:
    proc, dest = server
    proxy = CuttingProxy(proc.port, CUT)
    try:
        done = upload(proxy.port, image, proc.certs.ca)
    finally:
        proxy.close()
    assert done.returncode == 0, done.stderr + proc.stderr()
    assert 0 < resumed_at(done.stderr) <= CUT
    # Started over, the server would have been sent the cut part again: at least IMAGE_SIZE + CUT in all.
    assert IMAGE_SIZE < proxy.forwarded < IMAGE_SIZE + CUT * 3 // 4, proxy.forwarded
    assert "resumed at byte" in proc.stderr()
    assert proc.wait() == 0
    assert compare(image, dest / "disk.img").returncode == 0
    assert leftovers(dest) == ["disk.img"]


def test_a_killed_client_started_again_resumes(server: tuple[UploadServerProcess, Path], image: Path) -> None:
    proc, dest = server
    proxy = CuttingProxy(proc.port, CUT, hold=True)
    try:
        client = subprocess.Popen([HPP_IMPORTER, "upload", "--url", f"https://127.0.0.1:{proxy.port}", "--token",
                                   "unused", "--image-path", str(image), "--ca", str(proc.certs.ca), "--no-progress"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert proxy.holding.wait(30), "the client never sent the first part"
        finally:
            client.send_signal(signal.SIGKILL)
            client.wait()
        proxy.release()
        done = upload(proxy.port, image, proc.certs.ca)  # the same image: the same upload id, no local state
    finally:
        proxy.close()
    assert done.returncode == 0, done.stderr + proc.stderr()
    assert 0 < resumed_at(done.stderr) <= CUT
    assert IMAGE_SIZE < proxy.forwarded < IMAGE_SIZE + CUT * 3 // 4, proxy.forwarded
    assert proc.wait() == 0
    assert compare(image, dest / "disk.img").returncode == 0


def send_part(proc: UploadServerProcess, headers: dict[str, str], data: bytes) -> None:
    """A resumable upload that announces a body and breaks after sending data (then the connection closes)."""
    ctx = ssl.create_default_context(cafile=str(proc.certs.ca))
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", proc.port), timeout=10),
                         server_hostname="127.0.0.1") as sock:
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        sock.sendall(f"PUT /v1beta1/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}\r\n".encode() + data)


def request(proc: UploadServerProcess, tmp: Path, *args: str) -> tuple[int, str, dict[str, str]]:
    """(status, body, headers) of one curl request to /v1beta1/upload."""
    dump = tmp / "headers.txt"
    status, body, _ = curl(proc.certs, proc.port, "/v1beta1/upload", "-D", str(dump), *args)
    headers = {}
    for line in dump.read_text().splitlines()[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status, body, headers


def test_offsets_conflicts_and_checksums(server: tuple[UploadServerProcess, Path], image: Path,
                                          tmp_path: Path) -> None:
    proc, dest = server
    data = image.read_bytes()
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    resumable = ["-H", f"Upload-Id: {ID}", "-H", f"Upload-Length: {len(data)}"]

    # A checksum that does not match: refused once every byte is in, and nothing is left behind.
    status, body, _ = request(proc, tmp_path, "--data-binary", f"@{image}", *resumable,
                              "-H", "Upload-Checksum: sha256:" + "0" * 64)
    assert status == 400 and "checksum mismatch" in body, body
    assert leftovers(dest) == []

    # No interrupted upload of that id: HEAD answers 404, a continuation is sent back to byte 0.
    status, _, _ = request(proc, tmp_path, "-I", *resumable)
    assert status == 404
    status, body, headers = request(proc, tmp_path, "--data-binary", "@/dev/null", "-H", "Upload-Id: other-id-123",
                                    "-H", f"Upload-Length: {len(data)}", "-H", f"Upload-Offset: {len(data)}")
    assert status == 409 and headers["upload-offset"] == "0", (body, headers)

    # An upload broken after 8 MiB: the server says how much it took; a wrong offset gets 409 and the right one.
    send_part(proc, {"Upload-Id": ID, "Upload-Length": str(len(data)), "Content-Length": str(len(data)),
                     "Upload-Checksum": good}, data[: 8 * MiB])
    status, _, headers = request(proc, tmp_path, "-I", *resumable)
    assert status == 200 and headers["upload-length"] == str(len(data)), headers
    offset = int(headers["upload-offset"])
    assert 0 < offset <= 8 * MiB
    another = request(proc, tmp_path, "--data-binary", f"@{image}", "-H", "Upload-Id: someone-else-1",
                      "-H", f"Upload-Length: {len(data)}")
    assert another[0] == 503  # the interrupted upload holds the destination
    tail = tmp_path / "tail"
    tail.write_bytes(data[offset + 4096:])
    status, body, headers = request(proc, tmp_path, "--data-binary", f"@{tail}", *resumable,
                                    "-H", f"Upload-Offset: {offset + 4096}")
    assert status == 409 and headers["upload-offset"] == str(offset), (body, headers)
    tail.write_bytes(data[offset:])
    status, body, _ = request(proc, tmp_path, "--data-binary", f"@{tail}", *resumable,
                              "-H", f"Upload-Offset: {offset}")
    assert status == 200, body + proc.stderr()
    assert proc.wait() == 0
    assert compare(image, dest / "disk.img").returncode == 0


def test_an_upload_not_resumed_in_time_is_cleaned_and_restarts(server: tuple[UploadServerProcess, Path],
                                                                image: Path) -> None:
    proc, dest = server
    opened = ImageFile(image)
    try:
        upload_id = opened.upload_id()  # the id our client derives from this image
    finally:
        opened.close()
    data = image.read_bytes()
    send_part(proc, {"Upload-Id": upload_id, "Upload-Length": str(len(data)), "Content-Length": str(len(data))},
              data[: 8 * MiB])
    end = time.monotonic() + 15
    while "not resumed within 2 s" not in proc.stderr():  # --resume-hold 2
        assert time.monotonic() < end, proc.stderr()
        time.sleep(0.1)
    assert leftovers(dest) == []
    done = upload(proc.port, image, proc.certs.ca)  # the server holds nothing of it now: from byte 0
    assert done.returncode == 0, done.stderr + proc.stderr()
    assert "resuming at byte" not in done.stderr
    assert compare(image, dest / "disk.img").returncode == 0


@pytest.mark.parametrize("fmt", ["raw", "raw.gz", "qcow2"])
def test_daemon_resumes_raw_compressed_and_qcow2_uploads(node: Node, image: Path, tmp_path: Path,
                                                         fmt: str) -> None:
    """raw written in place, raw.gz decoded straight into the volume, qcow2 placed cluster by cluster as it streams."""
    source = image
    if fmt == "qcow2":
        source = tmp_path / "disk.qcow2"
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", image, source)
    elif fmt == "raw.gz":
        source = tmp_path / "disk.raw.gz"
        source.write_bytes(gzip.compress(image.read_bytes(), compresslevel=0))  # stored blocks: as large
    size = source.stat().st_size
    assert size > 2 * CUT
    volume_id, volume = node.volume(64 * MiB)
    proxy = CuttingProxy(node.daemon.port, CUT)
    try:
        done = upload(proxy.port, source, node.daemon.cert, token=node.token(volume_id))
    finally:
        proxy.close()
    assert done.returncode == 0, done.stderr + node.daemon.log()
    assert 0 < resumed_at(done.stderr) <= CUT
    assert size < proxy.forwarded < size + CUT * 3 // 4, proxy.forwarded
    assert compare(image, volume / "disk.img").returncode == 0
    assert sorted(os.listdir(volume)) == ["disk.img"]
    assert os.listdir(node.driver.pool_path() / ".hpp-csi" / "staging") == []

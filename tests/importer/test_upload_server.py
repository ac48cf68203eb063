"""`hpp-importer upload-server` as CDI's upload pod: real processes, TLS from trustme, real curl, real loop device."""

from __future__ import annotations

import datetime
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from impkit import Images, LoopDevice, MiB, compare
from uploadkit import Certs, UploadServerProcess, curl, leftovers, make_certs, open_upload

from importer.serve.body import BadRequest
from importer.serve.multipart import FormFileReader, boundary_of
from importer.serve.upload_server import UploadServer, UploadServerConfig
from importer.target import open_target


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("upload-certs"))


@pytest.fixture
def start(certs: Certs, tmp_path: Path) -> Iterator[type[UploadServerProcess]]:
    started: list[UploadServerProcess] = []

    def factory(dest: Path, *args: str, **kwargs: object) -> UploadServerProcess:
        server = UploadServerProcess(certs, dest, tmp_path, *args, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield factory  # type: ignore[misc]
    for server in started:
        server.close()


@pytest.fixture(scope="module")
def small_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 MiB of zeros in a gzip of 64 KiB: it must stop at the usable size, not fill the disk."""
    path = tmp_path_factory.mktemp("upload-bomb") / "bomb.raw.gz"
    subprocess.run(f"head -c 64M /dev/zero | gzip -1 -c > {path}", shell=True, check=True)
    return path


def test_raw_put_with_mutual_tls(images: Images, certs: Certs, start: type[UploadServerProcess],
                                 dest: Path) -> None:
    server = start(dest, "--image-size", "16Mi")
    assert server.healthz() == "OK"
    status, body, _ = server.curl("/v1beta1/upload", "-T", str(images.files["raw"]), client=certs.wrong_client)
    assert status == 401, body
    status, _, rc = server.curl("/v1beta1/upload", "-T", str(images.files["raw"]))  # no client certificate
    assert status == 0 and rc != 0
    assert server.curl("/v1beta1/upload-async", "-I", client=certs.client)[0] == 200  # HEAD: CDI's probe
    assert server.curl("/v1beta1/upload", client=certs.client)[0] == 404  # GET
    assert server.curl("/v1beta1/elsewhere", "-T", str(images.files["raw"]), client=certs.client)[0] == 404
    assert leftovers(dest) == []
    status, body, _ = server.curl("/v1beta1/upload", "-T", str(images.files["raw"]), client=certs.client)
    assert status == 200, body
    assert server.wait() == 0, server.stderr()
    assert server.termination() == {"preallocationApplied": False, "message": "Upload Complete"}
    assert compare(images.files["raw"], dest / "disk.img").returncode == 0
    assert (dest / "disk.img").stat().st_size == 15 * MiB  # 16Mi less 5.5% overhead, as an import


@pytest.mark.parametrize(("name", "path", "how"), [
    ("raw.gzip", "/v1beta1/upload-async", "binary"),
    ("raw.xz", "/v1beta1/upload-form", "form"),
    ("qcow2", "/v1alpha1/upload-form-async", "form"),
    ("qcow2", "/v1alpha1/upload", "binary"),
])
def test_endpoints_and_routes(images: Images, certs: Certs, start: type[UploadServerProcess], dest: Path,
                              tmp_path: Path, name: str, path: str, how: str) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    server = start(dest, "--image-size", "16Mi", "--scratch", str(scratch), "--preallocation")
    image = images.files[name]
    args = ["-F", f"file=@{image};filename=../../etc/evil"] if how == "form" else ["--data-binary", f"@{image}"]
    if how == "form":
        args = ["-F", "note=ignored", *args, "-F", "after=also ignored"]
    status, body, _ = server.curl(path, *args, client=certs.client)
    assert status == 200, body
    assert server.wait() == 0, server.stderr()
    assert server.termination() == {"preallocationApplied": True, "message": "Upload Complete"}
    assert compare(images.references[name], dest / "disk.img").returncode == 0
    assert leftovers(dest) == ["disk.img"]
    assert list(scratch.iterdir()) == []
    summary = server.proc.communicate()[0]
    assert "route stream" in summary and "via scratch" not in summary, summary  # qcow2 too: streamed


def test_block_destination(images: Images, certs: Certs, start: type[UploadServerProcess],
                           loop_device: LoopDevice) -> None:
    with loop_device.device.open("r+b") as f:  # what was on the device before must not show through
        f.write(b"\xff" * (12 * MiB))
    server = start(loop_device.device, "--filesystem-overhead", "0.5")  # a block device gets no overhead
    status, body, _ = server.curl("/v1beta1/upload", "--data-binary", f"@{images.files['raw.xz']}",
                                  client=certs.client)
    assert status == 200, body
    assert server.wait() == 0, server.stderr()
    assert compare(images.files["raw"], loop_device.device).returncode == 0


def test_too_large_is_refused_and_the_target_stays_clean(images: Images, certs: Certs, small_bomb: Path,
                                                         start: type[UploadServerProcess], dest: Path,
                                                         tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    server = start(dest, "--image-size", "4Mi", "--scratch", str(scratch))
    usable = 4 * MiB * 945 // 1000 // MiB * MiB
    status, body, _ = server.curl("/v1beta1/upload", "-T", str(images.files["raw"]), client=certs.client)
    assert status == 400
    assert body == (f"Saving stream failed: virtual image size {8 * MiB} is larger than the reported available "
                    f"storage {usable}; a larger volume is required")
    status, body, _ = server.curl("/v1beta1/upload", "-T", str(images.files["qcow2"]), client=certs.client)
    assert status == 400 and "a larger volume is required" in body
    status, body, _ = server.curl("/v1beta1/upload-form", "-F", f"file=@{small_bomb}", client=certs.client)
    assert status == 400 and "virtual image size at least" in body
    assert leftovers(dest) == [] and list(scratch.iterdir()) == []
    assert server.proc.poll() is None  # a failed upload leaves the server waiting for the next one


def test_one_upload_at_a_time_and_stalled_clients(images: Images, certs: Certs, start: type[UploadServerProcess],
                                                  dest: Path) -> None:
    server = start(dest, "--image-size", "16Mi", "--stall-timeout", "1")
    raw = images.files["raw"].read_bytes()
    first = open_upload(server, "/v1beta1/upload", len(raw), certs.client)
    try:
        first.sendall(raw[:MiB])
        time.sleep(0.3)
        status, _, _ = server.curl("/v1beta1/upload-async", "-T", str(images.files["raw"]), client=certs.client)
        assert status == 503
        answer = b""  # the stalled client is answered and dropped after the stall timeout
        while chunk := first.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 500") and b"stall timeout of 1 s" in answer, answer
    finally:
        first.close()
    assert leftovers(dest) == []
    second = open_upload(server, "/v1beta1/upload", len(raw), certs.client)
    second.sendall(raw[:3 * MiB])
    second.close()  # a client that hangs up mid-body
    time.sleep(0.5)
    assert leftovers(dest) == []
    status, body, _ = server.curl("/v1beta1/upload", "-T", str(images.files["raw"]), client=certs.client)
    assert status == 200, body
    assert server.wait() == 0
    assert compare(images.files["raw"], dest / "disk.img").returncode == 0


def test_deadline_passed(certs: Certs, start: type[UploadServerProcess], dest: Path) -> None:
    deadline = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1)).isoformat()
    server = start(dest, env={"DEADLINE": deadline})
    assert server.wait(timeout=10) == 0
    assert server.termination() == {"deadlinePassed": True, "message": "Deadline Passed"}
    assert leftovers(dest) == []


def test_cdi_environment(images: Images, certs: Certs, start: type[UploadServerProcess], dest: Path) -> None:
    """Everything but the test's ports from CDI's variables (DESTINATION as CDI's /data/disk.img)."""
    env = {"DESTINATION": str(dest / "disk.img"), "UPLOAD_IMAGE_SIZE": "12Mi", "FILESYSTEM_OVERHEAD": "0",
           "PREALLOCATION": "true", "CLIENT_CERT_FILE": str(certs.ca), "CLIENT_NAME": "cdi-uploadproxy"}
    server = start(dest, env=env, mutual=False)
    status, _, _ = server.curl("/v1beta1/upload", "-T", str(images.files["raw"]), client=certs.wrong_client)
    assert status == 401
    status, body, _ = server.curl("/v1beta1/upload", "-T", str(images.files["raw"]), client=certs.client)
    assert status == 200, body
    assert server.wait() == 0
    assert server.termination() == {"preallocationApplied": True, "message": "Upload Complete"}
    assert (dest / "disk.img").stat().st_size == 12 * MiB


def test_done_answers_409(images: Images, certs: Certs, dest: Path) -> None:
    """In process, to hold the server open after its upload (the command exits at once, as CDI's pod does)."""
    config = UploadServerConfig(listen=("127.0.0.1", 0), healthz=("127.0.0.1", 0),
                                open_target=lambda: open_target(dest), tls_cert=certs.cert, tls_key=certs.key,
                                image_size=16 * MiB)
    server = UploadServer(config)
    server.start()
    try:
        status, body, _ = curl(certs, server.port, "/v1beta1/upload", "-T", str(images.files["raw"]))
        assert status == 200, body
        # The slot is settled (DONE) before the answer; the server is told it may stop just after it.
        assert server.finished.wait(10)
        assert curl(certs, server.port, "/v1beta1/upload", "-T", str(images.files["raw"]))[0] == 409
    finally:
        server.close()
    assert compare(images.files["raw"], dest / "disk.img").returncode == 0


def test_async_failure_after_the_answer_exits_1(images: Images, certs: Certs, start: type[UploadServerProcess],
                                                dest: Path, tmp_path: Path) -> None:
    """A vmdk too large is found only once in scratch: async has answered 200, so the pod fails (as CDI's).
    (A qcow2 streams: its size is checked from its header, before the answer.)"""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    server = start(dest, "--image-size", "4Mi", "--scratch", str(scratch))
    status, body, _ = server.curl("/v1beta1/upload-async", "-T", str(images.files["vmdk"]), client=certs.client)
    assert status == 200, body
    assert server.wait() == 1
    assert "a larger volume is required" in str(server.termination()["message"])
    assert leftovers(dest) == [] and list(scratch.iterdir()) == []


class _Pieces:
    """A body delivered in tiny reads, so every boundary and header straddles reads."""

    def __init__(self, data: bytes, size: int) -> None:
        self._data, self._size = data, size

    def read(self, size: int, /) -> bytes:
        out, self._data = self._data[:min(size, self._size)], self._data[min(size, self._size):]
        return out

    def close(self) -> None:
        pass


@pytest.mark.parametrize("piece", [1, 7, 70, 4096])
def test_form_field_file_is_streamed_across_reads(piece: int) -> None:
    content = b"\r\n--XY not quite the boundary\r\n--X" * 50 + bytes(range(256)) * 20
    body = (b"preamble\r\n--XYZ\r\nContent-Disposition: form-data; name=\"filename\"\r\n\r\nfile\r\n"
            b"--XYZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"../x\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" + content +
            b"\r\n--XYZ\r\nContent-Disposition: form-data; name=\"later\"\r\n\r\nx\r\n--XYZ--\r\n")
    reader = FormFileReader(_Pieces(body, piece), boundary_of('multipart/form-data; boundary="XYZ"'))
    got = b""
    while chunk := reader.read(1000):
        got += chunk
    assert got == content


def test_form_without_file_field_is_a_bad_request() -> None:
    body = b"--B\r\nContent-Disposition: form-data; filename=\"file\"\r\n\r\nx\r\n--B--\r\n"
    with pytest.raises(BadRequest, match="no field named 'file'"):
        FormFileReader(_Pieces(body, 5), b"B").read(10)

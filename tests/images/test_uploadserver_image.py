"""The upload server image as CDI runs it: its own entrypoint with `-v=N`, CDI's environment (server certificate,
client CA and name of the upload proxy, size, overhead), UID 107, ports 8443 and 8080 in a network namespace of
its own. Real curl, entered into that namespace, sends the upload over TLS with the proxy's client certificate."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from dockerkit import CDI_UID, container_name, logs, pid_of, require_image, started, wait_exit
from impkit import compare
from uploadkit import PROXY_NAME, Certs, make_certs

pytestmark = pytest.mark.timeout(180)
READY_TIMEOUT = 30.0
UPLOAD_TIMEOUT = 90.0


@pytest.fixture(scope="module")
def uploadserver_image() -> str:
    return require_image("uploadserver")


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    """Readable by UID 107, as the secret volume CDI mounts."""
    folder = tmp_path / "certs"
    folder.mkdir()
    made = make_certs(folder)
    for path in (folder, *folder.iterdir()):
        os.chown(path, CDI_UID, CDI_UID)
    return made


def curl_in(pid: int, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Host curl inside the container's network namespace: 127.0.0.1 there is the container's own loopback."""
    return subprocess.run(["nsenter", "--target", str(pid), "--net", "curl", "--silent", "--show-error",
                           "--max-time", str(timeout), *args], capture_output=True, text=True, timeout=timeout + 10,
                          check=False)


def wait_ready(name: str, pid: int) -> None:
    """CDI's readiness probe: GET /healthz on 8080."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        done = curl_in(pid, "--output", "/dev/null", "--write-out", "%{http_code}", "http://127.0.0.1:8080/healthz",
                       timeout=5)
        if done.stdout == "200":
            return
        time.sleep(0.2)
    raise AssertionError(f"upload server not ready within {READY_TIMEOUT}s:\n{logs(name)}")


def cdi_upload_run_args(certs: Certs, volume: Path, scratch: Path, log: Path) -> list[str]:
    env = {
        "TLS_KEY_FILE": "/certs/server.key", "TLS_CERT_FILE": "/certs/server.pem",
        "CLIENT_CERT_FILE": "/certs/ca.pem", "CLIENT_NAME": PROXY_NAME, "UPLOAD_IMAGE_SIZE": "64Mi",
        "FILESYSTEM_OVERHEAD": "0.055", "PREALLOCATION": "false", "DESTINATION": "/data/disk.img",
    }
    return ["--network", "none", "--user", f"{CDI_UID}:{CDI_UID}",
            "-v", f"{volume}:/data", "-v", f"{scratch}:/scratch", "-v", f"{certs.ca.parent}:/certs:ro",
            "-v", f"{log}:/dev/termination-log",
            *[arg for name, value in env.items() for arg in ("-e", f"{name}={value}")]]


@pytest.mark.parametrize("source", ["qcow2", "raw.xz"])
def test_upload_over_tls(uploadserver_image: str, certs: Certs, disk_images: dict[str, Path],
                         pod_files: tuple[Path, Path, Path], source: str) -> None:
    """qcow2 goes through the scratch space and the image's qemu-img; raw.xz streams through its xz."""
    volume, scratch, log = pod_files
    name = container_name("upload")
    with started(name, [*cdi_upload_run_args(certs, volume, scratch, log), uploadserver_image, "-v=1"]):
        pid = pid_of(name)
        wait_ready(name, pid)
        sent = curl_in(pid, "--cacert", str(certs.ca), "--cert", str(certs.client), "--upload-file",
                       str(disk_images[source]), "--write-out", "%{http_code}", "--output", "/dev/null",
                       "https://127.0.0.1:8443/v1beta1/upload", timeout=UPLOAD_TIMEOUT)
        assert sent.stdout == "200", f"{sent.stdout} {sent.stderr}\n{logs(name)}"
        assert wait_exit(name, UPLOAD_TIMEOUT) == 0, logs(name)
    disk = volume / "disk.img"
    assert compare(disk_images["raw"], disk).returncode == 0
    assert disk.stat().st_uid == CDI_UID
    assert json.loads(log.read_text())["message"] == "Upload Complete"
    assert sorted(p.name for p in volume.iterdir()) == ["disk.img"] and list(scratch.iterdir()) == []


def test_client_other_than_the_proxy_refused(uploadserver_image: str, certs: Certs, disk_images: dict[str, Path],
                                             pod_files: tuple[Path, Path, Path]) -> None:
    """Only CLIENT_NAME's certificate may upload: another one of the same CA leaves the volume untouched."""
    volume, scratch, log = pod_files
    name = container_name("upload")
    with started(name, [*cdi_upload_run_args(certs, volume, scratch, log), uploadserver_image, "-v=1"]):
        pid = pid_of(name)
        wait_ready(name, pid)
        sent = curl_in(pid, "--cacert", str(certs.ca), "--cert", str(certs.wrong_client), "--upload-file",
                       str(disk_images["raw"]), "--write-out", "%{http_code}", "--output", "/dev/null",
                       "https://127.0.0.1:8443/v1beta1/upload", timeout=30)
        assert sent.stdout != "200", sent
        assert list(volume.iterdir()) == []

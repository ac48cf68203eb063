"""The importer image as CDI runs it: its own entrypoint with `-v=N`, the whole IMPORTER_* environment of an HTTP
import, UID 107, the volume at /data, the termination message at /dev/termination-log; the image server is a real
one on the host's 127.0.0.1 (the container shares the host's network)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from dockerkit import CDI_UID, container_name, logs, require_image, started, wait_exit
from imageserver import ImageServer, Route
from impkit import compare

pytestmark = pytest.mark.timeout(180)
IMPORT_TIMEOUT = 90.0


@pytest.fixture(scope="module")
def importer_image() -> str:
    return require_image("importer")


@pytest.fixture(scope="module")
def server(disk_images: dict[str, Path]) -> Iterator[ImageServer]:
    srv = ImageServer()
    for name, path in disk_images.items():
        srv.add(f"/{name}", Route(path))
    srv.add("/no-ranges.qcow2", Route(disk_images["qcow2"], ranges=False))
    try:
        yield srv
    finally:
        srv.close()


def cdi_import_env(endpoint: str) -> dict[str, str]:
    """Every variable CDI's import controller sets (makeImportEnv), as for an HTTP source with no secret."""
    return {
        "IMPORTER_SOURCE": "http", "IMPORTER_ENDPOINT": endpoint, "IMPORTER_CONTENTTYPE": "kubevirt",
        "IMPORTER_IMAGE_SIZE": "64Mi", "OWNER_UID": "0b9c4f4e-6b8e-4f57-9a53-6e1f0a6f0d11",
        "FILESYSTEM_OVERHEAD": "0.055", "INSECURE_TLS": "false", "IMPORTER_DISK_ID": "", "IMPORTER_UUID": "",
        "IMPORTER_PULL_METHOD": "", "IMPORTER_READY_FILE": "", "IMPORTER_DONE_FILE": "", "IMPORTER_BACKING_FILE": "",
        "IMPORTER_THUMBPRINT": "", "http_proxy": "", "https_proxy": "", "no_proxy": "",
        "IMPORTER_CURRENT_CHECKPOINT": "", "IMPORTER_PREVIOUS_CHECKPOINT": "", "IMPORTER_FINAL_CHECKPOINT": "",
        "PREALLOCATION": "false", "CACHE_MODE": "",
    }


def run_import(image: str, endpoint: str, volume: Path, log: Path, scratch: Path | None = None,
               args: tuple[str, ...] = ("-v=1",)) -> tuple[int, str]:
    """One importer pod (CDI's args: `-v=N`): (exit status, container log)."""
    env = [arg for name, value in cdi_import_env(endpoint).items() for arg in ("-e", f"{name}={value}")]
    mounts = ["-v", f"{volume}:/data", "-v", f"{log}:/dev/termination-log"]
    if scratch is not None:
        mounts += ["-v", f"{scratch}:/scratch"]
    name = container_name("importer")
    with started(name, ["--network", "host", "--user", f"{CDI_UID}:{CDI_UID}", *mounts, *env, image, *args]):
        status = wait_exit(name, IMPORT_TIMEOUT)
        return status, logs(name)


@pytest.mark.parametrize("source", ["qcow2", "raw.xz", "raw.gz", "vmdk", "no-ranges.qcow2"])
def test_imports_into_the_volume(importer_image: str, server: ImageServer, disk_images: dict[str, Path],
                                 pod_files: tuple[Path, Path, Path], source: str) -> None:
    """qcow2 through our reader, xz and gzip through the image's decompressors, vmdk through qemu-img and nbdkit's
    curl plugin, a qcow2 without Range support through the scratch space."""
    volume, scratch, log = pod_files
    status, output = run_import(importer_image, server.url(f"/{source}"), volume, log, scratch)
    assert status == 0, output
    disk = volume / "disk.img"
    assert compare(disk_images["raw"], disk).returncode == 0, output
    assert disk.stat().st_uid == CDI_UID
    message = json.loads(log.read_text())
    assert message["message"].startswith("Import Complete"), message
    assert sorted(p.name for p in volume.iterdir()) == ["disk.img"]
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("args, debug", [(("-v=1",), False), (("-alsologtostderr", "-v=5"), True)])
def test_cdi_verbosity(importer_image: str, server: ImageServer, pod_files: tuple[Path, Path, Path],
                       args: tuple[str, ...], debug: bool) -> None:
    """CDI's -v=N (and the -alsologtostderr of CDI's own images): 5 and up is debug, as for hpp-csi."""
    volume, _scratch, log = pod_files
    status, output = run_import(importer_image, server.url("/qcow2"), volume, log, args=args)
    assert status == 0, output
    assert ("DEBUG: phase transfer" in output) == debug, output


def test_failure_reported_and_volume_left_clean(importer_image: str, server: ImageServer,
                                                pod_files: tuple[Path, Path, Path]) -> None:
    volume, _scratch, log = pod_files
    status, output = run_import(importer_image, server.url("/no-such-image"), volume, log)
    assert status == 1, output
    assert "404" in json.loads(log.read_text())["message"], log.read_text()
    assert list(volume.iterdir()) == []


def test_unknown_argument_refused(importer_image: str, pod_files: tuple[Path, Path, Path]) -> None:
    """Only what CDI passes is understood; anything else stops before the volume is touched."""
    volume, _scratch, _log = pod_files
    name = container_name("importer")
    with started(name, ["--network", "none", "-v", f"{volume}:/data", importer_image, "-v=1", "--frobnicate"]):
        assert wait_exit(name, 30) == 2
        assert "unsupported argument '--frobnicate'" in logs(name)
    assert list(volume.iterdir()) == []

"""The command as a pod or the demo runs it: a real process, CDI's environment, exit codes, termination log."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
from imageserver import ImageServer, Route
from impkit import Images, LoopDevice, MiB, allocated, compare

HPP_IMPORTER = str(Path(sys.executable).with_name("hpp-importer"))


def importer(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": os.environ["PATH"], **(env or {})}
    return subprocess.run([HPP_IMPORTER, *args], env=full_env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_demo_command(images: Images, server: ImageServer, dest: Path) -> None:
    done = importer("import", "--source", "http", "--endpoint", server.url("/img/qcow2"), "--dest", str(dest),
                    "--image-size", "64Mi")
    assert done.returncode == 0, done.stderr
    assert "route direct" in done.stdout
    assert compare(images.files["raw"], dest / "disk.img").returncode == 0
    assert (dest / "disk.img").stat().st_size == 60 * MiB  # 64Mi * 0.945 = 60.48 MiB → 60 MiB


def test_cdi_environment(images: Images, server: ImageServer, dest: Path, tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    env = {"IMPORTER_SOURCE": "http", "IMPORTER_ENDPOINT": server.url("/img/raw.xz"),
           "IMPORTER_CONTENTTYPE": "kubevirt", "IMPORTER_IMAGE_SIZE": "20Mi", "FILESYSTEM_OVERHEAD": "0.1",
           "PREALLOCATION": "true", "OWNER_UID": "abc"}
    done = importer("import", "--dest", str(dest), "--termination-log", str(log), env=env)
    assert done.returncode == 0, done.stderr
    disk = dest / "disk.img"
    assert disk.stat().st_size == 18 * MiB  # 20Mi * 0.9 = 18 MiB
    assert allocated(disk) >= 18 * MiB
    assert compare(images.files["raw"], disk).returncode == 0
    assert json.loads(log.read_text()) == {"preallocationApplied": True,
                                           "message": "Import Complete; Preallocation applied"}


def test_failure_is_one_line_and_nonzero(server: ImageServer, dest: Path, tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    done = importer("import", "--endpoint", server.url("/img/qcow2"), "--dest", str(dest), "--image-size", "2Mi",
                    "--termination-log", str(log))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("hpp-importer: error: virtual image size")
    assert "larger than the reported available storage" in json.loads(log.read_text())["message"]
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("prealloc", [False, True])
def test_blank_file(prealloc: bool, dest: Path, tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    env = {"IMPORTER_SOURCE": "none", "IMPORTER_IMAGE_SIZE": "32Mi", "PREALLOCATION": str(prealloc).lower()}
    done = importer("import", "--dest", str(dest), "--termination-log", str(log), env=env)
    assert done.returncode == 0, done.stderr
    disk = dest / "disk.img"
    assert disk.stat().st_size == 30 * MiB  # 32Mi * 0.945 = 30.24 MiB
    assert disk.read_bytes() == bytes(30 * MiB)
    assert (allocated(disk) >= 30 * MiB) if prealloc else (allocated(disk) == 0)
    assert json.loads(log.read_text()).get("preallocationApplied") is prealloc


def test_blank_block(loop_device: LoopDevice) -> None:
    with loop_device.device.open("r+b") as dev:
        dev.write(b"\xee" * loop_device.size)
    done = importer("import", "--source", "blank", "--dest", str(loop_device.device))
    assert done.returncode == 0, done.stderr
    assert loop_device.device.read_bytes() == bytes(loop_device.size)
    assert allocated(loop_device.backing) == 0  # discarded, not written


def test_archive(fresh_server: ImageServer, dest: Path, tmp_path: Path) -> None:
    content = tmp_path / "content"
    (content / "sub").mkdir(parents=True)
    (content / "a.txt").write_text("alpha\n")
    (content / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    archive = tmp_path / "files.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(content / "a.txt", "a.txt")
        tar.add(content / "sub", "sub")
    url = fresh_server.add("/files.tar.gz", Route(archive))
    done = importer("import", "--endpoint", url, "--dest", str(dest), "--content-type", "archive",
                    "--image-size", "16Mi")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt", "sub"]
    assert (dest / "sub" / "b.bin").read_bytes() == (content / "sub" / "b.bin").read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("name", ["raw", "qcow2"])  # the ranges reader and our qcow2 reader
def test_progress_metric(name: str, images: Images, fresh_server: ImageServer, dest: Path) -> None:
    size = images.files[name].stat().st_size
    url = fresh_server.add("/slow", Route(images.files[name], stall_at=size // 2, stall_seconds=3))
    port = _free_port()
    proc = subprocess.Popen([HPP_IMPORTER, "import", "--endpoint", url, "--dest", str(dest), "--image-size", "16Mi",
                             "--metrics-address", f"127.0.0.1:{port}", "--stall-timeout", "10"],
                            env={"PATH": os.environ["PATH"], "OWNER_UID": "pvc-uid-1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        value = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and value is None:
            time.sleep(0.2)
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                continue
            for line in body.splitlines():
                if line.startswith('kubevirt_cdi_import_progress_total{ownerUID="pvc-uid-1"}'):
                    value = float(line.split()[-1])
                    if value == 0:
                        value = None
        assert value is not None and 0 < value < 100  # mid-import, during the stall
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


@pytest.fixture(scope="module")
def big_xz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Incompressible enough that the middle of the file lies well past the 1 MiB the sniffing peeks at."""
    raw = tmp_path_factory.mktemp("bigxz") / "big.raw"
    raw.write_bytes(os.urandom(12 * 1024 * 1024))
    subprocess.run(["xz", "-0", "-k", str(raw)], check=True)
    return raw.with_name("big.raw.xz")


@pytest.mark.parametrize("name", ["raw", "qcow2", "raw.xz"])  # ranges reader, qcow2 reader, xz stream
def test_sigterm_cleans_up_at_once(name: str, images: Images, big_xz: Path, fresh_server: ImageServer, dest: Path,
                                   tmp_path: Path) -> None:
    """Kubelet's grace period is 30 s: a connection stalled mid-transfer must not hold the cleanup back."""
    image = big_xz if name == "raw.xz" else images.files[name]
    size = image.stat().st_size
    url = fresh_server.add("/slow", Route(image, stall_at=size // 2, stall_seconds=40))
    log = tmp_path / "termination-log"
    proc = subprocess.Popen([HPP_IMPORTER, "import", "--endpoint", url, "--dest", str(dest), "--image-size", "16Mi",
                             "--termination-log", str(log)], env={"PATH": os.environ["PATH"]},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not list(dest.iterdir()) and time.monotonic() < deadline:  # wait until the temporary file exists
        time.sleep(0.05)
    assert list(dest.iterdir()), "the import never started writing"
    time.sleep(0.5)  # well into the stall
    proc.terminate()
    started = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 10, "cleanup waited for the stalled connection"
    assert proc.returncode == 1 and "terminated by signal 15" in err, err
    assert list(dest.iterdir()) == []
    assert "terminated" in json.loads(log.read_text())["message"]


def test_unsupported_source_and_usage(dest: Path) -> None:
    done = importer("import", "--source", "s3", "--endpoint", "s3://bucket/x", "--dest", str(dest))
    assert done.returncode == 1 and "not supported yet" in done.stderr
    assert importer().returncode == 2
    done = importer("import", "--source", "http", "--endpoint", "http://127.0.0.1:1/x", "--dest", str(dest),
                    "--image-size", "ten")
    assert done.returncode == 1 and "invalid quantity 'ten'" in done.stderr


def test_qcow2_stream_flag(images: Images, server: ImageServer, dest: Path) -> None:
    """A qcow2 without Range streams with no scratch; --no-qcow2-stream asks for scratch as CDI's route does."""
    url = server.url("/norange/qcow2")
    done = importer("import", "--endpoint", url, "--dest", str(dest), "--image-size", "64Mi", "--no-qcow2-stream")
    assert done.returncode == 1 and "scratch space required" in done.stderr, done.stderr
    assert list(dest.iterdir()) == []
    done = importer("import", "--endpoint", url, "--dest", str(dest), "--image-size", "64Mi",
                    "--qcow2-stream-memory", "1Mi")
    assert done.returncode == 0, done.stderr
    assert compare(images.files["raw"], dest / "disk.img").returncode == 0

"""Hostile and broken inputs: each fails with a clear message and leaves the target as it was."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
from imageserver import ImageServer, Route
from impkit import Images, LoopDevice, MiB, run

from importer import cli


def run_import(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = cli.main(["import", "--no-progress", "--retry-delay", "0.05", *argv], env={})
    return rc, capsys.readouterr().err


def serve(server: ImageServer, path: Path) -> str:
    return server.add(f"/{path.name}", Route(path))


def assert_untouched(dest: Path) -> None:
    assert list(dest.iterdir()) == []


def test_qcow2_with_backing_file(images: Images, fresh_server: ImageServer, dest: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    child = tmp_path / "child.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", images.files["raw"], "-F", "raw", child)
    rc, err = run_import(["--endpoint", serve(fresh_server, child), "--dest", str(dest), "--image-size", "16Mi"],
                         capsys)
    assert rc == 1 and "backing file" in err
    assert_untouched(dest)


def test_qcow2_with_backing_file_from_scratch(images: Images, fresh_server: ImageServer, dest: Path,
                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    child = tmp_path / "child.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", child)
    gz = tmp_path / "child.qcow2.gz"
    with gz.open("wb") as f:
        subprocess.run(["gzip", "-c", str(child)], stdout=f, check=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    rc, err = run_import(["--endpoint", serve(fresh_server, gz), "--dest", str(dest), "--image-size", "16Mi",
                          "--scratch", str(scratch)], capsys)
    assert rc == 1 and "backing file" in err
    assert_untouched(dest)
    assert list(scratch.iterdir()) == []


def test_qcow2_with_external_data_file(fresh_server: ImageServer, dest: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "external.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", image, "4M")
    rc, err = run_import(["--endpoint", serve(fresh_server, image), "--dest", str(dest), "--image-size", "16Mi"],
                         capsys)
    assert rc == 1 and "external data file" in err
    assert_untouched(dest)


def test_encrypted_qcow2(fresh_server: ImageServer, dest: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "luks.qcow2"
    # qemu-img times PBKDF to pick LUKS iterations; on a busy machine a short iter-time can fail with "Unable to
    # get accurate CPU usage". That is test setup, not the behaviour under test: retry it.
    for _ in range(5):
        made = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=pw",
                               "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=50", str(image),
                               "4M"], capture_output=True, text=True)
        if made.returncode == 0:
            break
        assert "accurate CPU usage" in made.stderr, made.stderr
    else:
        pytest.fail(f"qemu-img could not make a LUKS qcow2 in 5 tries: {made.stderr}")
    rc, err = run_import(["--endpoint", serve(fresh_server, image), "--dest", str(dest), "--image-size", "16Mi"],
                         capsys)
    assert rc == 1 and "encrypted" in err
    assert_untouched(dest)


@pytest.mark.parametrize("keep", [200, 64 * 1024, 400 * 1024])
def test_truncated_qcow2(keep: int, images: Images, fresh_server: ImageServer, dest: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    truncated = tmp_path / f"truncated-{keep}.qcow2"
    truncated.write_bytes(images.files["qcow2"].read_bytes()[:keep])
    rc, err = run_import(["--endpoint", serve(fresh_server, truncated), "--dest", str(dest),
                          "--image-size", "16Mi"], capsys)
    assert rc == 1, "a truncated qcow2 must not import"
    assert err.startswith("hpp-importer: error: ") and len(err.strip().splitlines()) == 1
    assert_untouched(dest)


@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd"])
@pytest.mark.parametrize("target", ["file", "block"])
def test_truncated_compressed_raw(kind: str, target: str, images: Images, fresh_server: ImageServer, dest: Path,
                                  loop_device: LoopDevice, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truncated = tmp_path / f"truncated.raw.{kind}"
    data = images.files[f"raw.{kind}"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    where = dest if target == "file" else loop_device.device
    rc, err = run_import(["--endpoint", serve(fresh_server, truncated), "--dest", str(where),
                          "--image-size", "16Mi"], capsys)
    assert rc == 1 and f"{kind} decompression failed" in err
    assert_untouched(dest)


@pytest.mark.parametrize("target", ["file", "block"])
def test_decompression_bomb_stops_at_target_size(bomb: Path, target: str, fresh_server: ImageServer, dest: Path,
                                                 loop_device: LoopDevice, capsys: pytest.CaptureFixture[str]) -> None:
    # Files: xz/zstd write the target themselves (capped by RLIMIT_FSIZE), gzip goes through our writer.
    # Block devices: always our writer, capped at the device size (16 MiB).
    where = dest if target == "file" else loop_device.device
    rc, err = run_import(["--endpoint", serve(fresh_server, bomb), "--dest", str(where),
                          "--image-size", "16Mi"], capsys)
    assert rc == 1
    limit = 15728640 if target == "file" else 16 * MiB
    assert "virtual image size at least" in err and f"available storage {limit};" in err
    assert_untouched(dest)


def test_too_many_compression_layers(images: Images, fresh_server: ImageServer, dest: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = images.files["raw.gzip"]
    for _ in range(3):
        out = tmp_path / (path.name + ".gz")
        with out.open("wb") as f:
            subprocess.run(["gzip", "-c", str(path)], stdout=f, check=True)
        path = out
    rc, err = run_import(["--endpoint", serve(fresh_server, path), "--dest", str(dest), "--image-size", "16Mi"],
                         capsys)
    assert rc == 1 and "nested compression layers" in err
    assert_untouched(dest)


@pytest.mark.parametrize("name,size_arg", [("qcow2", "4Mi"), ("raw", "4Mi")])
def test_image_larger_than_volume(name: str, size_arg: str, server: ImageServer, dest: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = run_import(["--endpoint", server.url(f"/img/{name}"), "--dest", str(dest), "--image-size", size_arg],
                         capsys)
    assert rc == 1
    # 4Mi * 0.945 = 3.78 MiB, rounded down to 3 MiB
    assert ("virtual image size 8388608 is larger than the reported available storage 3145728; "
            "a larger volume is required") in err
    assert_untouched(dest)


def test_unseekable_vhdx_without_scratch(server: ImageServer, dest: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """qemu-img must read a vhdx at offsets: served without Range, it needs scratch (a qcow2 streams instead)."""
    log = tmp_path / "termination-log"
    rc, err = run_import(["--endpoint", server.url("/norange/vhdx"), "--dest", str(dest), "--image-size", "16Mi",
                          "--termination-log", str(log)], capsys)
    assert rc == 1 and "scratch space required and none found" in err
    assert "does not support Range requests, so the vhdx image must be stored first" in err
    message = json.loads(log.read_text())
    assert message["scratchSpaceRequired"] is True
    assert_untouched(dest)
    # Failing early: only the first few KiB were read before giving up.
    assert len(server.requests) > 0


def _tar_with(members: list[tuple[tarfile.TarInfo, bytes | None]], path: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


@pytest.mark.parametrize("evil", ["../escape.txt", "/etc/evil.txt", "link"])
def test_tar_escapes_are_refused(evil: str, fresh_server: ImageServer, dest: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    good = tarfile.TarInfo("ok.txt")
    good.size = 3
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [(good, b"ok\n")]
    if evil == "link":
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        members.append((link, None))
    else:
        bad = tarfile.TarInfo(evil)
        bad.size = 4
        members.append((bad, b"bad\n"))
    archive = _tar_with(members, tmp_path / "evil.tar")
    rc, err = run_import(["--endpoint", serve(fresh_server, archive), "--dest", str(dest), "--image-size", "16Mi",
                          "--content-type", "archive"], capsys)
    assert rc == 1 and "unsafe tar member" in err
    assert_untouched(dest)
    assert not (tmp_path / "escape.txt").exists()


def test_tar_bomb(fresh_server: ImageServer, dest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = tarfile.TarInfo("big.bin")
    big.size = 4 * MiB
    archive = _tar_with([(big, bytes(4 * MiB))], tmp_path / "big.tar")
    rc, err = run_import(["--endpoint", serve(fresh_server, archive), "--dest", str(dest), "--image-size", "2Mi",
                          "--content-type", "archive"], capsys)
    assert rc == 1 and "larger than the reported available storage" in err
    assert_untouched(dest)

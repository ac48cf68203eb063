"""Fixtures: real images built with qemu-img, real HTTP(S) servers on 127.0.0.1, a real loop device."""

from __future__ import annotations

import os
import random
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from imageserver import ImageServer, Route
from impkit import BASE_SIZE, Images, LoopDevice, MiB, run
from nodekit import Node, started_node
from registrykit import RegistryKit


def _write_base(path: Path, rng: random.Random) -> int:
    """8 MiB mostly holes: 1 MiB random at 0, 70 KiB at an unaligned offset, 512 KiB pattern at 6 MiB."""
    with path.open("wb") as f:
        f.truncate(BASE_SIZE)
        f.seek(0)
        f.write(rng.randbytes(MiB))
        f.seek(3 * MiB + 3 * 4096 + 100)
        f.write(rng.randbytes(70 * 1024))
        f.seek(6 * MiB)
        f.write(b"\x5a" * (512 * 1024))
    return MiB + 70 * 1024 + 512 * 1024


def _compress(src: Path, kind: str) -> Path:
    out = src.with_name(f"{src.name}.{ {'gzip': 'gz', 'xz': 'xz', 'zstd': 'zst'}[kind]}")
    tool = {"gzip": ["gzip", "-c", "-6"], "xz": ["xz", "-c", "-T2", "-3"], "zstd": ["zstd", "-c", "-q"]}[kind]
    with out.open("wb") as f:
        subprocess.run([*tool, str(src)], stdout=f, check=True)
    return out


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    root = tmp_path_factory.mktemp("images")
    rng = random.Random(20240601)
    base = root / "base.raw"
    data_bytes = _write_base(base, rng)
    files: dict[str, Path] = {"raw": base}
    refs: dict[str, Path] = {"raw": base}
    for name, fmt, opts in (
        ("qcow2", "qcow2", ["-o", "compat=1.1"]),
        ("qcow2v2", "qcow2", ["-o", "compat=0.10"]),
        ("qcow2c", "qcow2", ["-c", "-o", "compat=1.1"]),
        ("vmdk", "vmdk", []),
        ("vhdx", "vhdx", []),
        ("vdi", "vdi", []),
        ("vpc", "vpc", ["-o", "subformat=dynamic,force_size=on"]),
    ):
        out = root / f"base.{name}"
        run("qemu-img", "convert", "-f", "raw", "-O", fmt, *opts, base, out)
        files[name], refs[name] = out, base
    odd = root / "odd.raw"
    odd.write_bytes(rng.randbytes(3 * MiB + 1234))
    files["odd"], refs["odd"] = odd, odd
    iso_dir = root / "iso-content"
    iso_dir.mkdir()
    (iso_dir / "hello.txt").write_text("hello from an ISO\n" * 1000)
    iso = root / "disk.iso"
    run("genisoimage", "-quiet", "-o", iso, "-V", "TESTISO", iso_dir)
    files["iso"], refs["iso"] = iso, iso
    for name in ("raw", "qcow2"):
        for kind in ("gzip", "xz", "zstd"):
            files[f"{name}.{kind}"], refs[f"{name}.{kind}"] = _compress(files[name], kind), base
    nested = _compress(files["qcow2.gzip"], "xz")  # xz containing gzip containing qcow2
    files["qcow2.gzip.xz"], refs["qcow2.gzip.xz"] = nested, base
    return Images(root, files, refs, data_bytes)


@pytest.fixture(scope="session")
def server(images: Images) -> Iterator[ImageServer]:
    srv = ImageServer()
    for name, path in images.files.items():
        srv.add(f"/img/{name}", Route(path))
        srv.add(f"/norange/{name}", Route(path, ranges=False))
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def tls_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    cert_dir = tmp_path_factory.mktemp("certs")
    ca.cert_pem.write_to_path(str(cert_dir / "ca.pem"))
    return ca, cert_dir


@pytest.fixture(scope="session")
def https_server(images: Images, tls_ca: tuple[trustme.CA, Path]) -> Iterator[ImageServer]:
    ca, _ = tls_ca
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    srv = ImageServer(tls=ctx)
    for name in ("raw.xz", "qcow2", "raw"):
        srv.add(f"/img/{name}", Route(images.files[name]))
    yield srv
    srv.close()


@pytest.fixture
def fresh_server() -> Iterator[ImageServer]:
    """A private server for tests that configure misbehaving routes."""
    srv = ImageServer()
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def loop_device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopDevice]:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    backing = tmp_path_factory.mktemp("loop") / "backing.img"
    with backing.open("wb") as f:
        f.truncate(16 * MiB)
    device = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True, capture_output=True,
                            text=True).stdout.strip()
    try:
        yield LoopDevice(Path(device), backing, 16 * MiB)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "pvc"
    d.mkdir()
    return d


@pytest.fixture(scope="session", params=["gzip", "xz", "zstd"])
def bomb(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 MiB of zeros compressed to a few hundred KiB (or less)."""
    kind = request.param
    path = tmp_path_factory.mktemp("bomb") / f"bomb.raw.{kind}"
    tool = {"gzip": "gzip -c -1", "xz": "xz -c -T2 -0", "zstd": "zstd -c -q"}[kind]
    subprocess.run(f"head -c 256M /dev/zero | {tool} > {path}", shell=True, check=True)
    return path


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryKit]:
    """Real docker-registry instances (plain, TLS + htpasswd, token auth), started on first use; one set per
    module, since some tests tamper with blobs in the registry's storage."""
    registries = RegistryKit(tmp_path_factory.mktemp("registry"))
    yield registries
    registries.close()


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    """A real driver and `hpp-importer serve` on its pools (clients stalled for 1 s are dropped)."""
    with started_node("--stall-timeout", "1") as started:
        yield started

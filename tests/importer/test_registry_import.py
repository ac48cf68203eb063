"""Container disks imported end to end: a real docker-registry on 127.0.0.1, images built by umoci and pushed by
skopeo, the real importer phase machine writing a file or a loop block device, checked with qemu-img compare."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from impkit import MiB, compare
from registrykit import PushedImage, Registry, RegistryKit

from importer.errors import ConfigError, InvalidImage, ScratchSpaceRequired
from importer.processor import ImportProcessor, ImportRequest, ImportResult, Route
from importer.progress import termination_message
from importer.registry.blob import BlobMismatch
from importer.registry.client import RegistryOptions
from importer.registry.layers import NO_DISK
from importer.sources import RegistrySource
from importer.target import open_target

IMAGE_SIZE = 16 * MiB
FAST = dict(stall_timeout=10.0, retries=1, retry_delay=0.1)  # a broken test fails in seconds, not minutes


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    d = tmp_path / "scratch"
    d.mkdir()
    return d


@pytest.fixture
def loop_block(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A 16 MiB loop device of our own (detached afterwards), full of stale bytes the import must hide."""
    backing = tmp_path / "backing.img"
    backing.write_bytes(b"\xee" * IMAGE_SIZE)
    device = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True, capture_output=True,
                            text=True, timeout=30).stdout.strip()
    try:
        yield Path(device), backing
    finally:
        subprocess.run(["losetup", "-d", device], check=False, timeout=30)


def source_for(registry: Registry, reference: str) -> RegistrySource:
    if registry.certs is not None:
        options = RegistryOptions(username="hpp", password="s3cret-pass", cert_dir=registry.certs.ca_dir, **FAST)
    else:
        options = RegistryOptions(insecure=True, **FAST)
    return RegistrySource(reference, options)


def run_import(source: RegistrySource, dest: Path, scratch: Path | None = None,
               stream_qcow2: bool = True) -> ImportResult:
    request = ImportRequest(source=source, target=open_target(dest), image_size=IMAGE_SIZE, scratch_dir=scratch,
                            stream_qcow2=stream_qcow2)
    try:
        return ImportProcessor(request).run()
    finally:
        source.close()


def disk_layer(image: PushedImage) -> str:
    """The digest of the top layer holding disk/ (umoci puts each insert in its own layer)."""
    return str(image.layers[-1]["digest"])


def test_raw_streams_into_a_file(kit: RegistryKit, dest: Path) -> None:
    image = kit.push(kit.plain, "raw")
    source = source_for(kit.plain, image.reference)
    result = run_import(source, dest)
    assert result.route is Route.STREAM and not result.scratch_used
    assert image.disk is not None and compare(image.disk, dest / "disk.img").returncode == 0
    assert sorted(p.name for p in dest.iterdir()) == ["disk.img"]
    assert (source.image_digest, source.disk_layer_digest, source.disk_name) == (
        image.digest, disk_layer(image), "disk.img")
    message = json.loads(termination_message("Import Complete", digest=source.image_digest))
    assert message == {"digest": image.digest, "message": "Import Complete"}


def test_raw_streams_into_a_block_device_over_tls(kit: RegistryKit, loop_block: tuple[Path, Path]) -> None:
    device, _ = loop_block
    image = kit.push(kit.tls, "raw", repo="tls/raw")
    result = run_import(source_for(kit.tls, image.by_digest()), device)
    assert result.route is Route.STREAM
    assert image.disk is not None and compare(image.disk, device).returncode == 0  # stale bytes are gone too


def test_qcow2_streams_without_scratch(kit: RegistryKit, dest: Path) -> None:
    """A qcow2 container disk is placed cluster by cluster as the layer streams: no scratch at all."""
    image = kit.push(kit.plain, "qcow2")
    result = run_import(source_for(kit.plain, image.reference), dest)
    assert (result.route, result.fmt, result.reader) == (Route.STREAM, "qcow2", "qcow2-stream")
    assert not result.scratch_used and result.scratch_bytes == 0
    assert image.disk is not None and compare(image.disk, dest / "disk.img").returncode == 0


def test_qcow2_goes_through_scratch_when_streaming_is_off(kit: RegistryKit, dest: Path, scratch: Path) -> None:
    image = kit.push(kit.plain, "qcow2")
    result = run_import(source_for(kit.plain, image.reference), dest, scratch, stream_qcow2=False)
    assert (result.route, result.fmt) == (Route.SCRATCH, "qcow2")
    assert image.disk is not None and compare(image.disk, dest / "disk.img").returncode == 0
    assert list(scratch.iterdir()) == []


def test_qcow2_without_scratch_says_why(kit: RegistryKit, dest: Path) -> None:
    image = kit.push(kit.plain, "qcow2")
    with pytest.raises(ScratchSpaceRequired, match="a container disk streams out of its layer, so the qcow2 image"):
        run_import(source_for(kit.plain, image.reference), dest, stream_qcow2=False)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("case", ["whiteout", "zstd", "lower-layer"])
def test_layers_read_from_the_top_until_the_disk(kit: RegistryKit, dest: Path, case: str) -> None:
    image = kit.push(kit.plain, case)
    source = source_for(kit.plain, image.reference)
    client = source._client  # count the blob downloads of the real client
    real_open, opened = client.open_blob, []
    client.open_blob = lambda layer: (opened.append(layer.digest), real_open(layer))[1]  # type: ignore[method-assign]
    run_import(source, dest)
    assert image.disk is not None and compare(image.disk, dest / "disk.img").returncode == 0
    layers = [str(layer["digest"]) for layer in reversed(image.layers)]  # top first
    holder = 0 if case != "lower-layer" else len(layers) - 1  # umoci: whiteout's new disk is the top layer
    assert opened == layers[:holder + 1]  # the layers below the disk were never downloaded
    assert source.disk_name == image.disk_name and source.disk_layer_digest == layers[holder]


def test_index_pinned_by_digest_reports_both_digests(kit: RegistryKit, dest: Path) -> None:
    image = kit.push(kit.plain, "index")
    source = source_for(kit.plain, image.by_digest())
    run_import(source, dest)
    assert image.disk is not None and compare(image.disk, dest / "disk.img").returncode == 0
    assert (source.image_digest, source.index_digest) == (image.digest, image.index_digest)


def test_tampered_blob_leaves_the_target_clean(kit: RegistryKit, dest: Path) -> None:
    image = kit.push(kit.plain, "tamper")
    kit.plain.tamper(disk_layer(image))
    with pytest.raises(BlobMismatch, match=disk_layer(image)):
        run_import(source_for(kit.plain, image.reference), dest)
    assert list(dest.iterdir()) == []


def test_no_disk_leaves_the_target_clean(kit: RegistryKit, dest: Path) -> None:
    image = kit.push(kit.plain, "no-disk")
    with pytest.raises(InvalidImage, match=f"^{NO_DISK}"):
        run_import(source_for(kit.plain, image.reference), dest)
    assert list(dest.iterdir()) == []


def test_malformed_endpoint_fails_before_any_connection() -> None:
    with pytest.raises(ConfigError, match="must start with docker://"):
        RegistrySource("https://127.0.0.1:1/repo:tag", RegistryOptions())

"""What feeds the streaming qcow2 reader from a gzip stream: the in-process gzip reader (zlib-ng's C reader behind
our Reader). A fast path, so its edges are pinned here: concatenated members, padding, truncation, corruption, an
upstream error passing through unchanged, and byte identity end to end through an upload."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest
from impkit import MiB, compare, run

from importer.errors import InvalidImage, SourceError
from importer.pipeline import GzipReader, read_full
from importer.processor import ImportProcessor, ImportRequest, Route
from importer.sources.upload import UploadSource
from importer.target import open_target

KiB = 1024


class Chunks:
    """A Reader over bytes handing out at most `piece` bytes a call; raises `error` once `fail_at` bytes are out."""

    def __init__(self, data: bytes, piece: int = 64 * KiB, fail_at: int | None = None,
                 error: BaseException | None = None) -> None:
        self._data, self._piece, self._fail_at, self._error = data, piece, fail_at, error
        self.pos = 0
        self.closed = False

    def read(self, size: int, /) -> bytes:
        if self._fail_at is not None and self.pos >= self._fail_at:
            assert self._error is not None
            raise self._error
        out = self._data[self.pos : self.pos + min(size, self._piece)]
        self.pos += len(out)
        return out

    def close(self) -> None:
        self.closed = True


def gunzip_all(data: bytes, size: int = 4 * MiB) -> bytes:
    reader = GzipReader(Chunks(data))
    parts = []
    while part := read_full(reader, size):
        parts.append(part)
    reader.close()
    return b"".join(parts)


@pytest.fixture(scope="module")
def payload() -> bytes:
    """3 MiB that compress a little: random halves and a repeated text."""
    rnd = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(48 * KiB))
    return rnd + b"usr/lib/python3/dist-packages 0644 root root\n" * (32 * KiB)


# -- the gzip reader -------------------------------------------------------------------------------------------

def test_gzip_members_are_read_in_order_and_zero_padding_is_accepted(payload: bytes) -> None:
    one, two = gzip.compress(payload[: MiB + 7]), gzip.compress(payload[MiB + 7 :], compresslevel=1)
    assert gunzip_all(one + two) == payload  # pigz and `cat a.gz b.gz` make several members
    assert gunzip_all(one + two + bytes(1000)) == payload  # tape-style padding, as `gzip -d` accepts
    assert gunzip_all(one + two, size=4096) == payload  # small reads see the same bytes


def test_gzip_of_nothing_reads_as_nothing() -> None:
    assert gunzip_all(b"") == b""
    assert gunzip_all(gzip.compress(b"")) == b""


def test_truncated_gzip_is_an_invalid_image(payload: bytes) -> None:
    whole = gzip.compress(payload)
    for cut in (len(whole) // 2, len(whole) - 4):  # inside the deflate data, inside the trailer
        with pytest.raises(InvalidImage, match="gzip decompression failed: unexpected end of input"):
            gunzip_all(whole[:cut])


def test_corrupt_gzip_is_an_invalid_image(payload: bytes) -> None:
    whole = bytearray(gzip.compress(payload))
    whole[len(whole) // 2] ^= 0xFF
    with pytest.raises(InvalidImage, match="gzip decompression failed"):
        gunzip_all(bytes(whole))
    crc = bytearray(gzip.compress(payload))
    crc[-8] ^= 1  # the member's CRC
    with pytest.raises(InvalidImage, match="gzip decompression failed: CRC check failed"):
        gunzip_all(bytes(crc))


def test_upstream_errors_pass_through_the_gzip_reader_unchanged(payload: bytes) -> None:
    """A broken download or a digest mismatch must reach the import as itself, not as a decoder error."""
    whole = gzip.compress(payload)
    upstream = Chunks(whole, fail_at=len(whole) // 3, error=SourceError("the connection broke at byte 42"))
    reader = GzipReader(upstream)
    with pytest.raises(SourceError, match="the connection broke at byte 42"):
        while reader.read(MiB):
            pass
    reader.close()
    assert upstream.closed


# -- a gz qcow2 upload through the real phases ------------------------------------------------------------------

@pytest.fixture(scope="module")
def qcow2_gz(tmp_path_factory: pytest.TempPathFactory, payload: bytes) -> tuple[Path, Path]:
    """A 12 MiB disk with data at three places, as qcow2 (64 KiB clusters) gzip-compressed, and its raw form."""
    root = tmp_path_factory.mktemp("qcow2-gz")
    raw = root / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(12 * MiB)
        f.write(payload)
        f.seek(5 * MiB + 4096 + 3)
        f.write(payload[: 700 * KiB])
        f.seek(11 * MiB)
        f.write(b"\x5a" * (512 * KiB))
    image = root / "disk.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image)
    packed = root / "disk.qcow2.gz"
    packed.write_bytes(gzip.compress(image.read_bytes(), compresslevel=6))
    return packed, raw


def upload_import(body: bytes, dest: Path) -> Route:
    request = ImportRequest(source=UploadSource(Chunks(body, piece=256 * KiB), len(body)), target=open_target(dest),
                            image_size=16 * MiB, filesystem_overhead=0.0)
    return ImportProcessor(request).run().route


def test_gz_qcow2_upload_streams_byte_for_byte(qcow2_gz: tuple[Path, Path], tmp_path: Path) -> None:
    packed, raw = qcow2_gz
    dest = tmp_path / "dest"
    dest.mkdir()
    assert upload_import(packed.read_bytes(), dest) is Route.STREAM
    assert compare(raw, dest / "disk.img").returncode == 0  # and zeros past it (the disk is grown to its volume)
    with (dest / "disk.img").open("rb") as disk:
        assert hashlib.sha256(disk.read(raw.stat().st_size)).digest() == hashlib.sha256(raw.read_bytes()).digest()


def test_truncated_gz_qcow2_upload_fails_and_leaves_nothing(qcow2_gz: tuple[Path, Path], tmp_path: Path) -> None:
    packed, _ = qcow2_gz
    dest = tmp_path / "dest"
    dest.mkdir()
    whole = packed.read_bytes()
    with pytest.raises(InvalidImage, match="gzip decompression failed: unexpected end of input"):
        upload_import(whole[: len(whole) * 2 // 3], dest)
    assert list(dest.iterdir()) == []

"""Our clone stream and CDI's snappy framing read as hostile input: plain functions, no servers."""

from __future__ import annotations

import io
import json
import struct

import cramjam
import pytest
import zstandard

from importer.clone.snappy import SnappyFrameReader
from importer.clone.wire import (
    BLOCK,
    BLOCK_HEAD,
    END_HEAD,
    Digest,
    FileEntry,
    Manifest,
    StreamReader,
    encode_block,
    encode_header,
    parse_manifest,
)
from importer.serve.body import BadRequest

DISK = Manifest((FileEntry("disk.img", 3 * BLOCK + 5), FileEntry("notes.txt", 10)), 0)


def reader(data: bytes) -> StreamReader:
    stream = io.BytesIO(data)

    def exact(count: int) -> bytes:
        out = stream.read(count)
        if len(out) != count:
            raise EOFError("short")
        return out

    return StreamReader(exact)


def manifest_json(files: list[dict[str, object]], disk: int = 0) -> bytes:
    return json.dumps({"files": files, "disk": disk}).encode()


def entry(name: str, size: int = 10) -> dict[str, object]:
    return {"name": name, "size": size, "mode": 0o640, "uid": 0, "gid": 0}


@pytest.mark.parametrize(("doc", "why"), [
    (manifest_json([entry("../disk.img")]), "invalid file name"),
    (manifest_json([entry("disk.img"), entry("a/b")]), "invalid file name"),
    (manifest_json([entry("disk.img"), entry(".disk.img.0123456789ab.part")]), "invalid file name"),
    (manifest_json([entry("disk.img"), entry("..")]), "invalid file name"),
    (manifest_json([entry("other.img")]), "named disk.img"),
    (manifest_json([entry("disk.img")], disk=3), "named disk.img"),
    (manifest_json([entry("disk.img"), entry("disk.img")]), "twice"),
    (manifest_json([entry("disk.img", -1)]), "invalid size"),
    (manifest_json([{**entry("disk.img"), "mode": 0o170000}]), "invalid size, mode"),
    (manifest_json([{**entry("disk.img"), "extra": 1}]), "exactly name"),
    (manifest_json([entry(f"f{i}") for i in range(65)]), "1 to 64 files"),
    (b"{not json", "not JSON"),
])
def test_hostile_manifests_are_refused(doc: bytes, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        parse_manifest(doc)


def test_a_stream_round_trips_and_its_digest_matches() -> None:
    blocks = [(0, 0, b"a" * BLOCK), (0, 3 * BLOCK, b"b" * 5), (1, 0, b"notes here")]
    digest = Digest()
    body = encode_header(DISK, True, 0)
    for file, offset, data in blocks:
        digest.add(file, offset, data)
        body += encode_block(file, offset, data, zstandard.ZstdCompressor())
    body += END_HEAD + digest.final(DISK)
    stream = reader(body)
    assert stream.read_header().manifest == DISK
    received = Digest()
    while not isinstance(item := stream.next(), bytes):
        received.add(*item)
    assert item == received.final(DISK)


def block_record(file: int, offset: int, raw: int, wire: int, payload: bytes) -> bytes:
    return BLOCK_HEAD.pack(b"B", file, offset, raw, wire) + payload


@pytest.mark.parametrize(("records", "why"), [
    (block_record(0, 4 * BLOCK, BLOCK, BLOCK, b""), "is not a block of"),  # past the end of its file
    (block_record(0, 100, BLOCK, BLOCK, b""), "is not a block of"),  # not on the grid
    (block_record(0, 3 * BLOCK, BLOCK, BLOCK, b""), "is not a block of"),  # the last block is 5 bytes
    (block_record(2, 0, 10, 10, b""), "does not list"),
    (block_record(0, BLOCK, BLOCK, BLOCK, b"x" * BLOCK) + block_record(0, 0, BLOCK, BLOCK, b""), "out of order"),
    (block_record(0, 0, BLOCK, BLOCK + 1, b""), "payload of"),
    (b"Z", "unknown clone record"),
])
def test_hostile_blocks_are_refused(records: bytes, why: str) -> None:
    stream = reader(encode_header(DISK, False, 0) + records)
    stream.read_header()
    with pytest.raises(BadRequest, match=why):
        while not isinstance(stream.next(), bytes):
            pass


def test_a_compressed_block_cannot_expand_past_its_length() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(64 * BLOCK))  # tiny frame, 64 MiB of zeros inside
    stream = reader(encode_header(DISK, True, 0) + block_record(0, 0, BLOCK, len(bomb), bomb))
    stream.read_header()
    with pytest.raises(BadRequest, match="decompress"):
        stream.next()


def test_a_stream_cannot_start_past_its_files_nor_claim_a_huge_manifest() -> None:
    with pytest.raises(BadRequest, match="past the end"):
        reader(encode_header(DISK, False, 10 * BLOCK)).read_header()
    header = struct.pack(">8sBBIQ", b"HPPCLONE", 1, 0, 1 << 30, 0)
    with pytest.raises(BadRequest, match="over the"):
        reader(header).read_header()
    with pytest.raises(BadRequest, match="bad magic"):
        reader(b"NOTCLONE" + header[8:]).read_header()


class Chunks:
    def __init__(self, data: bytes) -> None:
        self.data = io.BytesIO(data)

    def read(self, size: int) -> bytes:
        return self.data.read(min(size, 1000))

    def close(self) -> None:
        pass


def read_all(data: bytes) -> bytes:
    out = b""
    snappy = SnappyFrameReader(Chunks(data))
    while piece := snappy.read(1 << 20):
        out += piece
    return out


def test_snappy_frames_decode_and_corruption_is_caught() -> None:
    data = bytes(range(256)) * 2000 + bytes(300_000)
    framed = bytes(cramjam.snappy.compress(data))
    assert read_all(framed) == data
    corrupt = bytearray(framed)
    corrupt[30] ^= 0xFF
    with pytest.raises(BadRequest):
        read_all(bytes(corrupt))
    with pytest.raises(BadRequest, match="reserved"):
        read_all(framed[:10] + b"\x02\x01\x00\x00x")
    with pytest.raises(BadRequest, match="out of bounds"):
        read_all(framed[:10] + b"\x00\xff\xff\xff")
    with pytest.raises(BadRequest, match="stream identifier"):
        read_all(b"\x00\x05\x00\x00abcde")
    with pytest.raises(BadRequest, match="middle of a chunk"):
        read_all(framed[:-3])

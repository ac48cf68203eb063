"""Our clone stream (docs/clone.md): a manifest, then only the non-zero 1 MiB blocks, then a digest.

Everything read here is hostile: every length is bounded before it is allocated, every block must lie inside
its file and come after the one before, and names are one plain path component.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

import zstandard

from importer.serve.body import BadRequest
from importer.target import DISK_IMAGE_NAME

MAGIC = b"HPPCLONE"
VERSION = 1
FLAG_ZSTD = 0x01
BLOCK = 1024 * 1024  # the grid blocks are cut on, in every file; also the largest block on the wire
MANIFEST_LIMIT = 64 * 1024
MAX_FILES = 64
HEADER = struct.Struct(">8sBBIQ")  # magic, version, flags, manifest length, start (logical offset)
BLOCK_HEAD = struct.Struct(">cHQII")  # b"B", file, offset, raw length, wire length
END_HEAD = b"E"
DIGEST_SIZE = 32
DIGEST_KEY = struct.Struct(">HQI")
NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,254}")
CONTENT_TYPE = "hpp-sparse-clone"  # x-cdi-content-type of our format; CDI's are filesystem-clone, blockdevice-clone


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    mode: int = 0o660
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Manifest:
    """The files a clone carries, in order; `disk` is the index of disk.img (the disk image)."""

    files: tuple[FileEntry, ...]
    disk: int = 0

    @property
    def disk_size(self) -> int:
        return self.files[self.disk].size

    def base(self, index: int) -> int:
        """Where file `index` starts in the logical concatenation of all files (resume offsets count in it)."""
        return sum(f.size for f in self.files[:index])

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    def encode(self) -> bytes:
        return json.dumps({"files": [vars(f) for f in self.files], "disk": self.disk},
                          sort_keys=True, separators=(",", ":")).encode()

    def upload_id(self, identity: str) -> str:
        """Stable for one source: a clone started again finds its interrupted upload."""
        return hashlib.sha256(self.encode() + identity.encode()).hexdigest()[:40]


def parse_manifest(data: bytes) -> Manifest:
    """The manifest of a request, checked field by field."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"clone manifest is not JSON: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list) or not isinstance(doc.get("disk"), int):
        raise BadRequest("clone manifest must hold files (a list) and disk (an index)")
    raw = doc["files"]
    if not 1 <= len(raw) <= MAX_FILES:
        raise BadRequest(f"clone manifest must list 1 to {MAX_FILES} files")
    files = []
    for item in raw:
        if not isinstance(item, dict) or set(item) != {"name", "size", "mode", "uid", "gid"}:
            raise BadRequest("a clone manifest file needs exactly name, size, mode, uid, gid")
        name = item["name"]
        if not isinstance(name, str) or not NAME.fullmatch(name) or name in (".", ".."):
            raise BadRequest(f"invalid file name in the clone manifest: {str(name)[:64]!r}")
        numbers = [item[k] for k in ("size", "mode", "uid", "gid")]
        if any(type(n) is not int or n < 0 for n in numbers) or item["mode"] > 0o7777 \
                or item["uid"] >= 2**32 or item["gid"] >= 2**32 or item["size"] >= 2**62:
            raise BadRequest(f"invalid size, mode or owner of {name!r} in the clone manifest")
        files.append(FileEntry(name, item["size"], item["mode"], item["uid"], item["gid"]))
    if len({f.name for f in files}) != len(files):
        raise BadRequest("the clone manifest names a file twice")
    disk = doc["disk"]
    if not 0 <= disk < len(files) or files[disk].name != DISK_IMAGE_NAME:
        raise BadRequest(f"the clone manifest's disk must be one of its files, named {DISK_IMAGE_NAME}")
    return Manifest(tuple(files), disk)


@dataclass(frozen=True)
class StreamHeader:
    manifest: Manifest
    compressed: bool
    start: int


def encode_header(manifest: Manifest, compressed: bool, start: int) -> bytes:
    data = manifest.encode()
    return HEADER.pack(MAGIC, VERSION, FLAG_ZSTD if compressed else 0, len(data), start) + data


def encode_block_parts(file: int, offset: int, data: bytes | memoryview,
                       compressor: zstandard.ZstdCompressor | None) -> tuple[bytes, bytes | memoryview]:
    """A block record as (its head, its payload): sent one after the other, the data is never copied."""
    payload: bytes | memoryview = compressor.compress(data) if compressor is not None else data
    if len(payload) >= len(data):
        payload = data  # incompressible: stored as is (a payload as long as its data is never a zstd frame)
    return BLOCK_HEAD.pack(b"B", file, offset, len(data), len(payload)), payload


def encode_block(file: int, offset: int, data: bytes, compressor: zstandard.ZstdCompressor | None) -> bytes:
    head, payload = encode_block_parts(file, offset, data, compressor)
    return head + bytes(payload)


_ZEROS = bytes(BLOCK)


def is_zero(data: bytes | bytearray) -> bool:
    """memcmp against a constant: no allocation (a full-length slice of bytes is the object itself)."""
    return data == _ZEROS[: len(data)]


class Digest:
    """sha256 over every non-zero block (its file, offset and length, then its bytes), then every file's size.

    Holes and zero blocks count for nothing, so source and target compute it alike however their files are
    allocated, and a zero-filled hole never has to be read or hashed.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def add(self, file: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        """A block the caller found non-zero (zero blocks are never added, on either side)."""
        self._hash.update(DIGEST_KEY.pack(file, offset, len(data)))
        self._hash.update(data)

    def final(self, manifest: Manifest) -> bytes:
        copy = self._hash.copy()
        for entry in manifest.files:
            copy.update(struct.pack(">Q", entry.size))
        return copy.digest()


class StreamReader:
    """Decodes one request's body: its header, then blocks (checked against the manifest) up to the end record."""

    def __init__(self, read_exact: Callable[[int], bytes]) -> None:
        self._read = read_exact
        self._decompressor = zstandard.ZstdDecompressor()
        self.header: StreamHeader | None = None
        self._last: tuple[int, int] = (-1, -1)

    def read_header(self) -> StreamHeader:
        magic, version, flags, length, start = HEADER.unpack(self._read(HEADER.size))
        if magic != MAGIC:
            raise BadRequest("not a clone stream (bad magic)")
        if version != VERSION:
            raise BadRequest(f"clone stream version {version} is not supported (expected {VERSION})")
        if flags & ~FLAG_ZSTD:
            raise BadRequest(f"unknown clone stream flags {flags:#x}")
        if length > MANIFEST_LIMIT:
            raise BadRequest(f"clone manifest of {length} bytes is over the {MANIFEST_LIMIT} byte limit")
        manifest = parse_manifest(self._read(length))
        if start > manifest.total:
            raise BadRequest(f"clone stream starts at {start}, past the end of its files ({manifest.total})")
        self.header = StreamHeader(manifest, bool(flags & FLAG_ZSTD), start)
        return self.header

    def next(self) -> tuple[int, int, bytes] | bytes:
        """The next block (file, offset, data), or the digest of the end record."""
        assert self.header is not None
        kind = self._read(1)
        if kind == END_HEAD:
            return self._read(DIGEST_SIZE)
        if kind != b"B":
            raise BadRequest(f"unknown clone record {kind!r}")
        _, file, offset, raw, wire = BLOCK_HEAD.unpack(kind + self._read(BLOCK_HEAD.size - 1))
        manifest = self.header.manifest
        if file >= len(manifest.files):
            raise BadRequest(f"clone block for file {file}, which the manifest does not list")
        size = manifest.files[file].size
        if offset % BLOCK or offset >= size or raw != min(BLOCK, size - offset):
            raise BadRequest(f"clone block at {offset}+{raw} is not a block of {manifest.files[file].name!r} "
                             f"({size} bytes, {BLOCK} byte blocks)")
        if (file, offset) <= self._last or manifest.base(file) + offset < self.header.start:
            raise BadRequest(f"clone block at {offset} of {manifest.files[file].name!r} is out of order")
        if wire > raw or (not self.header.compressed and wire != raw):
            raise BadRequest(f"clone block payload of {wire} bytes for {raw} bytes of data")
        self._last = (file, offset)
        payload = self._read(wire)
        if wire == raw:
            return file, offset, payload
        try:
            data = self._decompressor.decompress(payload, max_output_size=raw)
        except zstandard.ZstdError as err:
            raise BadRequest(f"clone block at {offset} does not decompress: {err}") from None
        if len(data) != raw:
            raise BadRequest(f"clone block at {offset} decompresses to {len(data)} bytes, not {raw}")
        return file, offset, data

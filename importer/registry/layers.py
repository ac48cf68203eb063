"""A container disk's bytes out of its image layers: decompress, walk the tar, apply whiteouts, stream disk/'s file.

Layers are read from the top one down and only until the disk is found: the first layer holding a visible regular
file under disk/ gives it, and lower layers are never downloaded (a lower layer could only add a second file, which
CDI refuses). Nothing is extracted: the disk's bytes stream out of the layer as it downloads; every other member is
read past. The layer holding the disk is still read to its end, so a second file after the disk is refused and the
blob's digest is checked before the disk stream reports its end.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, NoReturn, Protocol, cast

import zstandard

from importer.archive import UnsafeMember, member_parts
from importer.errors import InvalidImage
from importer.formats import GZIP, HEADER_SIZE, XZ, ZSTD, sniff
from importer.pipeline import CHUNK, GzipReader, PeekReader, Reader
from importer.registry.blob import BlobMismatch

log = logging.getLogger(__name__)

DISK_DIR = "disk"
# CDI's error texts (pkg/image/transport.go, pkg/importer/registry-datasource.go), kept word for word.
NO_DISK = "Failed to find VM disk image file in the container image"
MORE_THAN_ONE = "image directory contains more than one file"
ANOTHER_DIR = "image directory contains another directory"

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
MAX_META = 1024 * 1024  # a PAX header or GNU long name larger than this is an attack, not a path
MAX_TRAILER = 1024 * 1024  # zeros after the end-of-archive marker: tar pads to 10 KiB records, not more
# How much more of a blob that failed to decode is read to see whether its digest explains the failure.
BLAME_READ_LIMIT = 64 * 1024 * 1024
ZSTD_MAX_WINDOW = 1 << 25  # 32 MiB: zstd's default levels use at most 8 MiB; bounds memory per layer

# Layer media types and the compression each declares; the bytes are sniffed anyway (foreign and
# non-distributable layers, and registries that mislabel, are common), a disagreement is only logged.
LAYER_MEDIA_TYPES: dict[str, str | None] = {
    "application/vnd.oci.image.layer.v1.tar": None,
    "application/vnd.oci.image.layer.v1.tar+gzip": GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": None,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": GZIP,
}
# Types whose header size field is ignored (no data follows), as tar readers in Go and Python do.
_HEADER_ONLY = {tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
                tarfile.FIFOTYPE}
_REGULAR = {tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE}
_KINDS = {tarfile.SYMTYPE: "a symlink", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character device",
          tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}


class LayerDescriptor(Protocol):
    """What a manifest says of a layer (the registry client's Descriptor fits)."""

    @property
    def media_type(self) -> str: ...

    @property
    def digest(self) -> str: ...

    @property
    def size(self) -> int: ...


Opener = Callable[[], Reader]  # the layer's raw blob; raises at its end when the digest does not match


# -- decompression ----------------------------------------------------------------------------------


class ZstdReader:
    """zstd decoded in-process; bounded output per read, frames concatenated as the format allows."""

    def __init__(self, upstream: Reader, what: str) -> None:
        self._upstream, self._what = upstream, what
        decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        self._stream = decompressor.stream_reader(cast("IO[bytes]", upstream), read_size=CHUNK, read_across_frames=True,
                                                  closefd=False)

    def read(self, size: int, /) -> bytes:
        try:
            return self._stream.read(size)
        except zstandard.ZstdError as err:
            raise InvalidImage(f"zstd decompression of {self._what} failed: {err}") from err

    def close(self) -> None:
        self._stream.close()  # type: ignore[no-untyped-call]
        self._upstream.close()


def open_layer(descriptor: LayerDescriptor, raw: Reader) -> Reader:
    """The layer's tar stream: compression sniffed from its first bytes, the media type only cross-checked."""
    what = f"layer {descriptor.digest}"
    if descriptor.media_type not in LAYER_MEDIA_TYPES:
        raw.close()
        raise InvalidImage(f"{what} has media type {descriptor.media_type!r}, which is not a container image "
                           f"layer (expected one of: {', '.join(sorted(LAYER_MEDIA_TYPES))})")
    peek = PeekReader(raw)
    try:
        fmt = sniff(peek.peek(HEADER_SIZE))
        declared = LAYER_MEDIA_TYPES[descriptor.media_type]
        found = fmt if fmt in (GZIP, ZSTD) else None
        if found != declared:
            log.warning("%s is declared %s but its bytes are %s; reading it as %s", what, descriptor.media_type,
                        found or "an uncompressed tar", found or "tar")
        if fmt == GZIP:
            return GzipReader(peek)
        if fmt == ZSTD:
            return ZstdReader(peek, what)
        if fmt == XZ:
            raise InvalidImage(f"{what} is xz-compressed; container layers are tar, gzip or zstd")
        return peek
    except BaseException:
        peek.close()
        raise


# -- tar --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    name: str  # as the archive spells it
    parts: tuple[str, ...]  # path components, leading "/" and "./" dropped
    type: bytes
    size: int  # bytes of data that follow the header (for a sparse file: the stored parts, not the file)
    linkname: str = ""
    sparse: bool = False


class TarWalker:
    """Members of a tar stream read in order, headers parsed by tarfile, every byte accounted for.

    Unlike tarfile's stream mode, a member whose data or header ends early is an error rather than a quiet end.
    The end-of-archive marker, and the padding of the last member, are optional as in Go's reader: umoci writes
    layers without them.
    """

    def __init__(self, stream: Reader, what: str) -> None:
        self._stream, self._what = stream, what
        self._buffer = b""  # read ahead for headers; consumed from _pos on, never copied per header
        self._pos = 0
        self.offset = 0  # bytes of the tar consumed
        self._data_left = 0  # of the current member
        self._padding = 0
        self._global: dict[str, str] = {}
        self.ended = False

    # byte level

    def _read(self, size: int) -> bytes:
        """Up to size bytes; large reads (the disk's data) go straight to the stream, small ones are buffered."""
        if self._pos == len(self._buffer):
            if size >= CHUNK // 2:
                data = self._stream.read(min(size, CHUNK))
                self.offset += len(data)
                return data
            self._buffer, self._pos = self._stream.read(CHUNK), 0
        data = self._buffer[self._pos:self._pos + size]
        self._pos += len(data)
        self.offset += len(data)
        return data

    def _read_exact(self, size: int, why: str) -> bytes:
        parts, got = [], 0
        while got < size:
            data = self._read(size - got)
            if not data:
                raise InvalidImage(f"{self._what} is truncated: it ends {why} (tar offset {self.offset})")
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def _skip(self, size: int, why: str) -> None:
        while size:
            data = self._read(min(size, CHUNK))
            if not data:
                raise InvalidImage(f"{self._what} is truncated: it ends {why} (tar offset {self.offset})")
            size -= len(data)

    # member level

    def read_data(self, size: int, name: str) -> bytes:
        """Up to size bytes of the current member's data; never b"" while some is left."""
        if self._data_left == 0:
            return b""
        want = min(size, self._data_left)
        data = self._read(want)
        if not data:
            raise InvalidImage(f"{self._what} is truncated: it ends inside {name!r} with {self._data_left} of "
                               f"its bytes missing (the tar header claims more than the layer holds)")
        self._data_left -= len(data)
        return data

    def next(self) -> Member | None:
        """The next member, past the rest of the current one; None at the end-of-archive marker."""
        if self.ended:
            return None
        self._skip(self._data_left, "inside a member's data")
        self._data_left = 0
        if not self._skip_padding():
            self.ended = True  # the stream ends in the last member's padding: umoci writes layers so
            return None
        pax: dict[str, str] = {}
        long_name = long_link = None
        while True:
            start = self.offset
            block = self._read_exact_or_none()
            if block is None and not (pax or long_name or long_link):
                # No end-of-archive marker: umoci and others end layers right after the last member, and Go's
                # tar reader (containers/image, CDI) takes that as the end. A cut inside a member still fails.
                self.ended = True
                return None
            if block is None:
                raise InvalidImage(f"{self._what} is truncated: it ends after an extended header (tar offset "
                                   f"{self.offset})")
            if block == ZERO_BLOCK:
                self.ended = True
                return None
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as err:
                raise InvalidImage(f"{self._what} is not a valid tar stream: {err} (header at tar offset "
                                   f"{start})") from None
            if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
                records = parse_pax(self._meta(info.size, "a PAX header"), self._what)
                (self._global if info.type == tarfile.XGLTYPE else pax).update(records)
                continue
            if info.type == tarfile.GNUTYPE_SPARSE:
                self._skip_sparse_extensions(block)
            if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
                text = self._meta(info.size, "a GNU long name").split(b"\0", 1)[0].decode("utf-8",
                                                                                           "surrogateescape")
                if info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = text
                else:
                    long_link = text
                continue
            return self._member(info, {**self._global, **pax}, long_name, long_link)

    def _skip_padding(self) -> bool:
        """Past the zeros that round the member up to a block; False when the stream ends among them."""
        while self._padding:
            data = self._read(self._padding)
            if not data:
                return False
            self._padding -= len(data)
        return True

    def _skip_sparse_extensions(self, header: bytes) -> None:
        """Old GNU sparse headers chain 512-byte extensions (flag at 482, then at 504 of each) before the data."""
        extended = header[482]
        while extended:
            extended = self._read_exact(BLOCK, "inside a GNU sparse header")[504]

    def _read_exact_or_none(self) -> bytes | None:
        first = self._read(BLOCK)
        if not first:
            return None
        return first + self._read_exact(BLOCK - len(first), "inside a tar header") if len(first) < BLOCK else first

    def _meta(self, size: int, what: str) -> bytes:
        if size > MAX_META:
            raise InvalidImage(f"{self._what} has {what} of {size} bytes (at most {MAX_META} accepted)")
        data = self._read_exact(size, f"inside {what}")
        self._skip(-size % BLOCK, f"inside {what}")
        return data

    def _member(self, info: tarfile.TarInfo, pax: dict[str, str], long_name: str | None,
                long_link: str | None) -> Member:
        name = pax.get("path", long_name if long_name is not None else info.name)
        linkname = pax.get("linkpath", long_link if long_link is not None else info.linkname)
        size = info.size
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                size = -1
            if size < 0:
                raise InvalidImage(f"{self._what}: member {name!r} has an invalid PAX size {pax['size']!r}")
        sparse = info.type == tarfile.GNUTYPE_SPARSE or any(key.startswith("GNU.sparse.") for key in pax)
        name = pax.get("GNU.sparse.name", name)  # PAX sparse formats hide the real name here
        if info.type in _HEADER_ONLY:
            size = 0
        self._data_left, self._padding = size, -size % BLOCK
        return Member(name, self._parts(name), info.type, size, linkname, sparse)

    def _parts(self, name: str) -> tuple[str, ...]:
        """Path components; "/disk/x", "./disk/x" and "disk/x" are one path, `..` anywhere is refused."""
        relative = name.lstrip("/")
        if not relative:
            return ()
        try:
            return tuple(member_parts(relative))
        except UnsafeMember as err:
            raise InvalidImage(f"{self._what}: {err}") from None

    def drain(self) -> None:
        """Read past the end-of-archive marker to the end of the stream (so the blob digest gets checked)."""
        extra = 0
        while data := self._read(CHUNK):
            extra += len(data)
            if extra > MAX_TRAILER:
                raise InvalidImage(f"{self._what} has more than {MAX_TRAILER} bytes after its end-of-archive marker")


def parse_pax(data: bytes, what: str) -> dict[str, str]:
    """PAX records, "<length> <key>=<value>\\n" each (plain function, tested directly)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding after the last record
            break
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        record = data[pos:pos + length]
        if length <= space - pos + 1 or len(record) != length or not record.endswith(b"\n") or b"=" not in record:
            raise InvalidImage(f"{what} has a malformed PAX header record at byte {pos}")
        key, _, value = record[space - pos + 1:-1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


# -- what disk/ holds after the layers above ------------------------------------------------------


@dataclass
class Hidden:
    """What the layers above hide of disk/ in the layers below: all of it, or some of its entries."""

    everything: bool = False
    names: set[str] = field(default_factory=set)
    by: str = ""  # the layer that hid everything, for the error message

    def merge(self, other: Hidden) -> None:
        if other.everything and not self.everything:
            self.everything, self.by = True, other.by
        self.names |= other.names

    def hides(self, name: str) -> bool:
        return self.everything or name in self.names


def classify(member: Member, hidden: Hidden, pending: Hidden, what: str) -> str | None:
    """The disk's file name when member is a visible regular file directly under disk/, else None.

    Records the member's whiteouts in pending (they apply to lower layers only); refuses what CDI or safety
    refuses. A plain function of one member, so the rules are tested without a registry.
    """
    parts = member.parts
    if not parts:
        return None
    if parts[0] != DISK_DIR:
        if len(parts) == 1 and parts[0] in (WHITEOUT + DISK_DIR, OPAQUE):
            pending.everything, pending.by = True, what  # disk/ removed, or the root made opaque
        return None
    if member.sparse:  # its bytes need the sparse map applied; no container tool writes these
        raise InvalidImage(f"{what}: {member.name!r} is a GNU sparse file; only plain regular files are accepted "
                           "under disk/")
    if member.type in _KINDS or not (member.type in _REGULAR or member.type == tarfile.DIRTYPE):
        kind = _KINDS.get(member.type, f"of unsupported type {member.type!r}")
        raise InvalidImage(f"{what}: {member.name!r} is {kind}; only one regular file is accepted under disk/")
    if len(parts) == 1:
        if member.type != tarfile.DIRTYPE:  # a file named disk replaces the directory of lower layers
            pending.everything, pending.by = True, what
        return None
    name = parts[1]
    if len(parts) == 2 and name == OPAQUE:
        pending.everything, pending.by = True, what
        return None
    if parts[-1].startswith(WHITEOUT):
        if len(parts) == 2 and not name.startswith(WHITEOUT + WHITEOUT):
            pending.names.add(name[len(WHITEOUT):])
        return None  # whiteouts deeper down, or aufs metadata (.wh..wh.*): nothing visible
    if hidden.hides(name):
        return None
    if len(parts) > 2 or member.type == tarfile.DIRTYPE:
        raise InvalidImage(f"{ANOTHER_DIR}: {member.name!r} in {what}")
    return name


# -- the disk stream --------------------------------------------------------------------------------


class _LayerScan:
    """One layer being walked with what the layers above hide; collects what it hides from those below."""

    def __init__(self, descriptor: LayerDescriptor, opener: Opener, hidden: Hidden) -> None:
        self.descriptor, self.hidden = descriptor, hidden
        self.what = f"layer {descriptor.digest}"
        self.pending = Hidden()
        self.raw = opener()
        self.stream = open_layer(descriptor, self.raw)
        self.walker = TarWalker(self.stream, self.what)

    def next(self) -> Member | None:
        try:
            return self.walker.next()
        except InvalidImage as err:
            self.blame_blob(err)

    def read_data(self, size: int, name: str) -> bytes:
        try:
            return self.walker.read_data(size, name)
        except InvalidImage as err:
            self.blame_blob(err)

    def find_disk(self) -> Member | None:
        """Walk to the first visible file under disk/; None when the layer has none (then read to its end)."""
        while (member := self.next()) is not None:
            if classify(member, self.hidden, self.pending, self.what) is not None:
                return member
        self._drain()
        return None

    def check_rest(self, disk: Member) -> None:
        """The rest of the layer after the disk's bytes: no second file, then read to the end."""
        while (member := self.next()) is not None:
            name = classify(member, self.hidden, self.pending, self.what)
            if name is not None:
                detail = "appears twice" if member.parts[:2] == disk.parts[:2] else f"and {member.name!r}"
                raise InvalidImage(f"{MORE_THAN_ONE}: {disk.name!r} {detail} in {self.what}")
        self._drain()

    def _drain(self) -> None:
        try:
            self.walker.drain()
        except InvalidImage as err:
            self.blame_blob(err)

    def blame_blob(self, err: InvalidImage) -> NoReturn:
        """A layer that does not decode is most often a corrupt download: when the blob's digest (checked at its
        end, if that is near) proves it, that is the error to report."""
        left = BLAME_READ_LIMIT
        try:
            while left > 0 and (data := self.raw.read(min(CHUNK, left))):
                left -= len(data)
        except BlobMismatch as mismatch:
            raise mismatch from err
        except Exception:  # the decoding error stays the one to report
            pass
        raise err

    def close(self) -> None:
        self.stream.close()


class DiskStream:
    """The disk file's bytes as a Reader; reports its end only once the rest of its layer checked out."""

    def __init__(self, scan: _LayerScan, member: Member) -> None:
        self._scan, self._member = scan, member
        self.name = member.parts[1]
        self.size = member.size
        self.layer_digest = scan.descriptor.digest
        self._finished = False

    def read(self, size: int, /) -> bytes:
        if size <= 0:
            return b""
        data = self._scan.read_data(size, self._member.name)
        if data or self._finished:
            return data
        self._scan.check_rest(self._member)
        self._finished = True
        return b""

    def close(self) -> None:
        self._scan.close()


def open_disk(layers_top_down: Sequence[tuple[LayerDescriptor, Opener]]) -> DiskStream:
    """The container disk of an image whose layers are given top layer first; lower layers are opened lazily."""
    hidden = Hidden()
    for index, (descriptor, opener) in enumerate(layers_top_down):
        if hidden.everything:
            log.info("disk/ is hidden by %s; the %d layer(s) below are not read", hidden.by,
                     len(layers_top_down) - index)
            break
        scan = _LayerScan(descriptor, opener, hidden)
        try:
            member = scan.find_disk()
        except BaseException:
            scan.close()
            raise
        if member is not None:
            log.info("disk/%s (%d bytes) is in layer %s, %d from the top; %d layer(s) below it are not read",
                     member.parts[1], member.size, descriptor.digest, index + 1, len(layers_top_down) - index - 1)
            return DiskStream(scan, member)
        scan.close()
        hidden.merge(scan.pending)
    where = f"disk/ is removed by {hidden.by}" if hidden.everything else \
        f"no regular file under disk/ in its {len(layers_top_down)} layer(s)"
    raise InvalidImage(f"{NO_DISK}: {where}")


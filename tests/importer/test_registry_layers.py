"""Container-disk layers built here with tarfile and compressed by the real gzip and zstd tools, read from files
through an opener that verifies the digest at the end of the blob as the registry client does."""

from __future__ import annotations

import hashlib
import io
import random
import resource
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from importer.errors import InvalidImage
from importer.pipeline import CHUNK, Reader
from importer.registry.blob import BlobMismatch
from importer.registry.layers import (
    ANOTHER_DIR,
    MORE_THAN_ONE,
    NO_DISK,
    DiskStream,
    Hidden,
    Member,
    classify,
    open_disk,
    parse_pax,
)
from importer.registry.manifests import Descriptor

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA = {"tar": OCI_TAR, "gzip": OCI_GZIP, "zstd": OCI_ZSTD}
DISK = random.Random(11).randbytes(3 * 1024 * 1024 + 4321)  # crosses CHUNK boundaries, not block aligned

Entry = tuple[tarfile.TarInfo, bytes | None]


def file(name: str, data: bytes) -> Entry:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def directory(name: str) -> Entry:
    return special(name, tarfile.DIRTYPE)


def tar_bytes(entries: list[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def compress(data: bytes, kind: str) -> bytes:
    if kind == "tar":
        return data
    tool = {"gzip": ["gzip", "-c", "-1"], "zstd": ["zstd", "-c", "-q", "-1"]}[kind]
    return subprocess.run(tool, input=data, capture_output=True, check=True).stdout


class BlobReader:
    """A blob read from a file, hashed as read; a digest mismatch is raised at its end, as the client does."""

    def __init__(self, path: Path, digest: str) -> None:
        self._file = path.open("rb")
        self._digest = digest
        self._hash = hashlib.sha256()
        self.closed = False

    def read(self, size: int, /) -> bytes:
        data = self._file.read(size)
        self._hash.update(data)
        if not data and f"sha256:{self._hash.hexdigest()}" != self._digest:
            raise BlobMismatch(f"blob {self._digest}: digest mismatch, got sha256:{self._hash.hexdigest()}")
        return data

    def close(self) -> None:
        self._file.close()
        self.closed = True


@dataclass
class Image:
    """Layers as blob files, bottom first, and a record of which ones were opened."""

    root: Path
    layers: list[tuple[Descriptor, Path]] = field(default_factory=list)
    opened: list[int] = field(default_factory=list)  # indexes, bottom = 0
    readers: list[BlobReader] = field(default_factory=list)

    def add(self, entries: list[Entry], kind: str = "gzip", media_type: str | None = None,
            blob: bytes | None = None) -> Descriptor:
        data = blob if blob is not None else compress(tar_bytes(entries), kind)
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        path = self.root / f"layer{len(self.layers)}"
        path.write_bytes(data)
        descriptor = Descriptor(media_type or MEDIA[kind], digest, len(data))
        self.layers.append((descriptor, path))
        return descriptor

    def opener(self, index: int) -> Callable[[], Reader]:
        def open_blob() -> Reader:
            self.opened.append(index)
            descriptor, path = self.layers[index]
            reader = BlobReader(path, descriptor.digest)
            self.readers.append(reader)
            return reader
        return open_blob

    def top_down(self) -> list[tuple[Descriptor, Callable[[], Reader]]]:
        return [(self.layers[i][0], self.opener(i)) for i in reversed(range(len(self.layers)))]

    def open(self) -> DiskStream:
        return open_disk(self.top_down())

    def read_disk(self) -> tuple[DiskStream, bytes]:
        stream = self.open()
        try:
            parts = []
            while data := stream.read(CHUNK):
                parts.append(data)
        finally:
            stream.close()
        return stream, b"".join(parts)


@pytest.fixture
def image(tmp_path: Path) -> Iterator[Image]:
    img = Image(tmp_path)
    yield img
    assert all(r.closed for r in img.readers), "a blob reader was left open"


def os_layer() -> list[Entry]:
    return [directory("etc"), file("etc/os-release", b"ID=test\n"), directory("usr"), directory("usr/bin"),
            file("usr/bin/tool", b"\x7fELF" * 1000)]


def disk_layer(name: str = "disk.img", data: bytes = DISK, prefix: str = "") -> list[Entry]:
    return [directory(f"{prefix}disk"), file(f"{prefix}disk/{name}", data)]


# -- success --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "media_type"), [("tar", OCI_TAR), ("gzip", OCI_GZIP), ("zstd", OCI_ZSTD),
                                                   ("gzip", DOCKER_GZIP)])
def test_raw_disk_streams_out_of_its_layer(image: Image, kind: str, media_type: str) -> None:
    digest = image.add(os_layer() + disk_layer(), kind, media_type).digest
    stream, data = image.read_disk()
    assert data == DISK
    assert (stream.name, stream.size, stream.layer_digest) == ("disk.img", len(DISK), digest)


@pytest.mark.parametrize("prefix", ["./", "/"])
def test_member_name_forms_are_one_path(image: Image, prefix: str) -> None:
    image.add(disk_layer(prefix=prefix), "tar")
    assert image.read_disk()[1] == DISK


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_disk_name_from_pax_or_gnu_header(image: Image, fmt: int) -> None:
    name = "d" * 150 + ".qcow2"
    image.add([], blob=tar_bytes(disk_layer(name), fmt), media_type=OCI_TAR)
    stream, data = image.read_disk()
    assert (stream.name, data) == (name, DISK)


def test_media_type_that_lies_is_read_by_its_bytes(image: Image) -> None:
    image.add(disk_layer(), "tar", media_type=OCI_ZSTD)  # a plain tar labelled zstd
    assert image.read_disk()[1] == DISK


def test_disk_in_lower_layer_leaves_the_layers_below_unread(image: Image) -> None:
    image.add(os_layer(), "gzip")  # 0: never needed
    disk = image.add(disk_layer(), "zstd")  # 1
    image.add([file("usr/share/doc", b"x" * 5000)], "gzip")  # 2
    image.add([directory("disk"), file("etc/motd", b"hi\n")], "tar")  # 3: disk/ itself, no file in it
    stream, data = image.read_disk()
    assert data == DISK and stream.layer_digest == disk.digest
    assert image.opened == [3, 2, 1]


def test_whiteout_removes_older_disk_for_a_newer_one(image: Image) -> None:
    image.add(disk_layer("old.img", b"old" * 1000), "gzip")
    image.add([file("disk/.wh.old.img", b""), file("disk/new.img", DISK)], "gzip")
    stream, data = image.read_disk()
    assert (stream.name, data) == ("new.img", DISK)
    assert image.opened == [1]


def test_whiteout_in_upper_layer_leaves_the_other_file_below(image: Image) -> None:
    image.add([file("/disk/a.img", b"gone" * 100), file("/disk/b.img", DISK)], "zstd")
    image.add([file("./disk/.wh.a.img", b"")], "tar")
    stream, data = image.read_disk()
    assert (stream.name, data) == ("b.img", DISK)
    assert image.opened == [1, 0]


@pytest.mark.parametrize("hider", [[directory("disk"), file("disk/.wh..wh..opq", b"")], [file(".wh.disk", b"")],
                                   [file(".wh..wh..opq", b"")]], ids=["opaque-disk", "whiteout-disk", "opaque-root"])
def test_disk_hidden_above_is_not_looked_for_below(image: Image, hider: list[Entry]) -> None:
    image.add(disk_layer(), "gzip")
    image.add(hider, "gzip")
    with pytest.raises(InvalidImage, match=f"^{NO_DISK}: disk/ is removed by layer sha256:"):
        image.open()
    assert image.opened == [1]


def test_opaque_directory_keeps_its_own_layer(image: Image) -> None:
    image.add(disk_layer("old.img"), "gzip")
    image.add([directory("disk"), file("disk/.wh..wh..opq", b""), file("disk/new.img", DISK)], "gzip")
    stream, data = image.read_disk()
    assert (stream.name, data) == ("new.img", DISK)


# -- CDI's refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [[os_layer()], [os_layer(), [directory("disk")]], [[file("diskette", b"x")]]],
                         ids=["no-disk-dir", "empty-disk-dir", "similar-name"])
def test_no_disk_file(image: Image, layers: list[list[Entry]]) -> None:
    for entries in layers:
        image.add(entries, "gzip")
    with pytest.raises(InvalidImage, match=f"^{NO_DISK}: no regular file under disk/ in its {len(layers)} layer"):
        image.open()
    assert image.opened == list(reversed(range(len(layers))))


def test_two_files_refused_after_the_first_was_streamed(image: Image) -> None:
    image.add([*disk_layer("a.img"), file("etc/between", b"x"), file("disk/b.img", b"second")], "zstd")
    stream = image.open()
    got = 0
    with pytest.raises(InvalidImage, match=f"^{MORE_THAN_ONE}: 'disk/a.img' and 'disk/b.img'"):
        while data := stream.read(CHUNK):
            got += len(data)
    stream.close()
    assert got == len(DISK)  # the disk's bytes all came out; the end is what is refused


def test_same_name_twice_refused(image: Image) -> None:
    image.add([*disk_layer(), file("disk/disk.img", b"again")], "tar")
    with pytest.raises(InvalidImage, match=f"^{MORE_THAN_ONE}: 'disk/disk.img' appears twice"):
        image.read_disk()


@pytest.mark.parametrize("entries", [[directory("disk/sub")], [file("disk/sub/x.img", b"x")]], ids=["dir", "nested"])
def test_directory_under_disk_refused(image: Image, entries: list[Entry]) -> None:
    image.add(disk_layer() + entries, "gzip")
    with pytest.raises(InvalidImage, match=f"^{ANOTHER_DIR}: 'disk/sub"):
        image.read_disk()


@pytest.mark.parametrize(("entry", "what"), [
    (special("disk/link.img", tarfile.SYMTYPE, "../etc/shadow"), "a symlink"),
    (special("disk/hard.img", tarfile.LNKTYPE, "etc/shadow"), "a hard link"),
    (special("disk/dev", tarfile.CHRTYPE), "a character device"),
    (special("disk/blk", tarfile.BLKTYPE), "a block device"),
    (special("disk/fifo", tarfile.FIFOTYPE), "a FIFO"),
    (special("disk", tarfile.SYMTYPE, "/etc"), "a symlink"),
])
def test_special_files_under_disk_refused(image: Image, entry: Entry, what: str) -> None:
    image.add([file("etc/x", b"x"), entry, file("disk/disk.img", DISK)], "gzip")
    with pytest.raises(InvalidImage, match=f"'{entry[0].name}' is {what}; only one regular file"):
        image.open()


@pytest.mark.parametrize("name", ["disk/../../etc/passwd", "../disk/disk.img", "usr/../../x"])
def test_dotdot_refused(image: Image, name: str) -> None:
    image.add([file(name, b"x")], "tar")
    with pytest.raises(InvalidImage, match=r"path contains '\.\.'"):
        image.open()


def test_special_files_outside_disk_are_skipped(image: Image) -> None:
    image.add([special("bin", tarfile.SYMTYPE, "usr/bin"), special("dev/null", tarfile.CHRTYPE),
               special("etc/hard", tarfile.LNKTYPE, "etc/x"), *disk_layer()], "gzip")
    assert image.read_disk()[1] == DISK


# -- broken and hostile blobs -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tar", "gzip", "zstd"])
def test_digest_mismatch_at_the_end_of_the_disk_layer_propagates(image: Image, kind: str) -> None:
    descriptor = image.add(disk_layer(), kind)
    image.layers[0] = (Descriptor(descriptor.media_type, "sha256:" + "0" * 64, descriptor.size), image.layers[0][1])
    stream = image.open()
    got = 0
    with pytest.raises(BlobMismatch, match="digest mismatch"):
        while data := stream.read(CHUNK):
            got += len(data)
    stream.close()
    # The error comes out of read() whenever the blob ends (a compressed one ends before its last bytes are
    # decoded); what matters is that no read ever reported a clean end.
    assert got == len(DISK) if kind == "tar" else got <= len(DISK)


def test_digest_mismatch_in_an_upper_layer_stops_the_search(image: Image) -> None:
    image.add(disk_layer(), "gzip")
    upper = image.add(os_layer(), "gzip")
    path = image.layers[1][1]
    path.write_bytes(compress(tar_bytes([*os_layer(), file("etc/evil", b"!")]), "gzip"))  # tampered after push
    assert upper.digest != f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    with pytest.raises(BlobMismatch, match="digest mismatch"):
        image.open()
    assert image.opened == [1]


def flip_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:]


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_tampered_layer_reports_the_digest_not_the_decoder(image: Image, kind: str) -> None:
    """Flipped bytes break decompression first; the blob's digest, checked by reading on, is the real cause."""
    descriptor = image.add(disk_layer(), kind)
    path = image.layers[0][1]
    path.write_bytes(flip_middle(path.read_bytes()))
    stream = image.open()
    with pytest.raises(BlobMismatch, match=f"blob {descriptor.digest}: digest mismatch") as caught:
        while stream.read(CHUNK):
            pass
    stream.close()
    assert isinstance(caught.value.__cause__, InvalidImage)


def test_corrupt_layer_with_a_matching_digest_reports_the_decoder(image: Image) -> None:
    whole = compress(tar_bytes(disk_layer()), "gzip")
    image.add([], blob=flip_middle(whole), media_type=OCI_GZIP)  # corrupt when pushed: the digest agrees
    with pytest.raises(InvalidImage, match="gzip decompression failed"):
        image.read_disk()


@pytest.mark.parametrize("kind", ["tar", "gzip", "zstd"])
@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_layer(image: Image, kind: str, cut: float) -> None:
    whole = compress(tar_bytes(disk_layer()), kind)
    image.add([], blob=whole[: int(len(whole) * cut)], media_type=MEDIA[kind])
    with pytest.raises(InvalidImage, match=r"truncated|unexpected end"):
        image.read_disk()


def test_tar_header_claiming_more_than_the_layer_holds(image: Image) -> None:
    info = tarfile.TarInfo("disk/disk.img")
    info.size = 100 * 1024 * 1024  # claims 100 MiB, holds 1 MiB
    image.add([], blob=info.tobuf(tarfile.USTAR_FORMAT) + DISK[:1024 * 1024], media_type=OCI_TAR)
    stream = image.open()
    assert stream.size == 100 * 1024 * 1024
    with pytest.raises(InvalidImage, match=r"ends inside 'disk/disk\.img' with 103809024 of its bytes missing"):
        while stream.read(CHUNK):
            pass
    stream.close()


def test_skipped_member_claiming_more_than_the_layer_holds(image: Image) -> None:
    info = tarfile.TarInfo("usr/big")
    info.size = 1 << 40  # a base-256 size field, as GNU tar writes sizes over 8 GiB
    image.add([], blob=info.tobuf(tarfile.GNU_FORMAT) + b"x" * 4096, media_type=OCI_TAR)
    with pytest.raises(InvalidImage, match="truncated: it ends inside a member's data"):
        image.open()


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return f"{length}{body}".encode()


def test_pax_size_is_honoured(image: Image) -> None:
    """PAX 'size' overrides the header's (how tar stores members over 8 GiB): here the ustar field says 0."""
    record = pax_record("size", str(len(DISK)))
    xhdr = tarfile.TarInfo("PaxHeaders/disk.img")
    xhdr.type, xhdr.size = tarfile.XHDTYPE, len(record)
    info = tarfile.TarInfo("disk/disk.img")
    body = (xhdr.tobuf(tarfile.USTAR_FORMAT) + record.ljust(512, b"\0") + info.tobuf(tarfile.USTAR_FORMAT) + DISK
            + bytes(-len(DISK) % 512) + bytes(1024))
    image.add([], blob=body, media_type=OCI_TAR)
    stream, data = image.read_disk()
    assert stream.size == len(DISK) and data == DISK


def gnu_sparse(name: str, stored: bytes, extensions: int) -> bytes:
    """An old-GNU sparse member with `extensions` chained extension headers, then its stored data."""
    info = tarfile.TarInfo(name)
    info.size = len(stored)
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[482] = 1 if extensions else 0
    header[148:156] = b"        "
    header[148:155] = f"{sum(header):06o}\0".encode()
    blocks = [bytes(504) + bytes([1 if i < extensions - 1 else 0]) + bytes(7) for i in range(extensions)]
    return bytes(header) + b"".join(blocks) + stored + bytes(-len(stored) % 512)


def test_gnu_sparse_member_under_disk_refused(image: Image) -> None:
    image.add([], blob=gnu_sparse("disk/disk.img", b"x" * 512, 0) + bytes(1024), media_type=OCI_TAR)
    with pytest.raises(InvalidImage, match=r"'disk/disk\.img' is a GNU sparse file"):
        image.open()


def test_pax_sparse_member_under_disk_refused(image: Image) -> None:
    record = pax_record("GNU.sparse.name", "disk/disk.img") + pax_record("GNU.sparse.major", "1")
    xhdr = tarfile.TarInfo("disk/GNUSparseFile.1/PaxHeaders")
    xhdr.type, xhdr.size = tarfile.XHDTYPE, len(record)
    info = tarfile.TarInfo("disk/GNUSparseFile.1/disk.img")
    info.size = 512
    body = xhdr.tobuf(tarfile.USTAR_FORMAT) + record.ljust(512, b"\0") + info.tobuf(tarfile.USTAR_FORMAT)
    image.add([], blob=body + bytes(512) + bytes(1024), media_type=OCI_TAR)
    with pytest.raises(InvalidImage, match=r"'disk/disk\.img' is a GNU sparse file"):
        image.open()


def test_gnu_sparse_member_elsewhere_is_skipped_with_its_extensions(image: Image) -> None:
    body = gnu_sparse("var/log/lastlog", b"y" * 1000, 2) + tar_bytes(disk_layer())
    image.add([], blob=body, media_type=OCI_TAR)
    assert image.read_disk()[1] == DISK


def test_garbage_is_not_a_tar(image: Image) -> None:
    image.add([], blob=random.Random(1).randbytes(4096), media_type=OCI_TAR)
    with pytest.raises(InvalidImage, match="is not a valid tar stream"):
        image.open()


def test_layer_without_end_of_archive_marker_ends_after_its_last_member(image: Image) -> None:
    """umoci writes layers so; a cut inside a header or a member's data is still refused (tests above)."""
    info = tarfile.TarInfo("disk/disk.img")
    info.size = len(DISK)
    image.add([], blob=info.tobuf(tarfile.USTAR_FORMAT) + DISK + bytes(-len(DISK) % 512), media_type=OCI_TAR)
    assert image.read_disk()[1] == DISK


def test_layer_ending_in_its_last_members_padding(image: Image) -> None:
    """umoci also leaves out the last member's padding; Go's reader ends the archive there."""
    info = tarfile.TarInfo("disk/disk.img")
    info.size = len(DISK)
    image.add([], blob=info.tobuf(tarfile.USTAR_FORMAT) + DISK + bytes(7), media_type=OCI_TAR)
    assert image.read_disk()[1] == DISK


@pytest.mark.parametrize("cut", [100, 512 + 512 + 100], ids=["in-first-header", "in-pax-member"])
def test_cut_inside_a_header(image: Image, cut: int) -> None:
    record = pax_record("path", "disk/" + "x" * 200)
    xhdr = tarfile.TarInfo("PaxHeaders/x")
    xhdr.type, xhdr.size = tarfile.XHDTYPE, len(record)
    info = tarfile.TarInfo("disk/short")
    whole = xhdr.tobuf(tarfile.USTAR_FORMAT) + record.ljust(512, b"\0") + info.tobuf(tarfile.USTAR_FORMAT)
    image.add([], blob=whole[:cut], media_type=OCI_TAR)
    with pytest.raises(InvalidImage, match="truncated: it ends inside a tar header"):
        image.open()


def test_cut_after_an_extended_header(image: Image) -> None:
    record = pax_record("path", "disk/" + "x" * 200)
    xhdr = tarfile.TarInfo("PaxHeaders/x")
    xhdr.type, xhdr.size = tarfile.XHDTYPE, len(record)
    image.add([], blob=xhdr.tobuf(tarfile.USTAR_FORMAT) + record.ljust(512, b"\0"), media_type=OCI_TAR)
    with pytest.raises(InvalidImage, match="truncated: it ends after an extended header"):
        image.open()


def test_xz_layer_refused(image: Image) -> None:
    layer = tar_bytes(disk_layer(data=b"x" * 4096))
    blob = subprocess.run(["xz", "-c", "-0"], input=layer, capture_output=True, check=True).stdout
    image.add([], blob=blob, media_type=OCI_GZIP)
    with pytest.raises(InvalidImage, match="xz-compressed"):
        image.open()


def test_unknown_media_type_refused(image: Image) -> None:
    image.add(disk_layer(), "gzip", media_type="application/vnd.cncf.helm.chart.content.v1.tar+gzip")
    with pytest.raises(InvalidImage, match=r"media type 'application/vnd\.cncf\.helm\.chart\.content\.v1\.tar\+gzip', "
                                           r"which is not a container image layer"):
        image.open()


def test_zstd_bomb_is_read_in_bounded_pieces(image: Image) -> None:
    """512 MiB of zeros after the disk, a few KiB compressed: read past in pieces, never held whole."""
    zeros = tarfile.TarInfo("usr/zeros")
    zeros.size = 512 * 1024 * 1024
    disk = tarfile.TarInfo("disk/disk.img")
    disk.size = 4096
    proc = subprocess.Popen(["zstd", "-c", "-q", "-1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    blob = image.root / "bomb.zst"
    with blob.open("wb") as out:
        pump = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=out)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdout.close()
        proc.stdin.write(disk.tobuf(tarfile.USTAR_FORMAT) + DISK[:4096] + zeros.tobuf(tarfile.USTAR_FORMAT))
        block = bytes(CHUNK)
        for _ in range(zeros.size // CHUNK):
            proc.stdin.write(block)
        proc.stdin.write(bytes(1024))
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0 and pump.wait(timeout=60) == 0
    image.add([], blob=blob.read_bytes(), media_type=OCI_ZSTD)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, data = image.read_disk()
    assert data == DISK[:4096]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 128 * 1024  # KiB: far below 512 MiB


# -- plain functions ----------------------------------------------------------------------------


def test_parse_pax_records() -> None:
    assert parse_pax(b"30 mtime=1432668921.098285006\n19 path=disk/x.img\n", "t") == {
        "mtime": "1432668921.098285006", "path": "disk/x.img"}
    for bad in (b"99 path=x\n", b"x path=y\n", b"11 pathxyz\n", b"5 a=b\n"):
        with pytest.raises(InvalidImage, match="malformed PAX"):
            parse_pax(bad, "t")


def test_classify_whiteouts_apply_below_only() -> None:
    hidden, pending = Hidden(), Hidden()
    whiteout = Member("disk/.wh.a.img", ("disk", ".wh.a.img"), tarfile.REGTYPE, 0)
    disk_a = Member("disk/a.img", ("disk", "a.img"), tarfile.REGTYPE, 10)
    assert classify(whiteout, hidden, pending, "t") is None
    assert classify(disk_a, hidden, pending, "t") == "a.img"  # same layer: still visible
    hidden.merge(pending)
    assert classify(disk_a, hidden, Hidden(), "t") is None  # lower layer: hidden
    aufs = Member("disk/.wh..wh.plnk", ("disk", ".wh..wh.plnk"), tarfile.DIRTYPE, 0)
    assert classify(aufs, Hidden(), pending, "t") is None and pending.names == {"a.img"}

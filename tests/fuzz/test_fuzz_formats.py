"""Format sniffing (importer/formats.py): the first 512 bytes of whatever a server sends decide the route. Any
bytes give one known format name and check_header raises nothing but InvalidImage; real files of every format
qemu-img, gzip, xz, zstd and tar write are recognised as what they are."""

from __future__ import annotations

import gzip
import io
import lzma
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from fuzzkit import fuzz
from hypothesis import given
from hypothesis import strategies as st

from importer import formats
from importer.errors import InvalidImage
from importer.formats import ALLOWED_QEMU_FORMATS, COMPRESSIONS, HEADER_SIZE, TAR, check_header, sniff

KNOWN = {*ALLOWED_QEMU_FORMATS, *COMPRESSIONS, TAR}
MAGICS = formats._MAGICS  # the table sniff reads, to place every magic at its offset


@fuzz(500)
@given(st.binary(max_size=HEADER_SIZE + 64))
def test_any_bytes_sniff_to_a_known_format(header: bytes) -> None:
    fmt = sniff(header)
    assert fmt in KNOWN
    for name in KNOWN:
        try:
            check_header(name, header)
        except InvalidImage as err:
            assert str(err)


@fuzz(300)
@given(st.sampled_from(range(len(MAGICS))), st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
def test_a_magic_at_its_offset_wins_unless_an_earlier_one_matches(index: int, noise: bytes) -> None:
    name, offset, magic = MAGICS[index]
    header = noise[:offset] + magic + noise[offset + len(magic) :]
    earlier = [n for n, o, m in MAGICS[:index] if header[o : o + len(m)] == m]
    assert sniff(header) == (earlier[0] if earlier else name)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("formats")


@fuzz(20)
@given(st.sampled_from(["qcow2", "vmdk", "vdi", "vpc", "vhdx"]), st.integers(1, 64))
def test_images_qemu_img_writes_sniff_as_their_format(folder: Path, fmt: str, mib: int) -> None:
    image = folder / f"image.{fmt}"
    subprocess.run(["qemu-img", "create", "-f", fmt, str(image), f"{mib}M"], check=True, capture_output=True)
    with image.open("rb") as f:
        header = f.read(HEADER_SIZE)
    image.unlink()
    assert sniff(header) == fmt
    check_header(fmt, header)  # a fresh image has nothing to refuse


def _tar(payload: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("disk.img")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def _zstd(payload: bytes) -> bytes:
    return subprocess.run(["zstd", "-c", "-q"], input=payload, capture_output=True, check=True).stdout


@fuzz(60)
@given(st.binary(max_size=2048), st.sampled_from(["gzip", "xz", "zstd", "tar"]))
def test_compressed_and_archived_data_sniff_as_their_wrapper(payload: bytes, wrapper: str) -> None:
    wraps: dict[str, Callable[[bytes], bytes]] = {"gzip": gzip.compress, "xz": lzma.compress, "zstd": _zstd,
                                                  "tar": _tar}
    wrap = wraps[wrapper]
    assert sniff(wrap(payload)[:HEADER_SIZE]) == wrapper

"""The streaming qcow2 reader (importer/qcow2_stream.py) on mutated real images, read in random-sized pieces:
it refuses (InvalidImage, or ScratchSpaceRequired past its memory bound) or imports, never writes outside the
disk, and whatever it imports from an image qemu-img also reads is what qemu-img reads."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
from fuzzkit import fuzz
from hypothesis import event, given
from hypothesis import strategies as st

from importer import qcow2
from importer.errors import ImageTooLarge, InvalidImage, ScratchSpaceRequired
from importer.formats import check_header
from importer.qcow2_stream import Qcow2Stream, disk_size, stream_problem
from importer.qcow2_stream_buffer import ClusterBuffer
from importer.target import SparseWriter, ZeroPolicy

KiB = 1024
MAX_DISK = 2 * 1024 * KiB  # a mutated header may claim more: refused like a disk larger than its volume


class Pieces:
    """The image as a network stream: reads return random short pieces."""

    def __init__(self, data: bytes, seed: int) -> None:
        self._data, self._pos, self._rng = data, 0, random.Random(seed)

    def read(self, size: int, /) -> bytes:
        take = min(size, self._rng.choice([1, 511, 4096, 65536, size]))
        out = self._data[self._pos : self._pos + take]
        self._pos += len(out)
        return out

    def close(self) -> None:
        pass


def qemu(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, check=False, timeout=30)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qcow2-stream-fuzz")


class Samples(dict[str, bytes]):
    """The images by name; printed by name only when hypothesis reports a failing example."""

    def __repr__(self) -> str:
        return f"Samples({', '.join(self)})"


@pytest.fixture(scope="module")
def samples(folder: Path) -> Samples:
    """Small real images: plain with snapshots and random writes, zlib, zstd, extended L2."""
    raw = folder / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(256 * KiB)
        f.write(bytes((i * 7) % 253 for i in range(40 * KiB)))
        f.seek(150 * KiB)
        f.write(b"\x01\x02" * (20 * KiB))
    made = Samples()
    for name, opts in {"zlib": ["-c", "-o", "cluster_size=512"],
                       "zstd": ["-c", "-o", "cluster_size=1024,compression_type=zstd"],
                       "ext": ["-o", "cluster_size=16384,extended_l2=on"]}.items():
        out = folder / f"{name}.qcow2"
        assert qemu("convert", "-f", "raw", "-O", "qcow2", *opts, raw, out).returncode == 0
        made[name] = out.read_bytes()
    guest = folder / "guest.qcow2"
    assert qemu("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", guest, "200k").returncode == 0
    for i, command in enumerate(["write -P 1 10k 3k", "write -P 2 150k 2k", "write -P 3 0 1k", "write -z 11k 1k"]):
        if i == 2:
            assert qemu("snapshot", "-c", "s", guest).returncode == 0
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(guest)], capture_output=True, check=True)
    made["guest"] = guest.read_bytes()
    return made


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, list[tuple[int, int]], int | None, int]:
    """Which sample, bytes to change (mostly in its first clusters: header and tables), where to cut it."""
    name = draw(st.sampled_from(["zlib", "zstd", "ext", "guest"]))
    near = st.integers(0, 8 * KiB)
    anywhere = st.integers(0, 300 * KiB)
    changes = draw(st.lists(st.tuples(st.one_of(near, near, anywhere), st.integers(0, 255)), max_size=6))
    cut = draw(st.one_of(st.none(), st.none(), st.integers(0, 300 * KiB)))
    return name, changes, cut, draw(st.integers(0, 1 << 30))


def stream(image: bytes, folder: Path, seed: int) -> bytes | None:
    """Our import of image: the disk bytes, or None when refused. Asserts it never wrote outside the disk."""
    try:
        check_header("qcow2", image[:512])
        header = qcow2.parse_header(image[:512])
    except InvalidImage:
        return None
    if stream_problem(header) is not None or header.virtual_size > MAX_DISK:
        return None
    size = disk_size(header)
    out = folder / "out.raw"
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        writer = SparseWriter(fd, ZeroPolicy.SKIP, size)  # a write past the disk raises
        buffer = ClusterBuffer(header.cluster_size, 8 * KiB, folder)  # small: the spill file is used too
        try:
            Qcow2Stream(header, Pieces(image, seed), writer, buffer).run()
        except ImageTooLarge as err:
            raise AssertionError(f"wrote outside the disk: {err}") from err
        except (InvalidImage, ScratchSpaceRequired) as err:
            event(f"refused: {str(err).split(':')[0]}")
            return None
        finally:
            buffer.close()
        os.ftruncate(fd, size)
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)
        out.unlink()


@fuzz(150)
@given(mutations())
def test_mutated_images_are_refused_or_read_as_qemu_reads_them(samples: Samples, folder: Path,
                                                              mutation: tuple[str, list[tuple[int, int]], int | None,
                                                                              int]) -> None:
    name, changes, cut, seed = mutation
    image = bytearray(samples[name])
    for offset, value in changes:
        if offset < len(image):
            image[offset] = value
    if cut is not None:
        del image[cut:]
    ours = stream(bytes(image), folder, seed)
    if ours is None:
        return
    event("imported")
    src, ref = folder / "fuzzed.qcow2", folder / "fuzzed.raw"
    src.write_bytes(image)
    try:
        done = qemu("convert", "-f", "qcow2", "-O", "raw", src, ref)
        if done.returncode != 0:
            event("qemu-img refused what we imported")
            return
        assert ref.read_bytes() == ours
    finally:
        src.unlink()
        ref.unlink(missing_ok=True)


@fuzz(30)
@given(st.sampled_from(["zlib", "zstd", "ext", "guest"]), st.integers(0, 1 << 30))
def test_unmutated_images_read_exactly_in_any_pieces(samples: Samples, folder: Path, name: str,
                                                     seed: int) -> None:
    src, ref = folder / f"{name}-whole.qcow2", folder / f"{name}-whole.raw"
    if not ref.exists():
        src.write_bytes(samples[name])
        assert qemu("convert", "-O", "raw", src, ref).returncode == 0
    assert stream(samples[name], folder, seed) == ref.read_bytes()

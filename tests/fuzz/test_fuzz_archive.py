"""Tar archives (content type `archive`), through the importer's own entry point: whatever members a tar holds
(`..`, absolute names, symlinks and hard links in and out, devices, FIFOs, odd modes, long names, any header
format) and whatever bytes it is cut or corrupted to, nothing outside the destination changes and the only
errors are the importer's own."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fuzzkit import fuzz
from hypothesis import event, given
from hypothesis import strategies as st

from importer import cli
from importer.errors import ImporterError
from importer.processor import ImportProcessor
from importer.progress import Progress

KINDS = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE,
         tarfile.BLKTYPE]
FORMATS = [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]
BOX = "{box}"  # replaced by the sandbox's absolute path: absolute links aimed at the victim
COMPONENTS = ["a", "b", "..", ".", "", "outside", "victim", "dest", "keep.txt", "planted", "plantdir", "x" * 120]


@contextlib.contextmanager
def sandbox() -> Iterator[Path]:
    """box/dest (the volume, with a tenant's file and planted links) beside box/outside (the victim)."""
    box = Path(tempfile.mkdtemp(prefix="hpp-fuzz-tar-"))
    try:
        (box / "outside").mkdir()
        (box / "outside" / "victim").write_bytes(b"victim data\n")
        dest = box / "dest"
        dest.mkdir()
        (dest / "keep.txt").write_bytes(b"tenant data\n")
        os.symlink("../outside", dest / "planted")
        os.symlink(str(box / "outside"), dest / "plantdir")
        yield box
    finally:
        for folder, dirs, _files in os.walk(box):  # members may have taken permissions away
            for name in dirs:
                path = os.path.join(folder, name)
                if not os.path.islink(path):
                    os.chmod(path, 0o755)
        shutil.rmtree(box)


def state_outside(box: Path) -> dict[str, tuple[object, ...]]:
    """Every entry of the box except the destination and the archive, as lstat and content show it."""
    seen: dict[str, tuple[object, ...]] = {}
    for folder, dirs, files in os.walk(box):
        if Path(folder) == box:
            dirs[:] = [d for d in dirs if d != "dest"]
        for name in [*dirs, *files]:
            path = Path(folder, name)
            if path == box / "x.tar":
                continue
            st_ = path.lstat()
            content: object = None
            if stat.S_ISLNK(st_.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(st_.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            seen[str(path.relative_to(box))] = (stat.S_IFMT(st_.st_mode), st_.st_mode, st_.st_nlink, st_.st_size,
                                                st_.st_mtime_ns, content)
    seen["."] = (os.lstat(box).st_mode, sorted(set(os.listdir(box)) - {"x.tar"}))
    return seen


def run_import(box: Path, archive: bytes) -> str:
    """The importer on box/x.tar into box/dest; "ok", or the name of the importer error."""
    (box / "x.tar").write_bytes(archive)
    args = cli.build_parser().parse_args([
        "import", "--source", "file", "--endpoint", str(box / "x.tar"), "--dest", str(box / "dest"),
        "--content-type", "archive", "--image-size", "16Mi", "--no-progress",
    ])
    try:
        ImportProcessor(cli.build_request(args, {}, Progress(None, None))).run()
    except ImporterError as err:
        assert str(err)
        return type(err).__name__
    return "ok"


def path_text(components: list[str], absolute: bool, box: str) -> str:
    text = "/".join(components)
    return f"{box}/{text}" if absolute else text


members = st.lists(st.tuples(
    st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=4),  # name
    st.booleans(),  # absolute name
    st.sampled_from(KINDS),
    st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=4),  # link target
    st.sampled_from(["", "/", BOX + "/", BOX + "/dest/"]),  # link target prefix
    st.binary(max_size=64),
    st.integers(0, 0o7777),
), min_size=1, max_size=6)


def build_tar(entries: list[tuple[object, ...]], fmt: int, box: Path) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name_parts, absolute, kind, link_parts, link_prefix, data, mode in entries:
            name = path_text(name_parts, bool(absolute), str(box))  # type: ignore[arg-type]
            info = tarfile.TarInfo(name or "x")
            info.type, info.mode = kind, mode  # type: ignore[assignment]
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = str(link_prefix).replace(BOX, str(box)) + "/".join(link_parts)  # type: ignore[arg-type]
            if kind == tarfile.REGTYPE:
                info.size = len(data)  # type: ignore[arg-type]
                tar.addfile(info, io.BytesIO(data))  # type: ignore[arg-type]
            else:
                with contextlib.suppress(ValueError):  # a name the format cannot hold: leave the member out
                    tar.addfile(info)
    return out.getvalue()


@fuzz(150)
@given(members, st.sampled_from(FORMATS))
def test_hostile_members_never_touch_anything_outside(entries: list[tuple[object, ...]], fmt: int) -> None:
    with sandbox() as box:
        try:
            archive = build_tar(entries, fmt, box)
        except ValueError:
            return  # tarfile itself refuses to write such a name
        before = state_outside(box)
        event(run_import(box, archive))
        assert state_outside(box) == before


@fuzz(150)
@given(members, st.sampled_from(FORMATS),
       st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=12),
       st.integers(0, 3))
def test_corrupted_archives_never_touch_anything_outside(entries: list[tuple[object, ...]], fmt: int,
                                                         flips: list[tuple[int, int]], cut: int) -> None:
    with sandbox() as box:
        try:
            archive = bytearray(build_tar(entries, fmt, box))
        except ValueError:
            return
        for offset, value in flips:
            if offset < len(archive) and not 257 <= offset < 262:  # keep "ustar" so it is still routed as tar
                archive[offset] = value
        if cut:
            del archive[max(512, len(archive) * (4 - cut) // 4) :]
        before = state_outside(box)
        event(run_import(box, bytes(archive)))
        assert state_outside(box) == before

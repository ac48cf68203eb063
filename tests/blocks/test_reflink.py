"""Clones on real filesystems: reflink on XFS (independent yet sharing extents), sparse copies elsewhere."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from hpp_csi.linux import reflink, xfs

from .conftest import LoopTracker, MountTracker, XfsPool, make_xfs_pool

MIB = 1 << 20


def data_map(path: Path) -> list[tuple[int, int]]:
    """(start, end) of each data extent, from SEEK_DATA/SEEK_HOLE: what sparseness means to a reader."""
    extents, offset = [], 0
    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == errno.ENXIO
                break
            offset = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, offset))
    return extents


def shared_extents(path: Path) -> int:
    """Extents `filefrag -v` flags as shared with another file."""
    out = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines() if "shared" in line.split(":")[-1])


def sparse_source(path: Path, size: int, chunks: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in chunks.items():
            f.seek(offset)
            f.write(data)
    return path


def make_tree(root: Path) -> None:
    (root / "dir" / "deep").mkdir(parents=True)
    (root / "dir" / "deep" / "file.bin").write_bytes(os.urandom(256 * 1024))
    (root / "small.txt").write_text("hello\n")
    (root / "empty").touch()
    sparse_source(root / "disk.img", 64 * MIB, {0: b"A" * 4096, 32 * MIB: os.urandom(MIB)})


def test_reflink_clone_on_xfs_is_independent_and_shares_extents(xfs_pool: XfsPool) -> None:
    src, dst = xfs_pool.mount_point / "src", xfs_pool.mount_point / "dst"
    src.mkdir()
    make_tree(src)
    report = reflink.clone_tree(src, dst)
    assert report.method == "reflink" and report.reflinked == 4 and report.copied == 0
    assert (dst / "dir" / "deep" / "file.bin").read_bytes() == (src / "dir" / "deep" / "file.bin").read_bytes()
    assert shared_extents(dst / "disk.img") >= 2 and shared_extents(src / "disk.img") >= 2
    assert data_map(dst / "disk.img") == data_map(src / "disk.img")
    # Writing either side breaks the sharing for that block only: the other side keeps its data.
    with open(src / "small.txt", "r+") as f:
        f.write("HELLO")
    with open(dst / "disk.img", "r+b") as f:
        f.write(b"B" * 4096)
    assert (dst / "small.txt").read_text() == "hello\n"
    assert (src / "disk.img").read_bytes()[:4096] == b"A" * 4096
    assert (dst / "disk.img").read_bytes()[:4096] == b"B" * 4096


def test_reflink_of_1gib_of_real_data_costs_almost_no_space(tmp_path: Path, loops: LoopTracker,
                                                            mounted: MountTracker) -> None:
    pool = make_xfs_pool(tmp_path, loops, mounted, 2 << 30)
    src = pool.mount_point / "vol.img"
    block = os.urandom(4 * MIB)
    with open(src, "wb") as f:
        for _ in range(256):
            f.write(block)
        os.fsync(f.fileno())
    free_before = os.statvfs(pool.mount_point).f_bavail * os.statvfs(pool.mount_point).f_frsize
    started = time.perf_counter()
    assert reflink.clone_file(src, pool.mount_point / "snap.img") is reflink.CloneMethod.REFLINK
    elapsed = time.perf_counter() - started
    os.sync()
    st = os.statvfs(pool.mount_point)
    used = free_before - st.f_bavail * st.f_frsize
    assert used < 16 * MIB, f"a 1 GiB reflink consumed {used / MIB:.1f} MiB"
    assert elapsed < 1.0
    assert shared_extents(pool.mount_point / "snap.img") > 0


@pytest.mark.parametrize("fs", ["ext4", "tmpfs"])
def test_sparse_fallback_keeps_holes_and_content(fs: str, tmp_path: Path, tmpfs_dir: Path) -> None:
    root = tmp_path if fs == "ext4" else tmpfs_dir
    assert not xfs.supports_reflink(root)
    src = root / "src"
    src.mkdir()
    make_tree(src)
    report = reflink.clone_tree(src, root / "dst")
    assert report.method == "sparse-copy" and report.copied == 4 and report.reflinked == 0
    for rel in ["disk.img", "small.txt", "empty", "dir/deep/file.bin"]:
        assert (root / "dst" / rel).read_bytes() == (src / rel).read_bytes(), rel
        assert data_map(root / "dst" / rel) == data_map(src / rel), rel
    disk = os.stat(root / "dst" / "disk.img")
    assert disk.st_size == 64 * MIB and disk.st_blocks * 512 <= 2 * MIB


def test_trailing_hole_and_all_hole_files_keep_their_size(tmp_path: Path) -> None:
    only_hole = sparse_source(tmp_path / "hole.img", 10 * MIB, {})
    tail_hole = sparse_source(tmp_path / "tail.img", 10 * MIB, {0: b"x" * 8192})
    for src in (only_hole, tail_hole):
        dst = tmp_path / f"{src.name}.clone"
        assert reflink.clone_file(src, dst) is reflink.CloneMethod.SPARSE_COPY
        assert os.stat(dst).st_size == 10 * MIB
        assert data_map(dst) == data_map(src)


def test_block_volume_file_clone_on_xfs(xfs_pool: XfsPool) -> None:
    src = sparse_source(xfs_pool.mount_point / "disk.img", 128 * MIB, {MIB: os.urandom(MIB)})
    os.chmod(src, 0o660)
    dst = xfs_pool.mount_point / "disk-snap.img"
    assert reflink.clone_file(src, dst) is reflink.CloneMethod.REFLINK
    assert dst.read_bytes() == src.read_bytes()
    assert data_map(dst) == data_map(src)
    assert stat.S_IMODE(os.stat(dst).st_mode) == 0o660
    with pytest.raises(FileExistsError):
        reflink.clone_file(src, dst)  # never overwrites


def test_metadata_is_preserved(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    data = src / "sub" / "data"
    data.write_bytes(b"payload")
    os.chown(data, 1234, 5678)
    os.chmod(data, 0o4750)  # setuid survives because the mode is applied after chown
    os.setxattr(data, "user.origin", b"volume-a")
    os.setxattr(data, "security.hpp-test", b"label")
    os.utime(data, ns=(1_000_000_123, 2_000_000_456))
    os.chmod(src / "sub", 0o2770)
    os.chown(src / "sub", 42, 43)
    os.link(data, src / "sub" / "hardlink")
    os.utime(src / "sub", ns=(3_000_000_000, 4_000_000_789))
    os.mkfifo(src / "fifo", 0o640)
    (src / "rel-link").symlink_to("sub/data")
    (src / "dangling").symlink_to("nowhere/at/all")
    os.chown(src / "rel-link", 7, 8, follow_symlinks=False)
    os.utime(src / "rel-link", ns=(5_000_000_000, 6_000_000_000), follow_symlinks=False)

    report = reflink.clone_tree(src, dst)

    st = os.stat(dst / "sub" / "data")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o4750)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    assert os.getxattr(dst / "sub" / "data", "user.origin") == b"volume-a"
    assert os.getxattr(dst / "sub" / "data", "security.hpp-test") == b"label"
    sub = os.stat(dst / "sub")
    assert (sub.st_uid, sub.st_gid, stat.S_IMODE(sub.st_mode), sub.st_mtime_ns) == (42, 43, 0o2770, 4_000_000_789)
    assert os.stat(dst / "sub" / "hardlink").st_ino == st.st_ino and report.hardlinks == 1
    assert stat.S_ISFIFO(os.stat(dst / "fifo").st_mode) and report.special == 1
    assert os.readlink(dst / "rel-link") == "sub/data" and os.readlink(dst / "dangling") == "nowhere/at/all"
    link = os.lstat(dst / "rel-link")
    assert (link.st_uid, link.st_gid, link.st_mtime_ns) == (7, 8, 6_000_000_000)
    assert report.symlinks == 2 and report.skipped_xattrs == []


def test_symlinks_out_of_the_source_are_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host data")
    src = tmp_path / "src"
    src.mkdir()
    (src / "escape-dir").symlink_to(outside)
    (src / "escape-file").symlink_to(outside / "secret")
    report = reflink.clone_tree(src, tmp_path / "dst")
    assert report.symlinks == 2 and report.copied == 0 and report.directories == 0
    assert os.path.islink(tmp_path / "dst" / "escape-dir")
    assert sorted(os.listdir(tmp_path / "dst")) == ["escape-dir", "escape-file"]
    with pytest.raises(OSError):
        reflink.clone_tree(src / "escape-dir", tmp_path / "dst2")  # the source root itself is not followed
    with pytest.raises(OSError):
        reflink.clone_file(src / "escape-file", tmp_path / "copied-secret")


def test_clone_into_an_empty_volume_keeps_its_project(xfs_pool: XfsPool) -> None:
    src, dst = xfs_pool.mount_point / "src", xfs_pool.mount_point / "dst"
    src.mkdir()
    make_tree(src)
    dst.mkdir()
    xfs.set_project(dst, 4242)
    reflink.clone_tree(src, dst)
    assert {xfs.project_id(dst / rel) for rel in ["", "dir", "dir/deep/file.bin", "disk.img"]} == {4242}
    assert xfs.project_id(src / "disk.img") == 0


def test_clone_into_a_non_empty_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep").touch()
    with pytest.raises(reflink.CloneError, match="not empty"):
        reflink.clone_tree(tmp_path / "src", tmp_path / "dst")

"""Snapshot/clone time of a volume: reflink clone (hpp_csi.linux.reflink) vs a full data copy, same run, same XFS.

Each volume is a directory holding one disk image filled with real (random, incompressible) data, on an
XFS (reflink=1) loop filesystem over a sparse file. The reflink clone is timed as the driver takes it
(`clone_tree` of the volume directory, median of several); the baseline reads and writes every byte
(what a copy costs where extents cannot be shared), with the source evicted from the page cache first.
Usage: python bench/clone.py [--sizes 1,4,10] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import update_section
from hpp_csi.linux import loop, mounts, reflink, xfs

GIB = 1 << 30
CHUNK = 8 << 20
REFLINK_RUNS = 5


def write_volume(volume: Path, size: int) -> None:
    volume.mkdir()
    block = os.urandom(CHUNK)
    with open(volume / "disk.img", "wb") as f:
        for _ in range(size // CHUNK):
            f.write(block)
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def full_copy(src: Path, dst: Path) -> None:
    """Every byte read and written (no copy_file_range: XFS would turn it into a reflink)."""
    dst.mkdir()
    with open(src / "disk.img", "rb") as fin, open(dst / "disk.img", "wb") as fout:
        while data := fin.read(CHUNK):
            fout.write(data)
        fout.flush()
        os.fsync(fout.fileno())


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def measure(pool: Path, size_gib: int) -> dict[str, float]:
    volume = pool / f"vol-{size_gib}g"
    started = time.perf_counter()
    write_volume(volume, size_gib * GIB)
    write_s = time.perf_counter() - started
    reflink_times, used = [], []
    for run in range(REFLINK_RUNS):
        os.sync()
        before = free_bytes(pool)
        started = time.perf_counter()
        report = reflink.clone_tree(volume, pool / f"snap-{size_gib}g-{run}")
        os.sync()  # the clone's metadata on disk counts as part of taking it
        reflink_times.append(time.perf_counter() - started)
        used.append(before - free_bytes(pool))
        assert report.method == "reflink", report
    started = time.perf_counter()
    full_copy(volume, pool / f"copy-{size_gib}g")
    copy_s = time.perf_counter() - started
    for path in pool.iterdir():
        for file in path.iterdir():
            file.unlink()
        path.rmdir()
    return {"write_s": write_s, "reflink_ms": statistics.median(reflink_times) * 1000,
            "reflink_max_ms": max(reflink_times) * 1000, "reflink_used_mib": max(used) / (1 << 20),
            "copy_s": copy_s}


def run(sizes: list[int], workdir: str) -> list[tuple[int, dict[str, float]]]:
    tmp = Path(tempfile.mkdtemp(prefix="hpp-bench-clone-", dir=workdir))
    backing = tmp / "pool.img"
    with open(backing, "wb") as f:
        f.truncate((2 * max(sizes) + 4) * GIB)
    device = loop.attach(backing)
    mount_point = tmp / "pool"
    mount_point.mkdir()
    try:
        xfs.make_filesystem(device.path)
        xfs.mount_xfs(device.path, mount_point, quota=False)
        return [(size, measure(mount_point, size)) for size in sizes]
    finally:
        with contextlib.suppress(OSError):
            mounts.umount(mount_point)
        loop.detach(device.path)
        backing.unlink()
        mount_point.rmdir()
        tmp.rmdir()


def markdown(results: list[tuple[int, dict[str, float]]]) -> str:
    lines = [
        "## Snapshot / clone (`bench/clone.py`)",
        "",
        "Volume = a directory with one disk image fully written with random data, on XFS (reflink=1) on a loop",
        f"device. Reflink: `hpp_csi.linux.reflink.clone_tree` + sync, median (max) of {REFLINK_RUNS}.",
        "Full copy: read + write of every byte + fsync, source evicted from the page cache (the cost without extent",
        "sharing).",
        "",
        "| volume | reflink clone | space used by clone | full copy | speed-up |",
        "|---|---|---|---|---|",
    ]
    for size, r in results:
        copy = f"{r['copy_s']:.1f} s ({size * 1024 / r['copy_s']:.0f} MiB/s)"
        speedup = r["copy_s"] * 1000 / r["reflink_ms"]
        lines.append(f"| {size} GiB | {r['reflink_ms']:.1f} ms ({r['reflink_max_ms']:.1f}) "
                     f"| {r['reflink_used_mib']:.1f} MiB | {copy} | {speedup:.0f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="1,4,10", help="volume sizes in GiB, comma-separated")
    parser.add_argument("--dir", default="/var/tmp", help="where the pool's sparse backing file goes")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/clone.py needs root (loop devices, mkfs, mount)")
    results = run([int(s) for s in args.sizes.split(",")], args.dir)
    text = markdown(results)
    print(text)
    update_section("clone", text)


if __name__ == "__main__":
    main()

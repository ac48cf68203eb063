"""Snapshot/clone time of a volume: reflink clone (hpp_csi.linux.reflink) vs a full data copy, same run, same XFS.

Each volume is a directory holding one disk image filled with real (random, incompressible) data, on an
XFS (reflink=1) loop filesystem over a sparse file. The reflink clone is timed as the driver takes it
(`clone_tree` of the volume directory, median of several); the baseline reads and writes every byte
(what a copy costs where extents cannot be shared), with the source evicted from the page cache first.
Cross-node (`importer.clone`): a sparse volume moved to another "node" over TLS on loopback, our clone
(`hpp-importer clone-source` into `hpp-importer upload-server`: only data blocks travel) against CDI's route
(a plain `tar -cS | curl -T -` into a receiver that untars as CDI's upload server does, every hole written),
in the same run, on the same disk.
Usage: python bench/clone.py [--sizes 1,4,10] [--dir /var/tmp] [--cross 10:20,20:10,10:10] [--only cross|reflink]
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import os
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.certs import make_server_certs
from bench.report import update_section
from hpp_csi.linux import loop, mounts, reflink, xfs

GIB = 1 << 30
CHUNK = 8 << 20
REFLINK_RUNS = 5
EXTENTS = 20  # cross-node: data runs spread evenly over the disk, the rest holes


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


HPP_IMPORTER = str(Path(sys.executable).with_name("hpp-importer"))



# -- cross-node: our clone against CDI's tar route ----------------------------------------------------

def sparse_volume(directory: Path, size: int, percent: int) -> int:
    """disk.img of `size` bytes, `percent` of it random data in EXTENTS runs; returns the data bytes."""
    directory.mkdir()
    per_run = size * percent // 100 // EXTENTS // CHUNK * CHUNK
    block = os.urandom(CHUNK)
    fd = os.open(directory / "disk.img", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, size)
        for run in range(EXTENTS):
            start = run * (size // EXTENTS)
            for offset in range(start, start + per_run, CHUNK):
                os.pwrite(fd, block, offset)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return per_run * EXTENTS


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def ours(source: Path, dest: Path, certs_dir: Path, size: int) -> float:
    """clone-source --path into an upload-server (no token needed there: TLS only, as the test servers)."""
    certs = make_server_certs(certs_dir)
    dest.mkdir()
    log = certs_dir / "server.log"
    with log.open("w") as err:
        server = subprocess.Popen([HPP_IMPORTER, "upload-server", "--listen", "127.0.0.1:0", "--healthz-address",
                                   "127.0.0.1:0", "--dest", str(dest), "--tls-cert", str(certs.cert), "--tls-key",
                                   str(certs.key), "--image-size", str(size + (size // 10)), "--filesystem-overhead",
                                   "0", "--termination-log", str(certs_dir / "termination"), "--no-progress"],
                                  stdout=subprocess.DEVNULL, stderr=err)
    try:
        port = _port(log, server)
        started = time.perf_counter()
        subprocess.run([HPP_IMPORTER, "clone-source", "--path", str(source), "--url", f"https://127.0.0.1:{port}",
                        "--token", "none", "--ca", str(certs.ca), "--no-progress"], check=True,
                       stdout=subprocess.DEVNULL, timeout=3600)
        if server.wait(600) != 0:
            raise RuntimeError(log.read_text())
        return time.perf_counter() - started
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _port(log: Path, server: subprocess.Popen[bytes]) -> int:
    end = time.monotonic() + 30
    while not (found := re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())):
        if server.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"upload-server did not start: {log.read_text()}")
        time.sleep(0.05)
    return int(found.group(1))


class _Chunked:
    """The body of `curl -T -` (chunked), as a file for tarfile."""

    def __init__(self, rfile: object) -> None:
        self._rfile = rfile
        self._left = 0
        self._eof = False

    def read(self, size: int = -1) -> bytes:
        if self._eof:
            return b""
        if self._left == 0:
            line = self._rfile.readline()  # type: ignore[attr-defined]
            self._left = int(line.split(b";")[0], 16)
            if self._left == 0:
                self._eof = True
                return b""
        data: bytes = self._rfile.read(min(size if size > 0 else self._left, self._left))  # type: ignore[attr-defined]
        self._left -= len(data)
        if self._left == 0:
            self._rfile.readline()  # type: ignore[attr-defined]
        return data


class _Untar(http.server.BaseHTTPRequestHandler):
    """CDI's upload server for a filesystem clone: untar, each member written whole (holes expanded), fsync."""

    dest: Path
    protocol_version = "HTTP/1.1"

    def do_PUT(self) -> None:
        with tarfile.open(fileobj=_Chunked(self.rfile), mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                data = tar.extractfile(member)
                if data is None:
                    continue
                with open(self.dest / Path(member.name).name, "wb") as out:
                    shutil.copyfileobj(data, out, CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def cdi_route(source: Path, dest: Path, certs_dir: Path) -> float:
    certs = make_server_certs(certs_dir)
    dest.mkdir()
    handler = type("Untar", (_Untar,), {"dest": dest})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs.cert, certs.key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        started = time.perf_counter()
        subprocess.run(f"tar -cS -C {source} disk.img | curl -sS --fail --cacert {certs.ca} -T - "
                       f"https://127.0.0.1:{server.server_address[1]}/v1beta1/upload", shell=True, check=True,
                       timeout=3600, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started
    finally:
        server.shutdown()
        server.server_close()


def run_cross(cases: list[tuple[int, int]], workdir: str) -> list[dict[str, float]]:
    rows = []
    for gib, percent in cases:
        tmp = Path(tempfile.mkdtemp(prefix="hpp-bench-cross-", dir=workdir))
        try:
            source = tmp / "source"
            data = sparse_volume(source, gib * GIB, percent)
            evict(source / "disk.img")
            ours_s = ours(source, tmp / "ours", _mkdir(tmp / "certs-ours"), gib * GIB)
            ours_alloc = os.stat(tmp / "ours" / "disk.img").st_blocks * 512
            shutil.rmtree(tmp / "ours")
            evict(source / "disk.img")
            cdi_s = cdi_route(source, tmp / "cdi", _mkdir(tmp / "certs-cdi"))
            cdi_alloc = os.stat(tmp / "cdi" / "disk.img").st_blocks * 512
            rows.append({"gib": gib, "percent": percent, "data": data, "ours_s": ours_s, "cdi_s": cdi_s,
                         "ours_alloc": ours_alloc, "cdi_alloc": cdi_alloc})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def cross_markdown(rows: list[dict[str, float]]) -> str:
    lines = [
        "## Moving a volume to another node (`bench/clone.py`, cross-node)",
        "",
        f"Source: `disk.img` of a filesystem volume, random data in {EXTENTS} runs, holes between, evicted from the",
        "page cache before each run. Ours: `hpp-importer clone-source --path` into `hpp-importer upload-server` over",
        "TLS on loopback (only data blocks travel; digest verified; fsync). CDI's route: `tar -cS | curl -T -` into a",
        "TLS receiver that untars as CDI's upload server does (Go's tar reader expands holes; every byte written),",
        "then fsync. Time from the first byte read to the target's answer.",
        "",
        "| disk | data | ours | CDI's route | speed-up | target allocated: ours / CDI |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mib = r["data"] / (1 << 20)
        lines.append(f"| {r['gib']:.0f} GiB | {r['percent']:.0f}% ({mib / 1024:.1f} GiB) "
                     f"| {r['ours_s']:.1f} s ({mib / r['ours_s']:.0f} MiB/s of data) | {r['cdi_s']:.1f} s "
                     f"| {r['cdi_s'] / r['ours_s']:.1f}x "
                     f"| {r['ours_alloc'] / GIB:.1f} / {r['cdi_alloc'] / GIB:.1f} GiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="1,4,10", help="volume sizes in GiB, comma-separated")
    parser.add_argument("--dir", default="/var/tmp", help="where the pool's sparse backing file goes")
    parser.add_argument("--cross", default="10:20,20:10,10:10",
                        help="cross-node runs: GIB:DATA_PERCENT, comma-separated")
    parser.add_argument("--only", choices=("cross", "reflink"), help="run one of the two tables")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/clone.py needs root (loop devices, mkfs, mount)")
    if args.only != "cross":
        results = run([int(s) for s in args.sizes.split(",")], args.dir)
        text = markdown(results)
        print(text)
        update_section("clone", text)
    if args.only != "reflink":
        cases = [(int(g), int(p)) for g, p in (item.split(":") for item in args.cross.split(","))]
        text = cross_markdown(run_cross(cases, args.dir))
        print(text)
        update_section("clone-cross-node", text)


if __name__ == "__main__":
    main()

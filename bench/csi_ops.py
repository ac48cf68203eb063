"""CSI operation latency and throughput of a real `hpp-csi serve`, beside the floor of the same work done
directly (mkdir/rmdir, a forked `mount --bind` as HPP's Go driver does) in the same run.

Writes its figures to docs/benchmarks.md (section "csi_ops"). Run: `make bench` or `python bench/csi_ops.py`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import update_section
from hpp_csi.ctl import mount_capability
from hpp_csi.spec import csi_pb2 as csi
from hpp_csi.spec import csi_pb2_grpc as csi_grpc

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / ".venv" / "bin" / "hpp-csi"
CAP = mount_capability()


class Driver:
    """A driver process on a pool under `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.socket = workdir / "csi.sock"
        self.pool = workdir / "pool"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start and return seconds until the first successful Probe."""
        begin = time.perf_counter()
        self.proc = subprocess.Popen(
            [str(DRIVER), "-v", "0", "serve", "--endpoint", f"unix://{self.socket}", "--nodeid", "bench",
             "--datadir", f'[{{"name":"legacy","path":"{self.pool}"}}]'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        channel = grpc.insecure_channel(f"unix://{self.socket}")
        identity = csi_grpc.IdentityStub(channel)
        while True:
            try:
                if identity.Probe(csi.ProbeRequest(), timeout=1).ready.value:
                    break
            except grpc.RpcError:
                time.sleep(0.005)
            if time.perf_counter() - begin > 60:
                raise RuntimeError("driver did not start within 60 s")
        channel.close()
        return time.perf_counter() - begin

    def rss_mib(self) -> float:
        assert self.proc is not None
        return float(psutil.Process(self.proc.pid).memory_info().rss) / 2**20

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None


def stubs(socket: Path) -> tuple[grpc.Channel, csi_grpc.ControllerStub, csi_grpc.NodeStub]:
    channel = grpc.insecure_channel(f"unix://{socket}")
    return channel, csi_grpc.ControllerStub(channel), csi_grpc.NodeStub(channel)


def run_ops(names: list[str], clients: int, op: Callable[[int, str], None]) -> tuple[list[float], float]:
    """Run `op(client, name)` for every name over `clients` threads; (latencies, ops/s)."""
    latencies: list[float] = []
    lock = threading.Lock()
    shards = [names[i::clients] for i in range(clients)]

    def worker(index: int) -> None:
        local = []
        for name in shards[index]:
            start = time.perf_counter()
            op(index, name)
            local.append(time.perf_counter() - start)
        with lock:
            latencies.extend(local)

    begin = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return latencies, len(names) / (time.perf_counter() - begin)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def row(label: str, latencies: list[float], rate: float) -> str:
    return f"| {label} | {pct(latencies, 0.5):.2f} | {pct(latencies, 0.99):.2f} | {rate:.0f} |"


def bench_driver(workdir: Path, existing: int, count: int, results: list[str], notes: dict[str, float],
                 clients_list: tuple[int, ...] = (1, 8), suffix: str = "") -> None:
    driver = Driver(workdir)
    driver.start()
    channels = [stubs(driver.socket) for _ in range(8)]
    try:
        if existing:
            filler = [f"existing-{i:06d}" for i in range(existing)]
            run_ops(filler, 8, lambda c, n: channels[c][1].CreateVolume(
                csi.CreateVolumeRequest(name=n, volume_capabilities=[CAP]), timeout=30) and None)
            driver.stop()
            notes[f"startup_s_{existing}"] = driver.start()
            channels = [stubs(driver.socket) for _ in range(8)]
        targets = workdir / "targets"
        targets.mkdir(exist_ok=True)
        for clients in clients_list:
            names = [f"bench-{clients}-{i:05d}" for i in range(count)]

            def create(c: int, n: str) -> None:
                channels[c][1].CreateVolume(csi.CreateVolumeRequest(
                    name=n, volume_capabilities=[CAP], capacity_range=csi.CapacityRange(required_bytes=2**20)),
                    timeout=30)

            def publish(c: int, n: str) -> None:
                channels[c][2].NodePublishVolume(csi.NodePublishVolumeRequest(
                    volume_id=n, target_path=str(targets / n), volume_capability=CAP), timeout=30)

            def unpublish(c: int, n: str) -> None:
                channels[c][2].NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(
                    volume_id=n, target_path=str(targets / n)), timeout=30)

            def delete(c: int, n: str) -> None:
                channels[c][1].DeleteVolume(csi.DeleteVolumeRequest(volume_id=n), timeout=30)

            for label, op in (("CreateVolume", create), ("NodePublishVolume", publish),
                              ("NodeUnpublishVolume", unpublish), ("DeleteVolume", delete)):
                latencies, rate = run_ops(names, clients, op)
                results.append(row(f"{label}, {clients} client(s), {existing} existing{suffix}", latencies, rate))
        notes[f"rss_mib_{existing}"] = driver.rss_mib()
    finally:
        for channel, _c, _n in channels:
            channel.close()
        driver.stop()


def bench_baseline(workdir: Path, count: int, results: list[str]) -> None:
    """The same filesystem work without a driver: what any implementation must pay at least."""
    base = workdir / "baseline"
    base.mkdir()
    names = [f"b-{i:05d}" for i in range(count)]
    lat, rate = run_ops(names, 1, lambda c, n: os.mkdir(base / n))
    results.append(row("baseline: mkdir only (no metadata, no RPC)", lat, rate))
    target = workdir / "baseline-target"
    target.mkdir()
    fork_names = names[: max(50, count // 5)]

    def forked(c: int, n: str) -> None:
        subprocess.run(["mount", "--bind", str(base / n), str(target)], check=True)
        subprocess.run(["umount", str(target)], check=True)

    lat, rate = run_ops(fork_names, 1, forked)
    results.append(row("baseline: forked `mount --bind` + `umount` (HPP Go driver's way)", lat, rate))
    lat, rate = run_ops(names, 1, lambda c, n: os.rmdir(base / n))
    results.append(row("baseline: rmdir only", lat, rate))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=500, help="operations per measurement")
    parser.add_argument("--existing", type=int, default=10000, help="volumes present in the second run")
    parser.add_argument("--workdir", type=Path, default=None, help="where the pool lives (default: a temp dir)")
    opts = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="hpp-bench-", dir=opts.workdir))
    results: list[str] = []
    notes: dict[str, float] = {}
    try:
        for name, existing in (("empty", 0), ("full", opts.existing)):
            (workdir / name).mkdir()
            bench_driver(workdir / name, existing, opts.count, results, notes)
        bench_baseline(workdir, opts.count, results)
        # The same driver with its pool on tmpfs, where fsync costs nothing: the driver's own share of the time,
        # the rest above being the disk's journal flushes that make each change durable.
        shm = Path(tempfile.mkdtemp(prefix="hpp-bench-", dir="/dev/shm"))
        try:
            bench_driver(shm, 0, opts.count, results, notes, clients_list=(1,), suffix=" (pool on tmpfs)")
        finally:
            shutil.rmtree(shm, ignore_errors=True)
    finally:
        subprocess.run(["umount", "-R", str(workdir / "baseline-target")], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
    where = tempfile.gettempdir() if opts.workdir is None else str(opts.workdir)
    fs = subprocess.run(["stat", "-f", "-c", "%T", where], capture_output=True, text=True).stdout.strip()
    startup = notes.get(f"startup_s_{opts.existing}", 0)
    table = "\n".join([
        "## CSI operations (`bench/csi_ops.py`)",
        "",
        f"Real `hpp-csi serve` over a unix socket, pool on {fs}; every CreateVolume writes its metadata durably "
        "(temp file, fdatasync, rename, directory fsync): on this disk each of those flushes costs about 0.5-1 ms, "
        "which the tmpfs rows (same driver, flushes free) separate from the driver's own cost. "
        f"{opts.count} operations per row; latency in ms.",
        "",
        "| operation | p50 ms | p99 ms | ops/s |",
        "|---|---:|---:|---:|",
        *results,
        "",
        f"- Start-up to first ready Probe with {opts.existing} volumes: {startup:.3f} s (process start included)",
        f"- Driver RSS after the runs: {notes.get('rss_mib_0', 0):.1f} MiB (0 existing), "
        f"{notes.get(f'rss_mib_{opts.existing}', 0):.1f} MiB ({opts.existing} existing)",
        "- Targets (issue #2, 2 cores): sequential CreateVolume >= 800 ops/s; NodePublishVolume p50 <= 2 ms; "
        "CreateVolume p50 <= 2 ms with 10,000 volumes; RSS <= 80 MiB; start-up with 10,000 volumes < 1 s.",
        "- What the security rules cost (docs/security.md): NodePublishVolume checks that the target is outside "
        "every pool by walking `..` from descriptors (statx for each folder's mount, mountinfo read only when a "
        "folder sits on a pool's filesystem through another mount); a first version that looked at every mount "
        "of the node took p50 from about 1.1 ms to 9 ms with 500 targets published. Start-up reads every record "
        "once so a bad one is reported at start: 0.84-1.10 s over five runs on 2026-12-01 with 10,000 volumes, "
        "0.85 s before.",
    ])
    update_section("csi_ops", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

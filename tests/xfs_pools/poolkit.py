"""A real `hpp-csi serve` over block-backed pools, and the kernel's own view of loop devices and mounts.

What the tests judge (which loop devices back a file, what is mounted where, device sizes) is read from sysfs,
mountinfo and util-linux here, never through the driver's helpers, so a bug there cannot hide itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from hpp_csi import loop, mounts
from hpp_csi.spec import csi_pb2 as csi
from hpp_csi.spec import csi_pb2_grpc as csi_grpc

HPP_CSI = str(Path(sys.executable).with_name("hpp-csi"))
NODE_ID = "node-a"
MiB, GiB = 1 << 20, 1 << 30
POOL_SIZE = 4 * GiB
START_TIMEOUT = 20.0
CALL_TIMEOUT = 30.0

AccessMode = csi.VolumeCapability.AccessMode
SNW = AccessMode.SINGLE_NODE_WRITER


# --- requests ---------------------------------------------------------------------------------------------
def mount_cap(mode: int = SNW) -> csi.VolumeCapability:
    return csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(),
                                access_mode=AccessMode(mode=mode))  # type: ignore[arg-type]


def block_cap(mode: int = SNW) -> csi.VolumeCapability:
    return csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(),
                                access_mode=AccessMode(mode=mode))  # type: ignore[arg-type]


def from_snapshot(snapshot_id: str) -> csi.VolumeContentSource:
    return csi.VolumeContentSource(snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id))


def from_volume(volume_id: str) -> csi.VolumeContentSource:
    return csi.VolumeContentSource(volume=csi.VolumeContentSource.VolumeSource(volume_id=volume_id))


def unique(prefix: str = "pvc") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def rpc_error(code: grpc.StatusCode, match: str | None = None) -> Iterator[pytest.ExceptionInfo[grpc.RpcError]]:
    """Expect the block to fail with exactly `code` (and details matching `match`)."""
    with pytest.raises(grpc.RpcError) as info:
        yield info
    error: Any = info.value
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    if match is not None:
        assert re.search(match, error.details()), f"{error.details()!r} does not match {match!r}"


# --- the kernel's view ------------------------------------------------------------------------------------
def loop_backing_files() -> dict[str, str]:
    """/dev/loopN -> its backing file, as /sys/block/loopN/loop/backing_file shows it."""
    found = {}
    for entry in Path("/sys/block").glob("loop*"):
        with contextlib.suppress(OSError):  # no loop/ folder: nothing attached
            found[f"/dev/{entry.name}"] = (entry / "loop" / "backing_file").read_text().strip()
    return found


def loops_backing(path: str | Path) -> list[str]:
    """Loop devices on `path`, including those whose file was deleted since (a leak all the same)."""
    want = os.path.realpath(path)
    return sorted(d for d, backing in loop_backing_files().items() if backing in (want, f"{want} (deleted)"))


def loops_under(root: str | Path) -> list[str]:
    prefix = os.path.realpath(root) + "/"
    return sorted(d for d, backing in loop_backing_files().items() if backing.startswith(prefix))


@dataclass(frozen=True)
class Mount:
    mount_id: int
    mount_point: str
    fstype: str
    source: str
    super_options: frozenset[str]


def mount_table() -> list[Mount]:
    """/proc/self/mountinfo, parsed here rather than by the driver's parser."""
    table = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        sep = fields.index("-", 6)
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        table.append(Mount(int(fields[0]), point, fields[sep + 1], fields[sep + 2],
                           frozenset(fields[sep + 3].split(","))))
    return table


def mounts_at(path: str | Path) -> list[Mount]:
    return [m for m in mount_table() if m.mount_point == str(path)]


def device_size(path: str | Path) -> int:
    """`blockdev --getsize64`: what a writer of the device sees."""
    return int(run(["blockdev", "--getsize64", str(path)]).stdout)


def run(command: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {proc.returncode}: {proc.stderr}")
    return proc


def write_pattern(path: str | Path, size: int, seed: int = 0) -> bytes:
    """Fill `path` with `size` bytes of non-zero data (real extents, nothing a filesystem can skip)."""
    chunk = bytes((seed + i) % 251 + 1 for i in range(MiB))
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return chunk


def release_root(root: Path) -> None:
    """Undo everything under `root`: mounts deepest first, loop devices on its files; then delete it.

    Rounds, because a pool's filesystem cannot be unmounted while loop devices hold volume images open in it.
    """
    prefix = str(root) + "/"
    for _ in range(20):
        inside = sorted({m.mount_point for m in mount_table() if m.mount_point.startswith(prefix)},
                        key=len, reverse=True)
        devices = loops_under(root)
        if not inside and not devices:
            break
        for point in inside:
            with contextlib.suppress(OSError):
                mounts.umount(point)
        for device in devices:
            with contextlib.suppress(OSError):
                loop.detach(device)
    else:
        for point in sorted({m.mount_point for m in mount_table() if m.mount_point.startswith(prefix)},
                            key=len, reverse=True):
            with contextlib.suppress(OSError):
                mounts.umount(point, lazy=True)
    shutil.rmtree(root, ignore_errors=True)


# --- the driver process -----------------------------------------------------------------------------------
class _Timed:
    """A stub whose every call carries a deadline: a hung driver fails the test instead of blocking the run."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        return lambda request, timeout=CALL_TIMEOUT: method(request, timeout=timeout)


@dataclass
class PoolDriver:
    """One `hpp-csi serve` with pool `legacy` on a sparse loop file (`<root>/pool.img`), in a root of its own."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hppxfs-")))  # short: socket path
    size: str = "4Gi"
    device: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _channel: grpc.Channel | None = None

    @property
    def pools(self) -> list[dict[str, str]]:
        backing = {"device": self.device} if self.device else {"size": self.size}
        return [{"name": "legacy", "path": str(self.root / "pool"), **backing}]

    @property
    def socket(self) -> Path:
        return self.root / "csi.sock"

    @property
    def image(self) -> Path:
        return self.root / "pool.img"

    @property
    def pool_dir(self) -> Path:
        return self.root / "pool" / "csi"

    def volume_path(self, volume_id: str) -> Path:
        return self.pool_dir / volume_id

    def snapshot_path(self, snapshot_id: str) -> Path:
        return self.pool_dir / ".hpp-csi" / "snapshots" / snapshot_id

    def new_target(self, name: str = "blk") -> Path:
        """A target in a folder that does not exist yet: the driver must make it."""
        return self.root / "targets" / uuid.uuid4().hex[:8] / name

    def serve_command(self) -> list[str]:
        return [HPP_CSI, "serve", "--endpoint", f"unix://{self.socket}", "--nodeid", NODE_ID,
                "--datadir", json.dumps(self.pools)]

    def mount_pool(self, *flags: str) -> subprocess.CompletedProcess[str]:
        return run([HPP_CSI, "mount-pool", "--datadir", json.dumps(self.pools), *flags], check=False)

    @property
    def log_path(self) -> Path:
        return self.root / f"driver-{self.starts}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def spawn(self) -> subprocess.Popen[bytes]:
        self.starts += 1
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.serve_command(), stdout=log, stderr=subprocess.STDOUT)
        return self.proc

    def start(self) -> PoolDriver:
        """Start and wait until Probe answers ready."""
        proc = self.spawn()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"hpp-csi exited with {proc.returncode}:\n{self.log()}")
            if self.socket.is_socket():
                with contextlib.suppress(grpc.RpcError):
                    if self.identity.Probe(csi.ProbeRequest(), timeout=2).ready.value:
                        return self
            time.sleep(0.05)
        raise RuntimeError(f"hpp-csi did not become ready in {START_TIMEOUT}s:\n{self.log()}")

    def run_to_exit(self, timeout: float = START_TIMEOUT) -> tuple[int, str]:
        """Start a driver expected to refuse its pools: (exit status, log)."""
        proc = self.spawn()
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"hpp-csi kept running:\n{self.log()}") from None
        return status, self.log()

    def kill(self) -> None:
        """SIGKILL, a crash: mounts, loop devices and the socket stay behind."""
        self.close_channel()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self) -> int:
        self.close_channel()
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def restart(self) -> PoolDriver:
        self.kill()
        return self.start()

    def shutdown(self) -> None:
        """Stop the process, then undo every mount and loop device under the root and delete it."""
        self.close_channel()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        release_root(self.root)

    # --- gRPC ---------------------------------------------------------------------------------------------
    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix://{self.socket}")
        return self._channel

    @property
    def identity(self) -> csi_grpc.IdentityStub:
        return _Timed(csi_grpc.IdentityStub(self.channel))  # type: ignore[return-value]

    @property
    def controller(self) -> csi_grpc.ControllerStub:
        return _Timed(csi_grpc.ControllerStub(self.channel))  # type: ignore[return-value]

    @property
    def node(self) -> csi_grpc.NodeStub:
        return _Timed(csi_grpc.NodeStub(self.channel))  # type: ignore[return-value]

    def create(self, name: str, size: int = 0, block: bool = False,
               source: csi.VolumeContentSource | None = None) -> csi.Volume:
        request = csi.CreateVolumeRequest(
            name=name, capacity_range=csi.CapacityRange(required_bytes=size),
            volume_capabilities=[block_cap() if block else mount_cap()], volume_content_source=source,
        )
        reply: csi.CreateVolumeResponse = self.controller.CreateVolume(request)
        return reply.volume

    def delete(self, volume_id: str) -> None:
        self.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume_id))

    def snapshot(self, name: str, source_volume_id: str) -> csi.Snapshot:
        request = csi.CreateSnapshotRequest(name=name, source_volume_id=source_volume_id)
        reply: csi.CreateSnapshotResponse = self.controller.CreateSnapshot(request)
        return reply.snapshot

    def publish(self, volume_id: str, target: Path, block: bool = True, readonly: bool = False) -> None:
        self.node.NodePublishVolume(csi.NodePublishVolumeRequest(
            volume_id=volume_id, target_path=str(target), readonly=readonly,
            volume_capability=block_cap() if block else mount_cap(),
        ))

    def unpublish(self, volume_id: str, target: Path) -> None:
        self.node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target)))

    def listed_volume_ids(self) -> list[str]:
        reply: csi.ListVolumesResponse = self.controller.ListVolumes(csi.ListVolumesRequest())
        return [e.volume.volume_id for e in reply.entries]

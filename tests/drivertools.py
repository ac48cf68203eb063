"""A real `hpp-csi serve` process on a unix socket, CSI request helpers, and the kernel's own view of mounts and
loop devices; shared by tests/csi and tests/xfs_pools.

What tests judge (what is mounted where, which loop device backs which file) is read here from mountinfo and
sysfs, never through the driver's helpers, so a bug there cannot hide itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import grpc
import pytest

from hpp_csi.spec import csi_pb2 as csi
from hpp_csi.spec import csi_pb2_grpc as csi_grpc

HPP_CSI = str(Path(sys.executable).with_name("hpp-csi"))
NODE_ID = "node-a"
MiB, GiB = 1 << 20, 1 << 30

AccessMode = csi.VolumeCapability.AccessMode
SNW = AccessMode.SINGLE_NODE_WRITER

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_MNT_DETACH = 2


# --- requests ---------------------------------------------------------------------------------------------
def mount_cap(mode: int = SNW, flags: list[str] | None = None, fs_type: str = "") -> csi.VolumeCapability:
    return csi.VolumeCapability(
        mount=csi.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=flags or []),
        access_mode=AccessMode(mode=mode),  # type: ignore[arg-type]
    )


def block_cap(mode: int = SNW) -> csi.VolumeCapability:
    return csi.VolumeCapability(
        block=csi.VolumeCapability.BlockVolume(), access_mode=AccessMode(mode=mode)  # type: ignore[arg-type]
    )


def from_snapshot(snapshot_id: str) -> csi.VolumeContentSource:
    return csi.VolumeContentSource(snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id))


def from_volume(volume_id: str) -> csi.VolumeContentSource:
    return csi.VolumeContentSource(volume=csi.VolumeContentSource.VolumeSource(volume_id=volume_id))


def unique(prefix: str = "vol") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_request(name: str, size: int = 0, limit: int = 0, pool: str | None = None,
                   caps: list[csi.VolumeCapability] | None = None, **kwargs: Any) -> csi.CreateVolumeRequest:
    return csi.CreateVolumeRequest(
        name=name,
        capacity_range=csi.CapacityRange(required_bytes=size, limit_bytes=limit),
        volume_capabilities=caps if caps is not None else [mount_cap()],
        parameters={"storagePool": pool} if pool else {},
        **kwargs,
    )


@contextlib.contextmanager
def rpc_error(code: grpc.StatusCode, match: str | None = None) -> Iterator[pytest.ExceptionInfo[grpc.RpcError]]:
    """Expect the block to fail with exactly `code` (and a details text matching `match`)."""
    with pytest.raises(grpc.RpcError) as info:
        yield info
    error: Any = info.value
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    if match is not None:
        assert re.search(match, error.details()), f"{error.details()!r} does not match {match!r}"


# --- mounts -----------------------------------------------------------------------------------------------
def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


@dataclass(frozen=True)
class Mount:
    mount_id: int
    root: str
    mount_point: str
    options: frozenset[str]  # per mount (ro, noexec, ...)
    fstype: str
    source: str
    super_options: frozenset[str]  # per filesystem (prjquota, ...)


def mount_table() -> list[Mount]:
    """/proc/self/mountinfo, parsed independently of the driver's own parser."""
    table = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        sep = fields.index("-", 6)
        table.append(Mount(int(fields[0]), _unescape(fields[3]), _unescape(fields[4]),
                           frozenset(fields[5].split(",")), fields[sep + 1], _unescape(fields[sep + 2]),
                           frozenset(fields[sep + 3].split(","))))
    return table


def mounts_at(path: str | Path) -> list[Mount]:
    return [m for m in mount_table() if m.mount_point == str(path)]


def is_mounted(path: str | Path) -> bool:
    return bool(mounts_at(path))


def mount_points_under(root: str | Path) -> list[str]:
    """Mount points at or below `root`, deepest first, each once."""
    top = os.path.realpath(root)
    inside = {m.mount_point for m in mount_table() if m.mount_point == top or m.mount_point.startswith(top + "/")}
    return sorted(inside, key=len, reverse=True)


def mount(args: list[str]) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def umount(path: str | Path, lazy: bool = False) -> None:
    if _libc.umount2(os.fsencode(str(path)), _MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {path}: {os.strerror(err)}")


def unmount_under(root: str | Path) -> None:
    """Detach every mount at or below `root`, deepest first, stacked ones included."""
    for _ in range(100):
        inside = mount_points_under(root)
        if not inside:
            return
        for point in inside:
            with contextlib.suppress(OSError):
                umount(point, lazy=True)
    raise RuntimeError(f"mounts under {root} would not go away")


# --- loop devices -----------------------------------------------------------------------------------------
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
    """Loop devices whose backing file lies under `root`, deleted or not."""
    prefix = os.path.realpath(root) + "/"
    return sorted(d for d, backing in loop_backing_files().items() if backing.startswith(prefix))


# --- records on disk --------------------------------------------------------------------------------------
RECORD_XATTR = "trusted.hpp-csi.record"


def volume_record(pool: Path, volume_id: str) -> dict[str, Any]:
    """A volume's record as an operator reads it: the attribute of an empty record file, or (records written
    before that layout, or too large for an attribute) the file's content."""
    path = pool / ".hpp-csi" / "volumes" / f"{volume_id}.json"
    content = path.read_bytes()
    record: dict[str, Any] = json.loads(content or os.getxattr(path, RECORD_XATTR))
    return record


def snapshot_record(pool: Path, snapshot_id: str) -> dict[str, Any]:
    """A snapshot's record as an operator reads it: the attribute of an empty record.json, or its content."""
    path = pool / ".hpp-csi" / "snapshots-v2" / snapshot_id / "record.json"
    record: dict[str, Any] = json.loads(path.read_bytes() or os.getxattr(path, RECORD_XATTR))
    return record


# --- roots ------------------------------------------------------------------------------------------------
def make_root(prefix: str = "hppcsi-") -> Path:
    # Short and outside pytest's retained basetemp: the socket path must stay under 108 bytes.
    return Path(tempfile.mkdtemp(prefix=prefix))


def remove_root(root: Path) -> None:
    """Undo everything under `root`: mounts deepest first, loop devices on its files; then delete it.

    Rounds, because a pool's filesystem cannot be unmounted while loop devices hold volume images open in it.
    """
    for _ in range(20):
        inside, devices = mount_points_under(root), loops_under(root)
        if not inside and not devices:
            break
        for point in inside:
            with contextlib.suppress(OSError):
                umount(point)
        for device in devices:
            subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
    unmount_under(root)  # whatever is still busy goes lazily
    for folder, dirs, _files in os.walk(root):  # tests take permissions away; rmtree needs them back
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755)
    shutil.rmtree(root, ignore_errors=True)


# --- the driver process -----------------------------------------------------------------------------------
class _Timed:
    """Wraps a stub so every call carries a deadline: a hung driver fails the test instead of blocking it."""

    def __init__(self, stub: Any, timeout: float) -> None:
        self._stub = stub
        self._timeout = timeout

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        def call(request: Any, timeout: float = self._timeout, **kwargs: Any) -> Any:
            return method(request, timeout=timeout, **kwargs)

        return call


@dataclass
class Driver:
    """One `hpp-csi serve` process and gRPC stubs on its socket; `start()` again after `kill()` to restart.

    Pools come from `pools` (passed as --datadir) or from the HPP CR file `config` (--config).
    """

    root: Path = field(default_factory=make_root)
    pools: list[dict[str, Any]] | None = None
    config: Path | None = None
    node_id: str = NODE_ID
    extra: list[str] = field(default_factory=list)
    global_args: list[str] = field(default_factory=list)
    start_timeout: float = 15.0
    call_timeout: float = 20.0
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _channel: grpc.Channel | None = None

    def __post_init__(self) -> None:
        if self.pools is None and self.config is None:
            self.pools = [{"name": "legacy", "path": str(self.root / "pool")}]
        self.socket = self.root / "csi.sock"  # a test may point it at another driver's socket

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    @property
    def targets(self) -> Path:
        return self.root / "targets"

    def datadir(self) -> list[dict[str, Any]] | None:
        """The pools as --datadir gets them; None when they come from `config`."""
        return self.pools

    def pool_path(self, name: str = "legacy") -> Path:
        pools = self.datadir()
        assert pools is not None
        return Path(next(p["path"] for p in pools if p["name"] == name))

    def volume_path(self, volume_id: str, pool: str = "legacy") -> Path:
        return self.pool_path(pool) / volume_id

    def new_target(self) -> Path:
        """A fresh parent folder, as csi-sanity makes; the driver must create `target` in it."""
        parent = self.targets / uuid.uuid4().hex[:8]
        parent.mkdir(parents=True)
        return parent / "target"

    @property
    def log_path(self) -> Path:
        return self.root / f"driver-{self.starts}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def command(self) -> list[str]:
        pools = self.datadir()
        source = ["--config", str(self.config)] if pools is None else ["--datadir", json.dumps(pools)]
        return [HPP_CSI, *self.global_args, "serve", "--endpoint", self.endpoint, "--nodeid", self.node_id,
                *source, *self.extra]

    # --- the process --------------------------------------------------------------------------------------
    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it."""
        self.starts += 1
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        return self.proc

    def start(self) -> Self:
        """Start and wait until the socket answers a Probe with ready=true."""
        proc = self.spawn()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"hpp-csi exited with {proc.returncode}:\n{self.log()}")
            if self.socket.is_socket():
                with contextlib.suppress(grpc.RpcError):
                    if self.identity.Probe(csi.ProbeRequest(), timeout=2).ready.value:
                        return self
            time.sleep(0.05)
        raise RuntimeError(f"hpp-csi did not become ready in {self.start_timeout}s:\n{self.log()}")

    def run_to_exit(self) -> tuple[int, str]:
        """Start a driver expected to refuse its configuration: (exit status, log)."""
        proc = self.spawn()
        try:
            status = proc.wait(self.start_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"hpp-csi kept running:\n{self.log()}") from None
        return status, self.log()

    def kill(self) -> None:
        """SIGKILL, a crash: mounts, loop devices and the socket file stay behind."""
        self.close_channel()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        self.close_channel()
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def restart(self) -> Self:
        self.kill()
        return self.start()

    def shutdown(self) -> None:
        """Stop the process (SIGKILL if SIGTERM is not enough), then undo and delete everything under root."""
        self.close_channel()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        remove_root(self.root)

    # --- gRPC ---------------------------------------------------------------------------------------------
    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.endpoint)
        return self._channel

    @property
    def identity(self) -> csi_grpc.IdentityStub:
        return _Timed(csi_grpc.IdentityStub(self.channel), self.call_timeout)  # type: ignore[return-value]

    @property
    def controller(self) -> csi_grpc.ControllerStub:
        return _Timed(csi_grpc.ControllerStub(self.channel), self.call_timeout)  # type: ignore[return-value]

    @property
    def node(self) -> csi_grpc.NodeStub:
        return _Timed(csi_grpc.NodeStub(self.channel), self.call_timeout)  # type: ignore[return-value]

    # --- shortcuts ----------------------------------------------------------------------------------------
    def create(self, name: str, size: int = 0, pool: str | None = None, block: bool = False,
               source: csi.VolumeContentSource | None = None, **kwargs: Any) -> csi.Volume:
        request = create_request(name, size, pool=pool, caps=[block_cap() if block else mount_cap()],
                                 volume_content_source=source, **kwargs)
        reply: csi.CreateVolumeResponse = self.controller.CreateVolume(request)
        return reply.volume

    def delete(self, volume_id: str) -> None:
        self.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume_id))

    def snapshot(self, name: str, source_volume_id: str) -> csi.Snapshot:
        request = csi.CreateSnapshotRequest(name=name, source_volume_id=source_volume_id)
        reply: csi.CreateSnapshotResponse = self.controller.CreateSnapshot(request)
        return reply.snapshot

    def publish(self, volume_id: str, target: str | Path, readonly: bool = False,
                cap: csi.VolumeCapability | None = None, context: dict[str, str] | None = None) -> None:
        self.node.NodePublishVolume(csi.NodePublishVolumeRequest(
            volume_id=volume_id, target_path=str(target), readonly=readonly,
            volume_capability=cap if cap is not None else mount_cap(), volume_context=context or {},
        ))

    def unpublish(self, volume_id: str, target: str | Path) -> None:
        self.node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target)))

    def list_all(self) -> list[csi.ListVolumesResponse.Entry]:
        reply: csi.ListVolumesResponse = self.controller.ListVolumes(csi.ListVolumesRequest())
        assert reply.next_token == ""
        return list(reply.entries)

    def listed_ids(self) -> list[str]:
        return [e.volume.volume_id for e in self.list_all()]

    def stats(self, volume_id: str, path: str | Path) -> csi.NodeGetVolumeStatsResponse:
        reply: csi.NodeGetVolumeStatsResponse = self.node.NodeGetVolumeStats(
            csi.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(path))
        )
        return reply


D = TypeVar("D", bound=Driver)


@contextlib.contextmanager
def running(proc: D) -> Iterator[D]:
    """`proc` started; stopped and its root undone afterwards, also when it fails to start."""
    try:
        yield proc.start()
    finally:
        proc.shutdown()


@contextlib.contextmanager
def drivers(kind: Callable[..., D]) -> Iterator[Callable[..., D]]:
    """A maker of drivers with a root each (not started); all are stopped and undone afterwards."""
    made: list[D] = []

    def make(**kwargs: Any) -> D:
        made.append(kind(**kwargs))
        return made[-1]

    try:
        yield make
    finally:
        for proc in made:
            proc.shutdown()

"""A real `hpp-csi serve` process on a real unix socket, and the small helpers the CSI tests share."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import shutil
import signal
import socket
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

from hpp_csi.spec import csi_pb2 as csi
from hpp_csi.spec import csi_pb2_grpc as csi_grpc

REPO = Path(__file__).resolve().parents[2]
HPP_CSI = str(Path(sys.executable).with_name("hpp-csi"))
DRIVER_NAME = "kubevirt.io.hostpath-provisioner"
TOPOLOGY_KEY = "topology.hostpath.csi/node"
NODE_ID = "node-a"
MiB = 1 << 20
FAST_POOL_SIZE = 64 * MiB  # the tmpfs pool `fast` of the shared driver
START_TIMEOUT = 15.0
CALL_TIMEOUT = 20.0

AccessMode = csi.VolumeCapability.AccessMode
SNW = AccessMode.SINGLE_NODE_WRITER

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_MNT_DETACH = 2


# --- capabilities and names -------------------------------------------------------------------------------
def mount_cap(mode: int = SNW, flags: list[str] | None = None, fs_type: str = "") -> csi.VolumeCapability:
    return csi.VolumeCapability(
        mount=csi.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=flags or []),
        access_mode=AccessMode(mode=mode),  # type: ignore[arg-type]
    )


def block_cap(mode: int = SNW) -> csi.VolumeCapability:
    return csi.VolumeCapability(
        block=csi.VolumeCapability.BlockVolume(), access_mode=AccessMode(mode=mode)  # type: ignore[arg-type]
    )


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
def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class Mount:
    root: str
    mount_point: str
    options: frozenset[str]
    fstype: str


def mounts() -> list[Mount]:
    """/proc/self/mountinfo, parsed independently of the driver's own parser."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        sep = fields.index("-", 6)
        found.append(Mount(_unescape(fields[3]), _unescape(fields[4]), frozenset(fields[5].split(",")),
                           fields[sep + 1]))
    return found


def mounts_at(path: str | Path) -> list[Mount]:
    return [m for m in mounts() if m.mount_point == str(path)]


def is_mounted(path: str | Path) -> bool:
    return bool(mounts_at(path))


def unmount_under(root: str | Path) -> None:
    """Detach every mount at or below `root`, deepest first, stacked ones included."""
    prefix = str(root).rstrip("/") + "/"
    for _ in range(100):
        inside = [m.mount_point for m in mounts() if m.mount_point == str(root) or m.mount_point.startswith(prefix)]
        if not inside:
            return
        for point in sorted(inside, key=len, reverse=True):
            _libc.umount2(os.fsencode(point), _MNT_DETACH)
    raise RuntimeError(f"mounts under {root} would not go away")


def loops_under(root: str | Path) -> list[str]:
    """Loop devices whose backing file lies under `root` (the driver attaches them for block volumes)."""
    prefix = str(root).rstrip("/") + "/"
    found = []
    for device in Path("/sys/block").glob("loop*"):
        try:
            backing = (device / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing.removesuffix(" (deleted)").startswith(prefix):
            found.append(f"/dev/{device.name}")
    return found


def detach_loops_under(root: str | Path) -> None:
    for device in loops_under(root):
        subprocess.run(["losetup", "-d", device], capture_output=True)


def umount(path: str | Path) -> None:
    if _libc.umount2(os.fsencode(str(path)), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {path}: {os.strerror(err)}")


def mount(args: list[str]) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


# --- the driver process -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_root() -> Path:
    # Short and outside pytest's retained basetemp: the socket path must stay under 108 bytes.
    return Path(tempfile.mkdtemp(prefix="hppcsi-"))


def remove_root(root: Path) -> None:
    unmount_under(root)
    detach_loops_under(root)
    for folder, dirs, _files in os.walk(root):
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755)
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class Driver:
    """One `hpp-csi serve` process and gRPC stubs on its socket; `start()` again after `kill()` to restart."""

    root: Path
    pools: list[dict[str, Any]] | None = None
    config: Path | None = None
    node_id: str = NODE_ID
    extra: list[str] = field(default_factory=list)
    global_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    _channel: grpc.Channel | None = None
    _starts: int = 0

    def __post_init__(self) -> None:
        if self.pools is None and self.config is None:
            self.pools = [{"name": "legacy", "path": str(self.root / "pool")}]
        self.socket = self.root / "csi.sock"
        self.targets = self.root / "targets"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def pool_path(self, name: str = "legacy") -> Path:
        assert self.pools is not None
        return Path(next(p["path"] for p in self.pools if p["name"] == name))

    def volume_path(self, volume_id: str, pool: str = "legacy") -> Path:
        return self.pool_path(pool) / volume_id

    @property
    def log_path(self) -> Path:
        return self.root / f"driver-{self._starts}.log"

    def command(self) -> list[str]:
        source = ["--datadir", json.dumps(self.pools)] if self.config is None else ["--config", str(self.config)]
        return [HPP_CSI, *self.global_args, "serve", "--endpoint", self.endpoint, "--nodeid", self.node_id,
                *source, *self.extra]

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it."""
        self._starts += 1
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        return self.proc

    def start(self) -> Driver:
        """Start and wait until the socket answers a Probe with ready=true."""
        proc = self.spawn()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"hpp-csi exited with {proc.returncode}:\n{self.log()}")
            if self.socket.is_socket():
                try:
                    if self.identity.Probe(csi.ProbeRequest(), timeout=2).ready.value:
                        return self
                except grpc.RpcError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"hpp-csi did not become ready in {START_TIMEOUT}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

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
        return _Timed(csi_grpc.IdentityStub(self.channel))  # type: ignore[return-value]

    @property
    def controller(self) -> csi_grpc.ControllerStub:
        return _Timed(csi_grpc.ControllerStub(self.channel))  # type: ignore[return-value]

    @property
    def node(self) -> csi_grpc.NodeStub:
        return _Timed(csi_grpc.NodeStub(self.channel))  # type: ignore[return-value]

    def kill(self) -> None:
        """SIGKILL: a crash. The socket file stays behind."""
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

    def restart(self) -> Driver:
        self.kill()
        return self.start()

    # --- shortcuts -------------------------------------------------------------------------------------
    def create(self, name: str, size: int = 0, pool: str | None = None, **kwargs: Any) -> csi.Volume:
        reply: csi.CreateVolumeResponse = self.controller.CreateVolume(create_request(name, size, pool=pool, **kwargs))
        return reply.volume

    def delete(self, volume_id: str) -> None:
        self.controller.DeleteVolume(csi.DeleteVolumeRequest(volume_id=volume_id))

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

    def new_target(self) -> Path:
        """A fresh parent folder, as csi-sanity makes; the driver must create `target` in it."""
        parent = self.targets / uuid.uuid4().hex[:8]
        parent.mkdir(parents=True)
        return parent / "target"

    def shutdown(self) -> None:
        """Stop the process (SIGKILL if SIGTERM is not enough), unmount, delete everything under root."""
        self.close_channel()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        remove_root(self.root)


class _Timed:
    """Wraps a stub so every call carries a deadline: a hung driver fails the test instead of blocking it."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        def call(request: Any, timeout: float = CALL_TIMEOUT, **kwargs: Any) -> Any:
            return method(request, timeout=timeout, **kwargs)

        return call


def usage_of(reply: csi.NodeGetVolumeStatsResponse, unit: int) -> csi.VolumeUsage:
    return next(u for u in reply.usage if u.unit == unit)

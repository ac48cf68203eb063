"""Crash consistency: a seeded random mix of CSI calls from a few client threads against a real driver on a
loop-backed XFS pool, the driver SIGKILLed at random moments and restarted, every failed call retried until it
succeeds. After every restart the kernel's and the pool's state must match what the clients were told.

Short by default (part of `make test`); `make soak` runs it long: HPP_SOAK_KILLS (default 20), HPP_SOAK_SEED
(default 9), HPP_SOAK_CLIENTS (default 3). The operations each client picks follow from the seed; the exact
interleaving with the kills does not (threads), so a failure prints the seed and the operation it was in.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from drivertools import (
    MiB,
    block_cap,
    create_request,
    from_snapshot,
    from_volume,
    loop_backing_files,
    loops_under,
    mount_cap,
    mount_points_under,
    running,
)
from xfs_pools.poolkit import PoolDriver

from hpp_csi.spec import csi_pb2 as csi
from hpp_csi.spec import csi_pb2_grpc as csi_grpc

KILLS = int(os.environ.get("HPP_SOAK_KILLS", "20"))
SEED = int(os.environ.get("HPP_SOAK_SEED", "9"))
CLIENTS = int(os.environ.get("HPP_SOAK_CLIENTS", "3"))
MAX_VOLUMES = 6  # per client: keeps the pool and the checks small
MAX_SNAPSHOTS = 3
TAG = 4096  # bytes of fsynced data each new volume gets
FILLER = 300  # small files beside it in a filesystem volume
# A call cut off by the kill: the connection drops under it, or the socket is not there yet.
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}

if os.geteuid() != 0:  # loop devices, XFS and bind mounts need root
    pytest.fail("the crash test needs root (loop devices, bind mounts)", pytrace=False)


@dataclass
class Vol:
    mode: str  # "mount" or "block"
    required: int  # what CreateVolume asked for
    capacity: int  # what the driver last said
    content: bytes  # fsynced at creation, or inherited from the source
    source: csi.VolumeContentSource | None = None
    target: Path | None = None  # published here


@dataclass
class Snap:
    source: str
    mode: str
    capacity: int
    content: bytes
    answer: csi.Snapshot | None = None


@dataclass
class Figures:
    calls: int = 0
    retries: int = 0
    repeats: int = 0
    ops: dict[str, int] = field(default_factory=dict)


class Harness:
    """The driver, the current channel, and the gate clients wait at while the driver is down."""

    def __init__(self, driver: PoolDriver) -> None:
        self.driver = driver
        self.cond = threading.Condition()
        self.up = False
        self.parked = 0
        self.done = 0
        self.errors: list[str] = []
        self.channel: grpc.Channel | None = None
        self.stubs: tuple[Any, Any] | None = None  # controller, node
        self.stop = False

    def open(self) -> None:
        """Start the driver and a channel for the clients. Channels are only closed when no client uses
        them: closing one under a thread that is making a stub on it crashes grpc."""
        self.driver.start()
        self.driver.close_channel()  # the kit's own channel is for start-up probes only
        with self.cond:
            self.channel = grpc.insecure_channel(self.driver.endpoint)
            self.stubs = csi_grpc.ControllerStub(self.channel), csi_grpc.NodeStub(self.channel)

    def resume(self) -> None:
        with self.cond:
            self.up = True
            self.cond.notify_all()

    def kill(self) -> None:
        """SIGKILL: calls in flight fail as the connection drops; clients then park at the gate."""
        with self.cond:
            self.up = False
        self.driver.kill()

    def close(self) -> None:
        """Drop the channel once every client is parked or done."""
        with self.cond:
            if self.channel is not None:
                self.channel.close()
            self.channel, self.stubs = None, None

    def wait_quiet(self, clients: int, timeout: float = 60) -> None:
        """Until every client is parked at the gate or finished: nothing is in flight."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.parked + self.done < clients:
                left = deadline - time.monotonic()
                assert left > 0, f"clients did not park: {self.parked} parked, {self.done} done of {clients}"
                self.cond.wait(left)

    def gate(self) -> tuple[Any, Any]:
        """The stubs to call with, after waiting while the driver is down."""
        with self.cond:
            if not self.up:
                self.parked += 1
                self.cond.notify_all()
                while not self.up:
                    self.cond.wait()
                self.parked -= 1
            if self.stubs is None:
                raise RuntimeError("the test is stopping")
            return self.stubs


class Client:
    """One thread of CSI calls over volumes and snapshots it alone owns (so its model is exact)."""

    def __init__(self, harness: Harness, number: int, seed: int) -> None:
        self.h = harness
        self.n = number
        self.rng = random.Random(seed * 1000 + number)
        self.volumes: dict[str, Vol] = {}
        self.snapshots: dict[str, Snap] = {}
        self.pending: tuple[Any, ...] | None = None  # the operation whose outcome is unknown at a kill
        self.counter = 0
        self.fig = Figures()

    # --- calls --------------------------------------------------------------------------------------------
    def call(self, kind: str, method: str, request: Any) -> Any:
        """Send until the driver answers; a transport failure (the kill) parks at the gate, then retries."""
        attempts = 0
        while True:
            controller, node = self.h.gate()
            stub = node if kind == "node" else controller
            self.fig.calls += 1
            try:
                return getattr(stub, method)(request, timeout=30)
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                if code not in TRANSIENT and not (code == grpc.StatusCode.DEADLINE_EXCEEDED and not self.h.up):
                    raise AssertionError(f"client {self.n}: {method} failed with {code.name}: "
                                         f"{exc.details()} (request: {request})") from exc  # type: ignore[attr-defined]
                attempts += 1
                self.fig.retries += 1
                assert attempts < 200, f"client {self.n}: {method} never succeeded"
                time.sleep(0.02)

    def name(self, kind: str) -> str:
        self.counter += 1
        return f"c{self.n}-{kind}{self.counter}"

    # --- operations -------------------------------------------------------------------------------------
    def op_create(self) -> bool:
        block = self.rng.random() < 0.4
        name, size = self.name("b" if block else "v"), self.rng.choice([16, 24, 32]) * MiB
        content = self.rng.randbytes(TAG)
        self.pending = ("create", name)
        reply = self.call("controller", "CreateVolume", create_request(
            name, size, caps=[block_cap() if block else mount_cap()]))
        vol = Vol("block" if block else "mount", size, size, content)
        self.check_answer(name, vol, reply.volume)
        write_tag(self.h.driver.volume_path(name), vol.mode, content)
        self.volumes[name] = vol
        return True

    def op_clone(self) -> bool:
        if self.snapshots and self.rng.random() < 0.6:
            snap_id = self.rng.choice(sorted(self.snapshots))
            snap = self.snapshots[snap_id]
            source, mode, size, content = from_snapshot(snap_id), snap.mode, snap.capacity, snap.content
        elif self.volumes:
            vol_id = self.rng.choice(sorted(self.volumes))
            origin = self.volumes[vol_id]
            source, mode, size, content = from_volume(vol_id), origin.mode, origin.capacity, origin.content
        else:
            return False
        name = self.name("k")
        self.pending = ("create", name)
        caps = [block_cap() if mode == "block" else mount_cap()]
        reply = self.call("controller", "CreateVolume",
                          create_request(name, size, caps=caps, volume_content_source=source))
        vol = Vol(mode, size, size, content, source)
        self.check_answer(name, vol, reply.volume)
        self.volumes[name] = vol
        return True

    def op_delete(self) -> bool:
        idle = sorted(n for n, v in self.volumes.items() if v.target is None)
        if not idle:
            return False
        name = self.rng.choice(idle)
        self.pending = ("delete", name)
        self.call("controller", "DeleteVolume", csi.DeleteVolumeRequest(volume_id=name))
        del self.volumes[name]
        return True

    def op_snapshot(self) -> bool:
        if not self.volumes or len(self.snapshots) >= MAX_SNAPSHOTS:
            return False
        source = self.rng.choice(sorted(self.volumes))
        vol, name = self.volumes[source], self.name("s")
        self.pending = ("snapshot", name)
        reply = self.call("controller", "CreateSnapshot", csi.CreateSnapshotRequest(name=name, source_volume_id=source))
        snap = Snap(source, vol.mode, vol.capacity, vol.content, reply.snapshot)
        assert reply.snapshot.snapshot_id == name and reply.snapshot.source_volume_id == source, reply
        assert reply.snapshot.size_bytes == vol.capacity and reply.snapshot.ready_to_use, reply
        self.snapshots[name] = snap
        return True

    def op_delete_snapshot(self) -> bool:
        if not self.snapshots:
            return False
        name = self.rng.choice(sorted(self.snapshots))
        self.pending = ("delsnap", name)
        self.call("controller", "DeleteSnapshot", csi.DeleteSnapshotRequest(snapshot_id=name))
        del self.snapshots[name]
        return True

    def op_publish(self) -> bool:
        idle = sorted(n for n, v in self.volumes.items() if v.target is None)
        if not idle:
            return False
        name = self.rng.choice(idle)
        vol, target = self.volumes[name], self.h.driver.new_target(f"t-{name}")
        self.pending = ("publish", name, target)
        self.call("node", "NodePublishVolume", csi.NodePublishVolumeRequest(
            volume_id=name, target_path=str(target),
            volume_capability=block_cap() if vol.mode == "block" else mount_cap()))
        vol.target = target
        return True

    def op_unpublish(self) -> bool:
        busy = sorted(n for n, v in self.volumes.items() if v.target is not None)
        if not busy:
            return False
        name = self.rng.choice(busy)
        vol = self.volumes[name]
        self.pending = ("unpublish", name, vol.target)
        self.call("node", "NodeUnpublishVolume",
                  csi.NodeUnpublishVolumeRequest(volume_id=name, target_path=str(vol.target)))
        vol.target = None
        return True

    def op_expand(self) -> bool:
        if not self.volumes:
            return False
        name = self.rng.choice(sorted(self.volumes))
        vol = self.volumes[name]
        wanted = vol.capacity + 8 * MiB
        self.pending = ("expand", name, vol.capacity, wanted)
        reply = self.call("controller", "ControllerExpandVolume", csi.ControllerExpandVolumeRequest(
            volume_id=name, capacity_range=csi.CapacityRange(required_bytes=wanted)))
        assert reply.capacity_bytes >= wanted, f"{name}: expanded to {reply.capacity_bytes}, asked {wanted}"
        vol.capacity = reply.capacity_bytes
        return True

    def op_repeat(self) -> bool:
        """The same CreateVolume again, as a provisioner retries: the same answer."""
        # A repeat names its source again, so only volumes whose source still exists.
        alive = sorted(n for n, v in self.volumes.items() if v.source is None
                       or v.source.snapshot.snapshot_id in self.snapshots or v.source.volume.volume_id in self.volumes)
        if not alive:
            return False
        name = self.rng.choice(alive)
        vol = self.volumes[name]
        self.pending = ("repeat", name)
        caps = [block_cap() if vol.mode == "block" else mount_cap()]
        reply = self.call("controller", "CreateVolume",
                          create_request(name, vol.required, caps=caps, volume_content_source=vol.source))
        self.check_answer(name, vol, reply.volume)
        self.fig.repeats += 1
        return True

    def op_repeat_snapshot(self) -> bool:
        """The same CreateSnapshot again: the same snapshot, down to its creation time."""
        alive = sorted(n for n, snap in self.snapshots.items() if snap.source in self.volumes)
        if not alive:
            return False
        name = self.rng.choice(alive)
        snap = self.snapshots[name]
        self.pending = ("repeat", name)
        reply = self.call("controller", "CreateSnapshot",
                          csi.CreateSnapshotRequest(name=name, source_volume_id=snap.source))
        assert reply.snapshot == snap.answer, f"{name}: {reply.snapshot} was {snap.answer}"
        self.fig.repeats += 1
        return True

    def op_list(self) -> bool:
        self.pending = ("list",)
        reply = self.call("controller", "ListVolumes", csi.ListVolumesRequest())
        listed = {e.volume.volume_id for e in reply.entries}
        # Only this client's own volumes are stable while the others run.
        missing = set(self.volumes) - listed
        assert not missing, f"client {self.n}: ListVolumes lacks {sorted(missing)}"
        return True

    @staticmethod
    def check_answer(name: str, vol: Vol, answer: csi.Volume) -> None:
        assert answer.volume_id == name, answer
        assert answer.capacity_bytes == vol.capacity, f"{name}: capacity {answer.capacity_bytes}, was {vol.capacity}"
        if vol.source is None:
            assert not answer.HasField("content_source"), answer
        else:
            assert answer.content_source == vol.source, answer

    def step(self) -> None:
        ops: list[tuple[Callable[[], bool], float]] = [
            (self.op_create, 3 if len(self.volumes) < MAX_VOLUMES else 0),
            (self.op_clone, 1.5 if len(self.volumes) < MAX_VOLUMES else 0),
            (self.op_delete, 2 if len(self.volumes) > 2 else 0.5),
            (self.op_snapshot, 1.5), (self.op_delete_snapshot, 1), (self.op_publish, 2), (self.op_unpublish, 2),
            (self.op_expand, 1), (self.op_repeat, 1), (self.op_repeat_snapshot, 0.5), (self.op_list, 1),
        ]
        op = self.rng.choices([o for o, _ in ops], weights=[w for _, w in ops])[0]
        if op():
            name = op.__name__.removeprefix("op_")
            self.fig.ops[name] = self.fig.ops.get(name, 0) + 1
        self.pending = None

    def run(self) -> None:
        try:
            while not self.h.stop:
                self.step()
            self.drain()
        except BaseException as exc:
            with self.h.cond:
                self.h.errors.append(str(exc) if isinstance(exc, AssertionError) else f"client {self.n}: {exc!r}")
        finally:
            with self.h.cond:
                self.h.done += 1
                self.h.cond.notify_all()

    def drain(self) -> None:
        """Unpublish and delete everything this client made."""
        for name in sorted(self.volumes):
            if self.volumes[name].target is not None:
                self.pending = ("unpublish", name, self.volumes[name].target)
                self.op_unpublish_named(name)
        for name in sorted(self.snapshots):
            self.pending = ("delsnap", name)
            self.call("controller", "DeleteSnapshot", csi.DeleteSnapshotRequest(snapshot_id=name))
        self.snapshots.clear()
        for name in sorted(self.volumes):
            self.pending = ("delete", name)
            self.call("controller", "DeleteVolume", csi.DeleteVolumeRequest(volume_id=name))
        self.volumes.clear()
        self.pending = None

    def op_unpublish_named(self, name: str) -> None:
        vol = self.volumes[name]
        self.call("node", "NodeUnpublishVolume",
                  csi.NodeUnpublishVolumeRequest(volume_id=name, target_path=str(vol.target)))
        vol.target = None


# --- data -------------------------------------------------------------------------------------------------
def write_tag(path: Path, mode: str, content: bytes) -> None:
    """What a tenant writes and fsyncs: a file in a filesystem volume, the first bytes of a block image."""
    if mode == "mount":
        # Many small files: copies and deletions take long enough for kills to land inside them.
        filler = path / "filler"
        filler.mkdir()
        for n in range(FILLER):
            (filler / str(n)).write_bytes(content[n % TAG:][:64])
        fd = os.open(path / "tag", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    else:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        assert os.pwrite(fd, content, 0) == len(content)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_tag(path: Path, mode: str) -> bytes:
    fd = os.open(path / "tag" if mode == "mount" else path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return os.pread(fd, TAG, 0)
    finally:
        os.close(fd)


# --- invariants -------------------------------------------------------------------------------------------
def entries(folder: Path) -> list[str]:
    """What a folder of the driver's holds; none when the driver has not made it (yet)."""
    try:
        return sorted(os.listdir(folder))
    except FileNotFoundError:
        return []


def check_invariants(driver: PoolDriver, clients: list[Client]) -> None:
    """With every client parked: what the pool, mountinfo and the loop devices hold matches the models."""
    pool = driver.pool_dir
    sure: dict[str, Vol] = {}
    maybe: set[str] = set()  # volumes whose create or delete was cut off
    targets_sure: set[str] = set()
    targets_maybe: set[str] = set()
    images_sure: set[str] = set()
    images_maybe: set[str] = set()
    snaps_sure: set[str] = set()
    snaps_maybe: set[str] = set()
    expanding: dict[str, tuple[int, int]] = {}
    for c in clients:
        sure.update(c.volumes)
        snaps_sure.update(c.snapshots)
        for name, vol in c.volumes.items():
            if vol.target is not None:
                targets_sure.add(str(vol.target))
                if vol.mode == "block":
                    images_sure.add(str(pool / name))
        p = c.pending
        if p is None:
            continue
        if p[0] in ("create", "delete"):
            maybe.add(p[1])
            sure.pop(p[1], None)
        elif p[0] in ("publish", "unpublish"):
            targets_sure.discard(str(p[2]))
            images_sure.discard(str(pool / p[1]))
            targets_maybe.add(str(p[2]))
            images_maybe.add(str(pool / p[1]))
        elif p[0] in ("snapshot", "delsnap"):
            snaps_maybe.add(p[1])
            snaps_sure.discard(p[1])
        elif p[0] == "expand":
            expanding[p[1]] = (p[2], p[3])

    listed = {e.volume.volume_id: e.volume for e in driver.list_all()}
    assert set(sure) <= set(listed), f"volumes lost: {sorted(set(sure) - set(listed))}"
    assert set(listed) <= set(sure) | maybe, f"volumes that should be gone: {sorted(set(listed) - set(sure) - maybe)}"
    for name, vol in sure.items():
        capacity = listed[name].capacity_bytes
        if name in expanding:
            assert capacity in range(expanding[name][0], expanding[name][1] + 1), (name, capacity, expanding[name])
        else:
            assert capacity == vol.capacity, f"{name}: listed with {capacity} bytes, the client was told {vol.capacity}"
        assert read_tag(pool / name, vol.mode) == vol.content, f"{name}: fsynced data changed"
        if vol.target is not None and str(vol.target) in targets_sure:
            assert read_tag(vol.target, vol.mode) == vol.content, f"{name}: {vol.target} does not show its data"

    reply: csi.ListSnapshotsResponse = driver.controller.ListSnapshots(csi.ListSnapshotsRequest())
    snaps = {s.snapshot.snapshot_id for s in reply.entries}
    assert snaps_sure <= snaps, f"snapshots lost: {sorted(snaps_sure - snaps)}"
    extra = snaps - snaps_sure - snaps_maybe
    assert not extra, f"snapshots that should be gone: {sorted(extra)}"

    meta = pool / ".hpp-csi"
    for folder in ("trash", "staging"):
        assert not entries(meta / folder), f"left in {folder} after recovery: {entries(meta / folder)}"
    half = [n for n in entries(meta / "snapshots") if n.startswith(".")]
    assert not half, f"half-made snapshots left after recovery: {half}"

    mounted = set(mount_points_under(driver.targets)) if driver.targets.exists() else set()
    assert targets_sure <= mounted, f"published targets not mounted: {sorted(targets_sure - mounted)}"
    assert mounted <= targets_sure | targets_maybe, f"mounts nobody published: {sorted(mounted - targets_sure)}"
    assert mount_points_under(pool) == [str(pool)], f"mounts inside the pool: {mount_points_under(pool)}"

    ours = set(loops_under(pool))
    backing = {b.removesuffix(" (deleted)") for d, b in loop_backing_files().items() if d in ours}
    assert images_sure <= backing, f"published block volumes without a loop device: {sorted(images_sure - backing)}"
    assert backing <= images_sure | images_maybe, f"loop devices leaked on {sorted(backing - images_sure)}"


# --- the test ---------------------------------------------------------------------------------------------
def test_sigkill_at_random_moments_loses_and_leaks_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(SEED)
    started = time.monotonic()
    with running(PoolDriver()) as driver:
        driver.kill()
        harness = Harness(driver)
        clients = [Client(harness, n, SEED) for n in range(CLIENTS)]
        threads = [threading.Thread(target=c.run, name=f"client-{c.n}", daemon=True) for c in clients]
        for t in threads:
            t.start()
        kills = survived = 0
        try:
            for _ in range(KILLS + 1):
                harness.open()
                check_invariants(driver, clients)
                survived = kills
                if kills == KILLS:
                    harness.stop = True
                harness.resume()
                if kills == KILLS:
                    break
                time.sleep(rng.uniform(0.2, 1.6))
                harness.kill()
                kills += 1
                harness.wait_quiet(len(clients))
                harness.close()
                assert not harness.errors, "\n".join(harness.errors)
            for t in threads:
                t.join(120)
            assert not harness.errors, "\n".join(harness.errors)
            assert not any(t.is_alive() for t in threads), "clients did not finish"
            check_invariants(driver, clients)
            assert driver.list_all() == []
            assert not loops_under(driver.pool_dir)
        finally:
            if any(t.is_alive() for t in threads):  # a failure: stop the clients before undoing their driver
                harness.stop = True
                harness.kill()
                with contextlib.suppress(AssertionError):
                    harness.wait_quiet(len(clients), timeout=30)
                harness.close()
                harness.resume()  # parked clients find no stubs and end
                for t in threads:
                    t.join(10)
            harness.close()
            with capsys.disabled():  # also on failure: the seed is what reproduces it
                print(f"\ncrash test: {report(clients, survived, time.monotonic() - started)}")
    assert survived == KILLS


def report(clients: list[Client], survived: int, seconds: float) -> str:
    """The figures docs/reliability.md quotes."""
    figures = Figures()
    for c in clients:
        figures.calls += c.fig.calls
        figures.retries += c.fig.retries
        figures.repeats += c.fig.repeats
        for op, n in c.fig.ops.items():
            figures.ops[op] = figures.ops.get(op, 0) + n
    return (f"seed {SEED}, {len(clients)} clients, {figures.calls} calls ({figures.retries} retried after a kill, "
            f"{figures.repeats} repeated creates of volumes and snapshots), {survived} of {KILLS} kills survived, "
            f"{seconds:.1f} s; operations {dict(sorted(figures.ops.items()))}")

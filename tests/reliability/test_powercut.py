"""A simulated power cut: every CreateVolume, DeleteVolume, CreateSnapshot and DeleteSnapshot the driver
acknowledged is on the pool's device.

No device-mapper here (no dm-flakey), so the cut is a copy of the pool's loop-device backing file, taken once
the SIGKILLed driver is gone. XFS keeps what no fsync forced in its in-memory log (the CIL) for up to 30 s;
the copy holds only what XFS had written to the device. Mounted, the copy's log is replayed as after a power
cut, and a fresh driver must list every acknowledged volume and snapshot, and none acknowledged as deleted.

What it proves: the driver answers only after its change reached the device (a reply before the flush fails
this test within a round or two; checked by removing the flush). What it does not: that the disk honoured the
flush. Writes the device completed count as durable even if a real disk still held them in a volatile cache;
XFS's ordering of its log writes (FUA, pre-flush) is trusted, not tested. The loop device uses direct I/O
where the backing filesystem allows it, so its writes are the backing file's, not the host page cache's; a
copy is taken only while the device completes no write (its sysfs write counter is read around the copy).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from drivertools import Driver, MiB, block_cap, create_request, make_root, remove_root, volume_record

from hpp_csi.spec import csi_pb2 as csi
from hpp_csi.spec import csi_pb2_grpc as csi_grpc

ROUNDS = 3
CLIENTS = 4
SEED = int(os.environ.get("HPP_SOAK_SEED", "9"))
IMAGE_BYTES = 320 * MiB  # XFS's smallest

if os.geteuid() != 0:  # loop devices and XFS mounts need root
    pytest.fail("the power-cut test needs root (loop devices, mounts)", pytrace=False)


def run(*command: str) -> str:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{' '.join(command)} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout.strip()


def writes_completed(device: str) -> int:
    """The device's completed write requests (block/stat field 5)."""
    return int(Path(f"/sys/block/{os.path.basename(device)}/stat").read_text().split()[4])


@dataclass
class Kind:
    """What the clients were told of one kind of object: acknowledged, deleted, and cut off mid-call."""

    alive: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    maybe: set[str] = field(default_factory=set)

    def check(self, listed: set[str], what: str) -> set[str]:
        """The acknowledged names, after checking none is lost and no acknowledged delete is undone."""
        sure = self.alive - self.maybe  # a delete cut off may or may not have happened
        lost = sure - listed
        assert not lost, f"acknowledged creates of {what} lost by the power cut: {sorted(lost)}"
        back = (listed & self.deleted) - self.maybe
        assert not back, f"acknowledged deletes of {what} undone by the power cut: {sorted(back)}"
        return sure


@dataclass
class Model:
    """What the clients were told about volumes and snapshots."""

    volumes: Kind = field(default_factory=Kind)
    snapshots: Kind = field(default_factory=Kind)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def cut_off(self) -> int:
        return len(self.volumes.maybe) + len(self.snapshots.maybe)


class Clients:
    """Threads creating (filesystem and block) and deleting volumes, and snapshotting them and deleting the
    snapshots, until the driver dies under them."""

    def __init__(self, endpoint: str, model: Model, round_number: int) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        self.stub = csi_grpc.ControllerStub(self.channel)
        self.model = model
        self.round = round_number
        self.calls = 0
        self.threads = [threading.Thread(target=self.work, args=(n,), daemon=True) for n in range(CLIENTS)]

    def work(self, n: int) -> None:
        rng = random.Random(SEED * 1000 + self.round * 10 + n)
        mine: list[str] = []
        snapshots: list[str] = []
        for i in range(100_000):
            choice = rng.random()
            snapshot = (mine and choice < 0.15) or (snapshots and choice > 0.9)
            kind = self.model.snapshots if snapshot else self.model.volumes
            owned = snapshots if snapshot else mine
            delete = bool(owned) and (choice > 0.9 if snapshot else choice > 0.6)
            name = owned.pop(rng.randrange(len(owned))) if delete else f"r{self.round}-c{n}-{i}"
            with self.model.lock:
                kind.maybe.add(name)
            try:
                if snapshot and delete:
                    self.stub.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=name), timeout=10)
                elif snapshot:
                    source = rng.choice(mine)
                    self.stub.CreateSnapshot(csi.CreateSnapshotRequest(name=name, source_volume_id=source),
                                             timeout=10)
                elif delete:
                    self.stub.DeleteVolume(csi.DeleteVolumeRequest(volume_id=name), timeout=10)
                else:
                    caps = [block_cap()] if rng.random() < 0.3 else None
                    self.stub.CreateVolume(create_request(name, MiB, caps=caps), timeout=10)
            except grpc.RpcError:
                return  # the driver is gone: this name stays "maybe"
            with self.model.lock:
                self.calls += 1
                kind.maybe.discard(name)
                (kind.deleted if delete else kind.alive).add(name)
                (kind.alive if delete else kind.deleted).discard(name)
            if not delete:
                owned.append(name)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads), "a client did not stop after the kill"
        self.channel.close()


def copy_at_rest(image: Path, device: str, copy: Path) -> None:
    """Copy the backing file while the device completes no write, so the copy is one moment's state."""
    for _ in range(20):
        before = writes_completed(device)
        run("cp", "--sparse=always", str(image), str(copy))
        if writes_completed(device) == before:
            return
        time.sleep(0.05)
    raise AssertionError(f"{device} kept writing during 20 copies: no consistent copy")


def check_copy(root: Path, copy: Path, model: Model) -> int:
    """Mount the copy (its log replayed as after a power cut) and judge it by a fresh driver's listing."""
    mount_point = root / "after-cut"
    mount_point.mkdir()
    device = run("losetup", "--find", "--show", str(copy))
    try:
        run("mount", "-o", "nouuid", device, str(mount_point))
        pool = mount_point / "pool"
        after = Driver(root / "after-driver", pools=[{"name": "legacy", "path": str(pool)}])
        after.root.mkdir()
        try:
            after.start()
            listed = set(after.listed_ids())
            reply = after.controller.ListSnapshots(csi.ListSnapshotsRequest(), timeout=10)
            snapshots = {e.snapshot.snapshot_id for e in reply.entries}
        finally:
            after.kill()
        sure = model.volumes.check(listed, "volumes")
        for name in sure:
            assert os.path.lexists(pool / name), f"{name}: record kept but not its data"
            assert volume_record(pool, name)["capacity_bytes"] == MiB
        # A listed snapshot had a readable record naming it and data of its mode: the fresh driver checked.
        sure_snapshots = model.snapshots.check(snapshots, "snapshots")
        return len(sure) + len(model.volumes.deleted) + len(sure_snapshots) + len(model.snapshots.deleted)
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
        copy.unlink()
        shutil.rmtree(root / "after-driver", ignore_errors=True)
        mount_point.rmdir()


def test_acknowledged_changes_survive_a_power_cut(capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(SEED)
    root = make_root("hpppc-")
    image = root / "pool.img"
    device = ""
    figures: list[str] = []
    try:
        with open(image, "wb") as f:
            f.truncate(IMAGE_BYTES)
        device = run("losetup", "--direct-io=on", "--find", "--show", str(image))
        direct = Path(f"/sys/block/{os.path.basename(device)}/loop/dio").read_text().strip() == "1"
        run("mkfs.xfs", "-q", "-f", device)
        (root / "fs").mkdir()
        run("mount", device, str(root / "fs"))
        driver = Driver(root, pools=[{"name": "legacy", "path": str(root / "fs" / "pool")}])
        for number in range(ROUNDS):
            model = Model()
            driver.start()
            clients = Clients(driver.endpoint, model, number)
            clients.start()
            time.sleep(rng.uniform(0.4, 1.0))
            driver.kill()  # returns once the process is reaped: nothing it started is still in a syscall
            copy_at_rest(image, device, root / "cut.img")
            clients.join()
            survivors = check_copy(root, root / "cut.img", model)
            figures.append(f"round {number}: {clients.calls} acknowledged calls, {survivors} volumes and "
                           f"snapshots checked, {model.cut_off} cut off")
            assert clients.calls > 20, "too few calls before the kill to judge anything"
        with capsys.disabled():
            print(f"\npower-cut test: seed {SEED}, direct I/O {'on' if direct else 'off'}; " + "; ".join(figures))
    finally:
        remove_root(root)
        if device:
            subprocess.run(["losetup", "-d", device], capture_output=True, check=False)

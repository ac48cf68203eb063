"""Volumes on their way to a VM, as kubelet, CDI and virt-launcher take them there: created and published by our
driver, filled by `hpp-importer`, hot-plugged from the publish target. What a test made is undone in reverse
order afterwards (unplug, unpublish, delete), also when the test failed half-way.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from drivertools import from_snapshot, unique
from xfs_pools.poolkit import PoolDriver

from hpp_csi.spec import csi_pb2 as csi

from .machine import Disk, Machine

IMPORTER = str(Path(sys.executable).with_name("hpp-importer"))

# Guest-side leftovers of a failed test: a writer loop (it runs while its flag file exists) and mounts under /tmp/m
# (the guest's / is the host's, read-only).
GUEST_RESET = """rm -f /tmp/vmkit-writer.run
sleep 0.3
for m in $(grep -o ' /tmp/m/[^ ]*' /proc/mounts); do umount -l "$m"; done
true
"""


@dataclass(frozen=True)
class Published:
    """A volume published at a target: a folder holding disk.img, or the block device node itself."""

    volume_id: str
    target: Path
    block: bool

    @property
    def disk(self) -> Path:
        """What the VM opens: <target>/disk.img (filesystem volume) or the device node at the target (block)."""
        return self.target if self.block else self.target / "disk.img"


@dataclass
class VolumeKit:
    driver: PoolDriver
    machine: Machine
    volumes: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    published: list[Published] = field(default_factory=list)
    machines: list[Machine] = field(default_factory=list)  # others than `machine` that disks were plugged into

    def create(self, size: int, block: bool = False, snapshot: str | None = None) -> str:
        source = from_snapshot(snapshot) if snapshot else None
        volume_id = self.driver.create(unique("vm"), size, block=block, source=source).volume_id
        self.volumes.append(volume_id)
        return volume_id

    def publish(self, volume_id: str, block: bool = False) -> Published:
        target = self.driver.new_target("block" if block else "disk")
        self.driver.publish(volume_id, target, block=block)
        published = Published(volume_id, target, block)
        self.published.append(published)
        return published

    def unpublish(self, published: Published) -> None:
        self.driver.unpublish(published.volume_id, published.target)
        self.published.remove(published)

    def delete(self, volume_id: str) -> None:
        self.driver.delete(volume_id)
        self.volumes.remove(volume_id)

    def snapshot(self, volume_id: str) -> csi.Snapshot:
        snapshot = self.driver.snapshot(unique("snap"), volume_id)
        self.snapshots.append(snapshot.snapshot_id)
        return snapshot

    def import_into(self, published: Published, source: str, endpoint: str | None, image_size: int) -> None:
        """`hpp-importer import` into the published target, as CDI's importer pod writes its PVC."""
        command = [IMPORTER, "import", "--source", source, "--dest", str(published.disk if published.block
                                                                         else published.target),
                   "--image-size", str(image_size), "--no-progress"]
        if endpoint:
            command += ["--endpoint", endpoint]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, f"hpp-importer failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"

    def attach(self, published: Published, machine: Machine | None = None) -> Disk:
        """Hot-plug the published volume into `machine` (default: the kit's guest)."""
        machine = machine or self.machine
        if machine not in self.machines:
            self.machines.append(machine)
        return machine.attach(published.volume_id, published.disk, published.block)

    def cleanup(self) -> None:
        """Unplug what is still plugged, unpublish, delete snapshots and volumes; every step is tried."""
        for machine in self.machines:
            with contextlib.suppress(Exception):
                machine.shell.run(GUEST_RESET, timeout=20)
            for disk in list(machine.attached.values()):
                with contextlib.suppress(Exception):
                    machine.detach(disk)
        for published in reversed(self.published):
            with contextlib.suppress(Exception):
                self.driver.unpublish(published.volume_id, published.target)
        for snapshot_id in self.snapshots:
            with contextlib.suppress(Exception):
                self.driver.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snapshot_id))
        for volume_id in reversed(self.volumes):
            with contextlib.suppress(Exception):
                self.driver.delete(volume_id)

"""Our volumes as the disks of a running VM (QEMU TCG, driven only through QMP): hot-plug and unplug (10.22.16),
online expansion (10.22.20), blank disks (10.22.13) and a consistent snapshot of a running VM (10.22.11).

The VM opens what kubelet hands virt-launcher: <target>/disk.img of a published filesystem volume, or the
device node published for a block volume. The guest judges what it sees with its own tools (blockdev,
sha256sum, mkfs.ext4, e2fsck) on the SCSI disk the hot-plug gave it. One guest serves the module.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from drivertools import MiB, loops_backing, rpc_error
from qemu.qmp import ExecuteError
from xfs_pools.poolkit import PoolDriver, device_size

from hpp_csi.spec import csi_pb2 as csi

from .machine import Machine
from .volumes import VolumeKit

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
SOURCE_SIZE = 4 * MiB


@pytest.fixture(scope="module")
def source_image() -> Iterator[tuple[Path, str]]:
    """A 4 MiB random disk as qcow2 (the importer converts it to raw), and the sha256 of its raw bytes."""
    folder = Path(tempfile.mkdtemp(prefix="vmimg-"))
    try:
        raw = folder / "disk.raw"
        raw.write_bytes(os.urandom(SOURCE_SIZE))
        qcow2 = folder / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                       check=True, capture_output=True, timeout=60)
        yield qcow2, hashlib.sha256(raw.read_bytes()).hexdigest()
    finally:
        shutil.rmtree(folder)


def guest_size(guest: Machine, device: str) -> int:
    return int(guest.shell.check(f"blockdev --getsize64 {device}"))


def guest_sha256(guest: Machine, device: str, size: int) -> str:
    return guest.shell.check(f"head -c {size} {device} | sha256sum").split()[0]


def guest_disks(guest: Machine) -> set[str]:
    return set(guest.shell.check("ls /sys/block").split())


def test_imported_disks_are_hot_plugged_read_back_and_unplugged(
    kit: VolumeKit, driver: PoolDriver, guest: Machine, source_image: tuple[Path, str]
) -> None:
    qcow2, digest = source_image
    on_file = kit.publish(kit.create(64 * MiB))
    kit.import_into(on_file, "file", str(qcow2), 64 * MiB)
    on_block = kit.publish(kit.create(32 * MiB, block=True), block=True)
    kit.import_into(on_block, "file", str(qcow2), 32 * MiB)
    before = guest_disks(guest)

    plugged = [(published, kit.attach(published)) for published in (on_file, on_block)]
    devices = [guest.device_of(disk) for _, disk in plugged]
    assert {d.removeprefix("/dev/") for d in devices} == guest_disks(guest) - before
    for (published, _), device in zip(plugged, devices, strict=True):
        host_size = device_size(published.disk) if published.block else published.disk.stat().st_size
        assert guest_size(guest, device) == host_size
        assert guest_sha256(guest, device, SOURCE_SIZE) == digest, f"{published.disk} reads back wrong in the guest"

    # While the VM holds them, the volumes cannot be deleted, and they stay whole.
    for published, _ in plugged:
        with rpc_error(FAILED_PRECONDITION, "still published"):
            driver.delete(published.volume_id)
    assert [guest_sha256(guest, device, SOURCE_SIZE) for device in devices] == [digest, digest]

    for _, disk in plugged:
        guest.detach(disk)  # waits for DEVICE_DELETED and for the guest to drop the disk
    assert guest_disks(guest) == before
    for published, _ in plugged:
        kit.unpublish(published)
        kit.delete(published.volume_id)
        assert not driver.volume_path(published.volume_id).exists()
    assert loops_backing(driver.volume_path(on_block.volume_id)) == []


def test_an_attached_block_disk_grows_in_the_running_guest(kit: VolumeKit, driver: PoolDriver,
                                                           guest: Machine) -> None:
    published = kit.publish(kit.create(32 * MiB, block=True), block=True)
    disk = kit.attach(published)
    device = guest.device_of(disk)
    assert guest_size(guest, device) == 32 * MiB

    grown: csi.ControllerExpandVolumeResponse = driver.controller.ControllerExpandVolume(
        csi.ControllerExpandVolumeRequest(volume_id=published.volume_id,
                                          capacity_range=csi.CapacityRange(required_bytes=48 * MiB)))
    assert grown.capacity_bytes == 48 * MiB and grown.node_expansion_required
    # Until the node refreshes the loop device, QEMU cannot grow the disk: the device is still 32 MiB.
    with pytest.raises(ExecuteError, match="Cannot grow device files"):
        guest.resize(disk, 48 * MiB)
    node: csi.NodeExpandVolumeResponse = driver.node.NodeExpandVolume(csi.NodeExpandVolumeRequest(
        volume_id=published.volume_id, volume_path=str(published.target),
        capacity_range=csi.CapacityRange(required_bytes=48 * MiB)))
    assert node.capacity_bytes == 48 * MiB and device_size(published.target) == 48 * MiB

    guest.resize(disk, 48 * MiB)
    assert guest.block_size(disk) == 48 * MiB
    guest.wait_for(lambda: guest_size(guest, device) == 48 * MiB, 30, "the guest to see 48 MiB")
    # The new space is real: the guest writes past the old end, the host reads it from the volume.
    guest.shell.check(f"printf grown-area | dd of={device} bs=1M seek=40 conv=notrunc,fsync 2>/dev/null")
    fd = os.open(published.target, os.O_RDONLY)
    try:
        assert os.pread(fd, 10, 40 * MiB) == b"grown-area"
    finally:
        os.close(fd)
    guest.detach(disk)


def test_a_blank_disk_written_by_the_guest_survives_snapshot_and_restore(
    kit: VolumeKit, driver: PoolDriver, guest: Machine, second_guest: Machine
) -> None:
    published = kit.publish(kit.create(64 * MiB))
    kit.import_into(published, "none", None, 64 * MiB)
    assert published.disk.stat().st_blocks * 512 < MiB, "a blank disk.img should be sparse"
    disk = kit.attach(published)
    device = guest.device_of(disk)
    assert guest.shell.check(f"head -c 1048576 {device} | tr -d '\\000' | wc -c").strip() == "0"
    written = guest.shell.check(
        f"mkfs.ext4 -q -F {device} && mkdir -p /tmp/m/blank && mount {device} /tmp/m/blank"
        " && head -c 1048576 /dev/urandom > /tmp/m/blank/data && echo 'written in the guest' > /tmp/m/blank/note"
        " && sha256sum /tmp/m/blank/data && umount /tmp/m/blank", timeout=60).split()[0]
    guest.detach(disk)

    snapshot = kit.snapshot(published.volume_id)
    assert snapshot.ready_to_use
    restored = kit.publish(kit.create(64 * MiB, snapshot=snapshot.snapshot_id))
    again = kit.attach(restored, second_guest)
    device = second_guest.device_of(again)
    second_guest.shell.check(f"e2fsck -fn {device}", timeout=60)
    read = second_guest.shell.check(
        f"mkdir -p /tmp/m/restored && mount -o ro {device} /tmp/m/restored && sha256sum /tmp/m/restored/data"
        " && cat /tmp/m/restored/note && umount /tmp/m/restored")
    assert read.split()[0] == written and read.splitlines()[1] == "written in the guest"
    second_guest.detach(again)


WRITER = """mkdir -p /tmp/m/live && mount {device} /tmp/m/live && touch /tmp/vmkit-writer.run || exit 1
( i=0
  while [ -e /tmp/vmkit-writer.run ]; do
      i=$((i + 1))
      echo "record $i" >> /tmp/m/live/log && sync /tmp/m/live/log && echo "@@VMKIT-EVENT ack {tag} $i@@"
  done
  echo "@@VMKIT-EVENT stopped {tag}@@" ) &
"""


def test_a_snapshot_of_a_paused_running_vm_is_consistent(kit: VolumeKit, driver: PoolDriver,
                                                          guest: Machine) -> None:
    published = kit.publish(kit.create(64 * MiB))
    kit.import_into(published, "none", None, 64 * MiB)
    disk = kit.attach(published)
    device = guest.device_of(disk)
    guest.shell.check(f"mkfs.ext4 -q -F {device}", timeout=60)
    tag = published.volume_id

    def acked() -> int:
        numbers = [int(e.split()[2]) for e in guest.shell.events() if e.startswith(f"ack {tag} ")]
        return max(numbers, default=0)

    guest.shell.check(WRITER.format(device=device, tag=tag))
    guest.shell.wait_events(lambda _: acked() >= 10, 60, "10 acknowledged writes")
    guest.qmp.cmd("stop")
    guest.shell.pump(0.5)  # acknowledgements printed before the stop, still on their way
    before_snapshot = acked()
    assert guest.qmp.cmd("query-status")["status"] == "paused"  # type: ignore[index]
    snapshot = kit.snapshot(published.volume_id)
    guest.shell.pump(0.5)
    assert acked() == before_snapshot, "the guest kept writing while paused"
    guest.qmp.cmd("cont")
    guest.shell.wait_events(lambda _: acked() >= before_snapshot + 5, 60, "writes after cont")
    guest.shell.check("rm /tmp/vmkit-writer.run")
    guest.shell.wait_events(lambda events: f"stopped {tag}" in events, 30, "the writer to stop")
    guest.shell.check("umount /tmp/m/live")
    guest.detach(disk)

    restored = kit.publish(kit.create(64 * MiB, snapshot=snapshot.snapshot_id))
    again = kit.attach(restored)
    device = guest.device_of(again)
    # Mounting replays the journal, as the VM booting from the restored disk would; then fsck must be clean.
    log = guest.shell.check(f"mkdir -p /tmp/m/check && mount {device} /tmp/m/check && cat /tmp/m/check/log"
                            " && umount /tmp/m/check")
    guest.shell.check(f"e2fsck -fn {device}", timeout=60)
    records = log.splitlines()
    assert len(records) >= before_snapshot, f"acknowledged {before_snapshot} writes, the snapshot holds {len(records)}"
    assert records == [f"record {i}" for i in range(1, len(records) + 1)]
    assert len(records) < acked(), "the snapshot holds writes made after `cont`"
    guest.detach(again)


def test_what_a_failed_test_leaves_is_unplugged_unpublished_and_deleted(driver: PoolDriver, guest: Machine) -> None:
    """The kit's cleanup (run after every test, failed or not) on the worst case: a disk mounted and being written
    in the guest, a block disk plugged, a snapshot taken."""
    left = VolumeKit(driver, guest)
    try:
        before = guest_disks(guest)
        on_file = left.publish(left.create(64 * MiB))
        left.import_into(on_file, "none", None, 64 * MiB)
        device = guest.device_of(left.attach(on_file))
        guest.shell.check(f"mkfs.ext4 -q -F {device}", timeout=60)
        guest.shell.check(WRITER.format(device=device, tag="abandoned"))
        on_block = left.publish(left.create(16 * MiB, block=True), block=True)
        left.attach(on_block)
        left.snapshot(on_file.volume_id)
    except BaseException:
        left.cleanup()
        raise
    left.cleanup()  # as if the test had failed here
    assert guest.attached == {} and guest_disks(guest) == before
    assert guest.shell.check("grep -c ' /tmp/m/' /proc/mounts || true").strip() == "0"
    listed = {entry.volume.volume_id for entry in driver.list_all()}
    assert not listed & {on_file.volume_id, on_block.volume_id}
    assert loops_backing(driver.volume_path(on_block.volume_id)) == []
    snapshots: csi.ListSnapshotsResponse = driver.controller.ListSnapshots(
        csi.ListSnapshotsRequest(source_volume_id=on_file.volume_id))
    assert list(snapshots.entries) == []

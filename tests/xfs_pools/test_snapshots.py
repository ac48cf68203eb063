"""Snapshots and clones over a real driver on an XFS (reflink) pool: the CSI contract, and that copies are
reflinks (extents shared, no space used, fast) yet independent of their source."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from drivertools import GiB, MiB, from_snapshot, from_volume, mount_cap, rpc_error, unique

from hpp_csi.spec import csi_pb2 as csi

from .poolkit import PoolDriver, run, write_pattern

NOT_FOUND, ALREADY_EXISTS, ABORTED = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.ABORTED


def list_snapshots(driver: PoolDriver, **kwargs: Any) -> csi.ListSnapshotsResponse:
    reply: csi.ListSnapshotsResponse = driver.controller.ListSnapshots(csi.ListSnapshotsRequest(**kwargs))
    return reply


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(driver: PoolDriver) -> str:
    """A 64 MiB filesystem volume holding a few files and a folder."""
    volume_id = driver.create(unique("src"), 64 * MiB).volume_id
    path = driver.volume_path(volume_id)
    (path / "disk.img").write_bytes(os.urandom(3 * MiB))
    (path / "folder").mkdir()
    (path / "folder" / "notes.txt").write_text("hello from the source\n")
    return volume_id


def test_create_snapshot_is_idempotent_and_checks_its_source(driver: PoolDriver, source: str) -> None:
    before = time.time()
    first = driver.snapshot("snap-idem", source)
    after = time.time()
    assert first.snapshot_id == "snap-idem" and first.source_volume_id == source
    assert first.ready_to_use and first.size_bytes == 64 * MiB
    assert before - 1 <= first.creation_time.seconds + first.creation_time.nanos / 1e9 <= after + 1
    assert driver.snapshot("snap-idem", source) == first  # same answer, creation time included
    other = driver.create(unique("other"), 16 * MiB).volume_id
    with rpc_error(ALREADY_EXISTS, source):
        driver.snapshot("snap-idem", other)
    with rpc_error(NOT_FOUND, "pvc-missing"):
        driver.snapshot(unique("snap"), "pvc-missing")
    assert tree(driver.snapshot_path("snap-idem")) == tree(driver.volume_path(source))


def test_list_snapshots_filters_by_id_and_source_and_pages(driver: PoolDriver) -> None:
    volume = driver.create(unique("listed"), 16 * MiB).volume_id
    mine = sorted(driver.snapshot(f"snap-list-{i}", volume).snapshot_id for i in range(5))
    everything = list_snapshots(driver)
    assert everything.next_token == "" and set(mine) <= {e.snapshot.snapshot_id for e in everything.entries}

    by_id = list_snapshots(driver, snapshot_id=mine[2]).entries
    assert [e.snapshot.snapshot_id for e in by_id] == [mine[2]] and by_id[0].snapshot.source_volume_id == volume
    assert list(list_snapshots(driver, snapshot_id="snap-unknown").entries) == []
    by_source = list_snapshots(driver, source_volume_id=volume).entries
    assert sorted(e.snapshot.snapshot_id for e in by_source) == mine
    assert list(list_snapshots(driver, source_volume_id="pvc-unknown").entries) == []

    for filters in ({}, {"source_volume_id": volume}):
        seen, token, pages = [], "", 0
        while True:
            page = list_snapshots(driver, max_entries=2, starting_token=token, **filters)
            assert len(page.entries) <= 2
            seen += [e.snapshot.snapshot_id for e in page.entries]
            pages += 1
            token = page.next_token
            if not token:
                break
        expected = [e.snapshot.snapshot_id for e in list_snapshots(driver, **filters).entries]
        assert seen == expected and len(seen) == len(set(seen))
        assert pages >= 3
    with rpc_error(ABORTED):
        list_snapshots(driver, starting_token="invalid-token")


def test_get_and_delete_snapshot(driver: PoolDriver, source: str) -> None:
    made = driver.snapshot("snap-del", source)
    got: csi.GetSnapshotResponse = driver.controller.GetSnapshot(csi.GetSnapshotRequest(snapshot_id="snap-del"))
    assert got.snapshot == made
    with rpc_error(NOT_FOUND):
        driver.controller.GetSnapshot(csi.GetSnapshotRequest(snapshot_id="snap-never-made"))
    for _ in range(2):  # idempotent
        driver.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id="snap-del"))
    driver.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id="snap-never-made"))
    assert not os.path.lexists(driver.snapshot_path("snap-del"))
    with rpc_error(NOT_FOUND):
        driver.controller.GetSnapshot(csi.GetSnapshotRequest(snapshot_id="snap-del"))
    assert "snap-del" not in {e.snapshot.snapshot_id for e in list_snapshots(driver).entries}


@pytest.mark.parametrize("kind", ["snapshot", "volume"])
def test_a_new_volume_from_a_source_holds_the_same_independent_data(kind: str, driver: PoolDriver,
                                                                    source: str) -> None:
    if kind == "snapshot":
        content = from_snapshot(driver.snapshot(unique("snap"), source).snapshot_id)
    else:
        content = from_volume(source)
    clone = driver.create(unique("clone"), 64 * MiB, source=content)
    assert clone.content_source == content and clone.capacity_bytes == 64 * MiB
    source_path, clone_path = driver.volume_path(source), driver.volume_path(clone.volume_id)
    original = tree(source_path)
    assert tree(clone_path) == original

    (clone_path / "folder" / "notes.txt").write_text("changed in the clone\n")
    (clone_path / "new-in-clone").write_bytes(b"x")
    assert tree(source_path) == original
    with open(source_path / "disk.img", "r+b") as f:
        f.write(b"changed in the source")
    (source_path / "new-in-source").write_bytes(b"y")
    assert tree(clone_path)["disk.img"] == original["disk.img"]
    assert "new-in-source" not in tree(clone_path)
    # put the source back for the other tests
    (source_path / "new-in-source").unlink()
    (source_path / "disk.img").write_bytes(original["disk.img"])


def test_unknown_sources_are_not_found(driver: PoolDriver) -> None:
    with rpc_error(NOT_FOUND, "snap-missing"):
        driver.create(unique("clone"), 16 * MiB, source=from_snapshot("snap-missing"))
    with rpc_error(NOT_FOUND, "pvc-missing"):
        driver.create(unique("clone"), 16 * MiB, source=from_volume("pvc-missing"))


def test_snapshots_and_clones_of_a_full_gib_share_extents(driver: PoolDriver) -> None:
    volume = driver.create(unique("big"), GiB).volume_id
    data = driver.volume_path(volume) / "disk.img"
    write_pattern(data, GiB)
    free = free_bytes(driver.pool_dir)

    started = time.perf_counter()
    snapshot = driver.snapshot(unique("snap"), volume)
    snapshot_seconds = time.perf_counter() - started
    clone = driver.create(unique("clone"), GiB, source=from_snapshot(snapshot.snapshot_id)).volume_id
    copy = driver.create(unique("copy"), GiB, source=from_volume(volume)).volume_id
    print(f"snapshot of a 1 GiB volume: {snapshot_seconds * 1e3:.0f} ms")
    assert snapshot_seconds < 1.0
    assert free - free_bytes(driver.pool_dir) < 32 * MiB, "three 1 GiB copies should take (almost) no space"
    for path in (driver.snapshot_path(snapshot.snapshot_id) / "disk.img", driver.volume_path(clone) / "disk.img",
                 driver.volume_path(copy) / "disk.img"):
        extents = run(["filefrag", "-v", str(path)]).stdout
        assert "shared" in extents, extents
    assert digest(driver.volume_path(clone) / "disk.img") == digest(data)
    for volume_id in (clone, copy, volume):
        driver.delete(volume_id)
    driver.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id))
    deadline = time.monotonic() + 10  # XFS frees the blocks of unlinked files in the background
    while free_bytes(driver.pool_dir) < free + GiB - 32 * MiB and time.monotonic() < deadline:
        time.sleep(0.1)
    assert free_bytes(driver.pool_dir) >= free + GiB - 32 * MiB, "deleting every copy should free the GiB"


def test_block_volumes_are_cloned_and_snapshotted(driver: PoolDriver) -> None:
    volume = driver.create(unique("blk"), 64 * MiB, block=True).volume_id
    image = driver.volume_path(volume)
    with open(image, "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"block payload" * 1000)
    snapshot = driver.snapshot(unique("snap"), volume)
    assert snapshot.size_bytes == 64 * MiB
    clones = [driver.create(unique("blkclone"), 64 * MiB, block=True, source=from_volume(volume)),
              driver.create(unique("blkrest"), 128 * MiB, block=True, source=from_snapshot(snapshot.snapshot_id))]
    for clone, size in zip(clones, (64 * MiB, 128 * MiB), strict=True):
        path = driver.volume_path(clone.volume_id)
        assert path.is_file() and path.stat().st_size == clone.capacity_bytes == size
        with open(path, "rb") as f:
            assert f.read(64 * MiB) == image.read_bytes()
        assert path.stat().st_blocks * 512 < 8 * MiB, "the clone should stay sparse"
    with open(driver.volume_path(clones[0].volume_id), "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"CLONE")
    with open(image, "rb") as f:
        f.seek(5 * MiB)
        assert f.read(5) == b"block"
    with rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "block"):
        driver.create(unique("mismatch"), 64 * MiB, source=from_volume(volume))  # a block source for a filesystem


def test_clone_requests_are_idempotent_and_take_the_source_size(driver: PoolDriver, source: str) -> None:
    name = unique("clone")
    first = driver.create(name, 16 * MiB, source=from_volume(source))
    assert first.capacity_bytes == 64 * MiB, "a clone is never smaller than its source"
    assert driver.create(name, 16 * MiB, source=from_volume(source)) == first
    other = driver.snapshot(unique("snap"), source).snapshot_id
    with rpc_error(ALREADY_EXISTS, "content source"):
        driver.create(name, 16 * MiB, source=from_snapshot(other))
    with rpc_error(grpc.StatusCode.OUT_OF_RANGE, "limit_bytes"):
        driver.controller.CreateVolume(csi.CreateVolumeRequest(
            name=unique("small"), capacity_range=csi.CapacityRange(limit_bytes=16 * MiB),
            volume_capabilities=[mount_cap()], volume_content_source=from_volume(source)))


def test_snapshots_outlive_their_source_and_a_restart(driver: PoolDriver) -> None:
    volume = driver.create(unique("doomed"), 16 * MiB).volume_id
    (driver.volume_path(volume) / "last-words").write_text("still here\n")
    snapshot = driver.snapshot(unique("snap"), volume)
    driver.delete(volume)
    driver.restart()
    got: csi.GetSnapshotResponse = driver.controller.GetSnapshot(
        csi.GetSnapshotRequest(snapshot_id=snapshot.snapshot_id))
    assert got.snapshot == snapshot
    assert driver.snapshot(snapshot.snapshot_id, volume) == snapshot  # idempotent, source gone or not
    restored = driver.create(unique("restored"), 16 * MiB, source=from_snapshot(snapshot.snapshot_id)).volume_id
    assert (driver.volume_path(restored) / "last-words").read_text() == "still here\n"

"""One flush per change: what CreateVolume, DeleteVolume, expansion, CreateSnapshot and DeleteSnapshot fsync,
what a failed flush answers, and records of the previous layout (JSON as file content) loading and being
rewritten. The volume and snapshot managers run in-process on a real folder (ext4, where data is copied) or a
loop-backed XFS pool (reflinks); fsync, fdatasync and syncfs are counted, not replaced."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from drivertools import RECORD_XATTR, Driver, MiB, create_request, snapshot_record, volume_record

from hpp_csi.config import PoolConfig
from hpp_csi.linux import atomic
from hpp_csi.spec import csi_pb2 as csi
from hpp_csi.storage.group_commit import FlushFailed
from hpp_csi.storage.pool_device import unmount_pool
from hpp_csi.storage.pools import StoragePool
from hpp_csi.storage.snapshots import SnapshotManager
from hpp_csi.storage.volumes import CreateSpec, Source, VolumeManager


def manager_on(folder: Path) -> VolumeManager:
    pool = StoragePool(PoolConfig(name="legacy", path=folder, volumes_dir=folder))
    pool.prepare(mount_devices=False)
    manager = VolumeManager([pool])
    manager.load()
    return manager


@pytest.fixture
def manager(tmp_path: Path) -> VolumeManager:
    return manager_on(tmp_path / "pool")


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every fsync and fdatasync the process makes, by name, in order (the real calls still happen)."""
    calls: list[str] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def fsync(fd: Any) -> None:
        calls.append("fsync")
        real_fsync(fd)

    def fdatasync(fd: Any) -> None:
        calls.append("fdatasync")
        real_fdatasync(fd)

    real_syncfs = atomic.sync_filesystem

    def syncfs(path: str | os.PathLike[str]) -> None:
        calls.append("syncfs")
        real_syncfs(path)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(atomic, "sync_filesystem", syncfs)
    yield calls


def spec(manager: VolumeManager, name: str, mode: str = "mount", **kwargs: Any) -> CreateSpec:
    return CreateSpec(volume_id=name, pool=manager.pools["legacy"], capacity_bytes=MiB, mode=mode, **kwargs)


def failing_flush(monkeypatch: pytest.MonkeyPatch, failures: int) -> list[int]:
    """The next `failures` flushes of the records folder fail with EIO; returns [flushes attempted]."""
    real = atomic.FolderFlush.__call__
    attempts = [0]

    def flaky(self: atomic.FolderFlush) -> None:
        attempts[0] += 1
        if attempts[0] <= failures:
            raise OSError(errno.EIO, "Input/output error")
        real(self)

    monkeypatch.setattr(atomic.FolderFlush, "__call__", flaky)
    return attempts


@pytest.mark.parametrize("mode", ["mount", "block"])
def test_create_expand_delete_flush_once_each(manager: VolumeManager, syncs: list[str], mode: str) -> None:
    manager.create(spec(manager, "one", mode))
    assert syncs == ["fsync"]
    volume = manager.get("one")
    manager.expand(volume, 2 * MiB)
    assert syncs == ["fsync"] * 2
    assert manager.delete("one")
    assert syncs == ["fsync"] * 3
    assert manager.pools["legacy"].store.commits.flushes == 1 + 3  # the start-up flush, then one per change


def test_record_is_an_empty_file_with_the_json_in_an_attribute(manager: VolumeManager) -> None:
    manager.create(spec(manager, "inspect"))
    path = manager.pools["legacy"].store.path_of("inspect")
    assert path.stat().st_size == 0
    assert json.loads(os.getxattr(path, RECORD_XATTR))["volume_id"] == "inspect"
    assert not [n for n in os.listdir(path.parent) if n.startswith(".")]  # no temporary name left behind


def test_a_failed_flush_fails_the_create_and_the_retry_answers_the_same(
    manager: VolumeManager, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    attempts = failing_flush(monkeypatch, 1)
    with pytest.raises(FlushFailed, match=r"flushing the records in .* failed \(Input/output error\): the change "
                                          "may not be on disk; retry the call"):
        manager.create(spec(manager, "v"))
    first = manager.get("v").record  # on disk, not known to be durable
    volume, _created = manager.create(spec(manager, "v"))
    assert attempts[0] == 2  # the retry flushed again before answering
    assert volume.record == first
    manager.create(spec(manager, "v"))
    assert attempts[0] == 2  # once durable, a repeat needs no flush
    again = manager_on(tmp_path / "pool").get("v")  # what a restart reads
    assert (again.record.capacity_bytes, again.record.context, again.record.adopted) == (MiB, first.context, False)


def test_a_failed_flush_fails_a_clone_and_the_retry_answers_the_same(
    manager: VolumeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, _ = manager.create(spec(manager, "src"))
    (source.path / "data").write_text("cloned")
    copy = spec(manager, "copy", content_source={"volume": "src"},
                source=Source(path=source.path, mode="mount", capacity_bytes=MiB, description="volume 'src'"))
    attempts = failing_flush(monkeypatch, 1)
    with pytest.raises(FlushFailed):
        manager.create(copy)
    volume, _created = manager.create(copy)  # not rebuilt over the first attempt's data
    assert attempts[0] == 2
    assert (volume.path / "data").read_text() == "cloned"
    assert volume.record.content_source == {"volume": "src"}


def test_a_failed_flush_fails_the_delete_and_the_retry_finishes_it(
    manager: VolumeManager, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    manager.create(spec(manager, "gone", "block"))
    attempts = failing_flush(monkeypatch, 1)
    with pytest.raises(FlushFailed):
        manager.delete("gone")
    assert manager.find("gone") is not None  # still listed: its removal is not known to be durable
    assert manager.delete("gone")
    assert attempts[0] == 2
    assert manager.find("gone") is None
    assert manager_on(tmp_path / "pool").find("gone") is None
    assert not manager.delete("gone")  # and a repeat is a plain success


def test_a_failed_flush_fails_the_expansion_and_the_retry_answers_the_same(
    manager: VolumeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager.create(spec(manager, "grow", "block"))
    failing_flush(monkeypatch, 1)
    with pytest.raises(FlushFailed):
        manager.expand(manager.get("grow"), 3 * MiB)
    assert manager.get("grow").record.capacity_bytes == MiB
    assert manager.expand(manager.get("grow"), 3 * MiB).capacity_bytes == 3 * MiB
    assert os.path.getsize(manager.get("grow").path) == 3 * MiB


def test_a_record_too_large_for_an_attribute_is_kept_as_content(manager: VolumeManager, syncs: list[str],
                                                                tmp_path: Path) -> None:
    parameters = {"storagePool": "legacy", "note": "x" * 4000}
    manager.create(spec(manager, "big", parameters=parameters))
    path = manager.pools["legacy"].store.path_of("big")
    assert path.stat().st_size > 4000
    assert syncs == ["fdatasync", "fsync", "fsync"]  # the content's own two flushes, then the shared one
    assert manager_on(tmp_path / "pool").get("big").record.parameters == parameters


# Records as the previous layout wrote them: JSON as the file's content (atomic.write_json's bytes).
OLD_RECORDS = {
    "old-fs": b'{"adopted":false,"capacity_bytes":1048576,"content_source":null,"context":{"sizeEnforced":"false",'
              b'"storagePool":"legacy"},"created":1796100000.5,"ephemeral":false,"extra":{},"mode":"mount",'
              b'"parameters":{},"pool":"legacy","version":1,"volume_id":"old-fs"}',
    "old-img": b'{"adopted":false,"capacity_bytes":2097152,"content_source":null,"context":{"sizeEnforced":"true",'
               b'"storagePool":"legacy"},"created":1796100001.5,"ephemeral":false,"extra":{},"mode":"block",'
               b'"parameters":{},"pool":"legacy","version":1,"volume_id":"old-img"}',
}


def write_old_layout(pool: Path) -> None:
    records = pool / ".hpp-csi" / "volumes"
    records.mkdir(parents=True)
    (pool / "old-fs").mkdir(mode=0o2770)
    (pool / "old-fs" / "data").write_text("kept")
    with open(pool / "old-img", "wb") as image:
        image.truncate(2 * MiB)
    for name, content in OLD_RECORDS.items():
        atomic.write_bytes(records / f"{name}.json", content)


def test_records_of_the_previous_layout_load_and_are_rewritten_when_they_change(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    write_old_layout(pool)
    manager = manager_on(pool)
    assert manager.get("old-fs").record.capacity_bytes == MiB
    assert manager.get("old-img").record.capacity_bytes == 2 * MiB
    assert not manager.bad_entries.all()
    manager.expand(manager.get("old-img"), 4 * MiB)  # a change rewrites the record in the new form
    assert (pool / ".hpp-csi" / "volumes" / "old-img.json").stat().st_size == 0
    assert volume_record(pool, "old-img")["capacity_bytes"] == 4 * MiB
    assert json.loads(OLD_RECORDS["old-fs"]) == volume_record(pool, "old-fs")  # untouched until it changes
    assert manager.delete("old-fs")
    restarted = manager_on(pool)
    assert restarted.find("old-fs") is None
    assert restarted.get("old-img").record.capacity_bytes == 4 * MiB


@pytest.fixture
def spawn_old(spawn: Callable[..., Driver]) -> Driver:
    proc = spawn()
    write_old_layout(proc.pool_path())
    return proc.start()


def test_a_driver_serves_volumes_of_the_previous_layout(spawn_old: Driver) -> None:
    proc = spawn_old
    listed = {e.volume.volume_id: e for e in proc.list_all()}
    assert {n: e.volume.capacity_bytes for n, e in listed.items()} == {"old-fs": MiB, "old-img": 2 * MiB}
    assert not any(e.status.volume_condition.abnormal for e in listed.values())
    assert proc.create("old-fs", MiB).volume_id == "old-fs"  # a repeated create finds it as it was
    target = proc.new_target()
    proc.publish("old-fs", target)
    assert (target / "data").read_text() == "kept"
    proc.unpublish("old-fs", target)
    proc.delete("old-fs")
    proc.restart()
    assert proc.listed_ids() == ["old-img"]


# --- snapshots ------------------------------------------------------------------------------------------------
def snapshots_of(manager: VolumeManager) -> SnapshotManager:
    snapshots = SnapshotManager(manager)
    snapshots.load()
    return snapshots


@pytest.fixture
def xfs_manager(tmp_path: Path) -> Iterator[VolumeManager]:
    """A volume manager on a loop-backed XFS pool (reflink=1), unmounted and detached afterwards."""
    config = PoolConfig(name="legacy", path=tmp_path / "xfs", volumes_dir=tmp_path / "xfs" / "csi", size=300 * MiB)
    pool = StoragePool(config)
    try:
        pool.prepare()
        manager = VolumeManager([pool])
        manager.load()
        yield manager
    finally:
        pool.store.close()  # its flush descriptor would keep the filesystem busy
        unmount_pool(config)


@pytest.mark.parametrize("mode", ["mount", "block"])
def test_reflinked_snapshot_create_and_delete_flush_once_each(xfs_manager: VolumeManager, syncs: list[str],
                                                              mode: str) -> None:
    source, _ = xfs_manager.create(spec(xfs_manager, "src", mode))
    if mode == "mount":
        (source.path / "data").write_bytes(os.urandom(64 * 1024))
    else:
        with open(source.path, "r+b") as image:
            image.write(os.urandom(64 * 1024))
    snapshots = snapshots_of(xfs_manager)
    del syncs[:]
    record, created = snapshots.create("snap", source)
    assert (created, record.method) == (True, "reflink")
    assert syncs == ["fsync"]  # shared extents are journal metadata: the folder's flush covers data and record
    store = xfs_manager.pools["legacy"].store
    assert (store.snapshots_dir / "snap" / "record.json").stat().st_size == 0
    assert snapshot_record(xfs_manager.pools["legacy"].volumes_dir, "snap")["source_volume_id"] == "src"
    assert snapshots.delete("snap")
    assert syncs == ["fsync"] * 2
    assert store.snapshot_commits.flushes == 1 + 2  # the start-up flush, then one per change
    assert not os.listdir(store.trash_dir)


@pytest.mark.parametrize(("mode", "data", "expected"), [
    ("mount", False, ["fsync"]),  # nothing copied: the folder's flush alone
    ("mount", True, ["syncfs", "fsync"]),  # a copied tree's pages, then the folder
    ("block", True, ["fdatasync", "fsync"]),  # a copied image's pages, then the folder
])
def test_a_copied_snapshot_writes_its_data_out_before_the_one_flush(
    manager: VolumeManager, syncs: list[str], mode: str, data: bool, expected: list[str]
) -> None:
    source, _ = manager.create(spec(manager, "src", mode))
    if data and mode == "mount":
        (source.path / "file").write_text("copied")
    elif data:
        source.path.write_bytes(b"x" * 4096)
    snapshots = snapshots_of(manager)
    del syncs[:]
    record, _ = snapshots.create("snap", source)
    assert record.method == ("sparse-copy" if data else "none")
    assert syncs == expected
    del syncs[:]
    assert snapshots.delete("snap")
    assert syncs == ["fsync"]


def test_a_failed_flush_fails_the_snapshot_and_the_retry_answers_the_same(
    manager: VolumeManager, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    source, _ = manager.create(spec(manager, "src"))
    (source.path / "file").write_text("kept")
    snapshots = snapshots_of(manager)
    attempts = failing_flush(monkeypatch, 2)
    with pytest.raises(FlushFailed, match=r"flushing the snapshots in .*snapshots-v2 failed \(Input/output error\): "
                                          "the change may not be on disk; retry the call"):
        snapshots.create("snap", source)
    assert snapshots.page(None, 0) == ([], None)  # not listed: not known to be durable
    with pytest.raises(FlushFailed):
        snapshots.find("snap")  # the retry's lookup flushes; it fails again
    assert attempts[0] == 2
    retried = snapshots.find("snap")
    assert attempts[0] == 3
    assert retried is not None and retried.source_volume_id == "src"
    assert snapshots.find("snap") == retried and attempts[0] == 3  # once durable, no more flushes
    assert snapshots.page(None, 0) == ([retried], None)
    restarted = snapshots_of(manager_on(tmp_path / "pool"))
    assert restarted.find("snap") == retried  # the same id, source, size and creation time
    assert (restarted.path_of(retried) / "file").read_text() == "kept"


def test_a_failed_flush_fails_the_snapshot_delete_and_the_retry_finishes_it(
    manager: VolumeManager, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    source, _ = manager.create(spec(manager, "src", "block"))
    snapshots = snapshots_of(manager)
    snapshots.create("snap", source)
    attempts = failing_flush(monkeypatch, 1)
    with pytest.raises(FlushFailed):
        snapshots.delete("snap")
    assert snapshots.find("snap") is not None  # still listed: its removal is not known to be durable
    store = manager.pools["legacy"].store
    assert not os.listdir(store.trash_dir)  # the data went anyway: the snapshot's folder is gone
    assert snapshots.delete("snap")
    assert attempts[0] == 2  # the retry flushed again before answering
    assert snapshots.find("snap") is None
    assert not snapshots.delete("snap")  # and a repeat is a plain success
    assert snapshots_of(manager_on(tmp_path / "pool")).find("snap") is None


# A snapshot as the previous layout of snapshots-v2 wrote it: JSON as record.json's content.
OLD_SNAPSHOT = (b'{"created_ns":1796100002000000000,"method":"sparse-copy","mode":"mount","pool":"legacy",'
                b'"size_bytes":1048576,"snapshot_id":"old-snap","source_volume_id":"old-fs"}')


def write_old_snapshot(pool: Path) -> None:
    folder = pool / ".hpp-csi" / "snapshots-v2" / "old-snap"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "data").write_text("snapped")
    atomic.write_bytes(folder / "record.json", OLD_SNAPSHOT)


def test_snapshot_records_of_the_previous_layout_load(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    write_old_layout(pool)
    write_old_snapshot(pool)
    manager = manager_on(pool)
    snapshots = snapshots_of(manager)
    record = snapshots.get("old-snap")
    assert (record.source_volume_id, record.size_bytes, record.created_ns) == ("old-fs", MiB, 1796100002000000000)
    assert not manager.bad_entries.all()
    assert snapshot_record(pool, "old-snap") == json.loads(OLD_SNAPSHOT)  # read as it is, not rewritten
    assert snapshots.delete("old-snap")
    assert snapshots_of(manager_on(pool)).find("old-snap") is None


def test_a_driver_serves_snapshots_of_the_previous_layout(spawn: Callable[..., Driver]) -> None:
    proc = spawn()
    write_old_layout(proc.pool_path())
    write_old_snapshot(proc.pool_path())
    proc.start()
    listed = proc.controller.ListSnapshots(csi.ListSnapshotsRequest()).entries
    assert [(e.snapshot.snapshot_id, e.snapshot.source_volume_id) for e in listed] == [("old-snap", "old-fs")]
    made = proc.controller.CreateSnapshot(csi.CreateSnapshotRequest(name="old-snap", source_volume_id="old-fs"))
    assert made.snapshot == listed[0].snapshot  # a repeated create finds it as it was
    restore = csi.VolumeContentSource(snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id="old-snap"))
    proc.controller.CreateVolume(create_request("restored", MiB, volume_content_source=restore))
    assert (proc.volume_path("restored") / "data").read_text() == "snapped"
    proc.controller.CreateSnapshot(csi.CreateSnapshotRequest(name="new-snap", source_volume_id="restored"))
    new = proc.pool_path() / ".hpp-csi" / "snapshots-v2" / "new-snap" / "record.json"
    assert new.stat().st_size == 0  # written in the new form
    assert snapshot_record(proc.pool_path(), "new-snap")["source_volume_id"] == "restored"
    proc.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id="old-snap"))
    proc.restart()
    assert [e.snapshot.snapshot_id for e in proc.controller.ListSnapshots(csi.ListSnapshotsRequest()).entries] == [
        "new-snap"]

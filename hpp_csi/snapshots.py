"""Snapshots: node-local copies of a volume, made by reflink where the filesystem shares extents.

A pool's snapshots live in `<volumes_dir>/.hpp-csi/snapshots/`: the data as `<id>` (a directory, or a file for
block volumes) and the record as `<id>.json`. The data is cloned under a temporary name and renamed into place,
and the record is written last, so a snapshot exists exactly when its record does; start-up removes data that
has no record (a snapshot interrupted by a crash).
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hpp_csi import atomic, errors
from hpp_csi.pools import StoragePool
from hpp_csi.reflink import clone_file, clone_tree
from hpp_csi.volumes import Volume, VolumeManager

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


@dataclass
class SnapshotRecord:
    snapshot_id: str
    source_volume_id: str
    pool: str
    size_bytes: int
    created_ns: int
    mode: str = "mount"
    method: str = ""

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> SnapshotRecord:
        if not isinstance(raw, dict):
            raise TypeError(f"expected a JSON object, found {type(raw).__name__}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})  # type: ignore[arg-type]


def snapshots_dir(pool: StoragePool) -> Path:
    return pool.store.root / "snapshots"


def data_path(pool: StoragePool, snapshot_id: str) -> Path:
    return snapshots_dir(pool) / snapshot_id


def record_path(pool: StoragePool, snapshot_id: str) -> Path:
    return snapshots_dir(pool) / f"{snapshot_id}.json"


def remove_data(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def copy_entry(source: Path, destination: Path, mode: str) -> str:
    """Clone a volume's data (directory tree or block image) to a new path; the method used."""
    if mode == "block":
        return clone_file(source, destination).value
    return clone_tree(source, destination).method


class SnapshotManager:
    """Snapshots of every pool; IDs are unique across the node, like volume IDs."""

    def __init__(self, volumes: VolumeManager) -> None:
        self.volumes = volumes
        self._guard = threading.Lock()
        self._records: dict[str, SnapshotRecord] = {}
        self._sorted: list[str] = []

    def load(self) -> None:
        records: dict[str, SnapshotRecord] = {}
        for pool in self.volumes.pools.values():
            folder = snapshots_dir(pool)
            folder.mkdir(mode=0o700, exist_ok=True)
            recorded = set()
            for entry in os.scandir(folder):
                if entry.name.endswith(".json") and not entry.name.startswith("."):
                    try:
                        record = SnapshotRecord.from_json(json.loads(Path(entry.path).read_bytes()))
                        if record.snapshot_id != entry.name[: -len(".json")]:
                            raise ValueError(f"it names snapshot {record.snapshot_id!r}")
                    except (ValueError, TypeError) as exc:
                        log.warning("snapshot record %s is unreadable (%s); ignoring it", entry.path, exc)
                        continue
                    record.pool = pool.name  # where it is stored wins, should the pool have been renamed
                    records.setdefault(record.snapshot_id, record)
                    recorded.add(record.snapshot_id)
            for entry in os.scandir(folder):
                name = entry.name
                if name.endswith(".json") and not name.startswith("."):
                    continue
                if name.startswith(".") or name not in recorded:
                    log.info("removing incomplete snapshot data %s", entry.path)
                    remove_data(Path(entry.path))
        with self._guard:
            self._records = records
            self._sorted = sorted(records)

    def find(self, snapshot_id: str) -> SnapshotRecord | None:
        with self._guard:
            return self._records.get(snapshot_id)

    def get(self, snapshot_id: str) -> SnapshotRecord:
        record = self.find(snapshot_id)
        if record is None:
            raise errors.not_found(f"snapshot {snapshot_id!r} does not exist on this node")
        return record

    def path_of(self, record: SnapshotRecord) -> Path:
        return data_path(self.volumes.pools[record.pool], record.snapshot_id)

    def create(self, snapshot_id: str, source: Volume) -> tuple[SnapshotRecord, bool]:
        """Snapshot `source` (callers hold the locks of both IDs and checked the ID is free); (record, created)."""
        if not source.exists_on_disk():
            raise errors.failed_precondition(f"volume {source.volume_id!r} has no data at {source.path}")
        pool = source.pool
        staging = snapshots_dir(pool) / f"{TMP_PREFIX}{snapshot_id}"
        remove_data(staging)
        started = time.perf_counter()
        try:
            method = copy_entry(source.path, staging, source.record.mode)
            os.rename(staging, data_path(pool, snapshot_id))
        except BaseException:
            remove_data(staging)
            raise
        record = SnapshotRecord(
            snapshot_id=snapshot_id, source_volume_id=source.volume_id, pool=pool.name,
            size_bytes=source.record.capacity_bytes, created_ns=time.time_ns(), mode=source.record.mode,
            method=method,
        )
        atomic.write_json(record_path(pool, snapshot_id), asdict(record))
        with self._guard:
            self._records[snapshot_id] = record
            bisect.insort(self._sorted, snapshot_id)
        log.info("snapshot %s of volume %s made by %s in %.1f ms", snapshot_id, source.volume_id, method,
                 (time.perf_counter() - started) * 1e3)
        return record, True

    def delete(self, snapshot_id: str) -> bool:
        """Record first, then data: a crash in between leaves data that start-up removes."""
        record = self.find(snapshot_id)
        if record is None:
            return False
        pool = self.volumes.pools[record.pool]
        atomic.remove(record_path(pool, snapshot_id))
        with self._guard:
            self._records.pop(snapshot_id, None)
            at = bisect.bisect_left(self._sorted, snapshot_id)
            if at < len(self._sorted) and self._sorted[at] == snapshot_id:
                del self._sorted[at]
        remove_data(data_path(pool, snapshot_id))
        return True

    def page(self, start_after: str | None, max_entries: int, snapshot_id: str = "",
             source_volume_id: str = "") -> tuple[list[SnapshotRecord], str | None]:
        with self._guard:
            if snapshot_id:
                found = self._records.get(snapshot_id)
                chosen = [found] if found else []
                return chosen, None
            ids = self._sorted
            start = bisect.bisect_right(ids, start_after) if start_after is not None else 0
            matches = [self._records[i] for i in ids[start:]
                       if not source_volume_id or self._records[i].source_volume_id == source_volume_id]
        if max_entries > 0 and len(matches) > max_entries:
            page = matches[:max_entries]
            return page, page[-1].snapshot_id
        return matches, None

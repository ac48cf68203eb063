"""Snapshots: node-local copies of a volume, made by reflink where the filesystem shares extents.

A pool's snapshots live in `<volumes_dir>/.hpp-csi/snapshots-v2/<id>/`, one folder each holding `record.json`
and `data` (a directory, or a file for block volumes), so no snapshot name can collide with another's data or
record. A snapshot is built in `.tmp-<id>` and renamed into place with its record inside, so it exists exactly
when its folder does; start-up removes `.tmp-*` folders (a snapshot interrupted by a crash). The record is an
empty file whose attribute holds the JSON, as a volume's (store.py): the whole create, or the delete's rename
into the trash, is journal metadata, made durable by one fsync of `snapshots-v2` shared by the calls in flight.
Records written as content (before this, or where no attribute fits) are read as they are.

Drivers before this layout kept `<id>` and `<id>.json` side by side in `.hpp-csi/snapshots/`, where the names
`hk` and `hk.json` collided. Start-up moves each intact old snapshot into the new layout (through
`.migrate-<id>`, resumed after a crash) and reports, and leaves, whatever else is there.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import shutil
import stat
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hpp_csi import errors
from hpp_csi.linux import atomic
from hpp_csi.linux.reflink import clone_file, clone_tree
from hpp_csi.linux.safe_open import UnsafePath, open_dir, opened
from hpp_csi.storage.group_commit import FlushFailed
from hpp_csi.storage.pools import StoragePool
from hpp_csi.storage.store import BadEntry, describe, read_record_file
from hpp_csi.storage.volumes import Volume, VolumeManager, reading_tenant_data

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
MIGRATE_PREFIX = ".migrate-"
RECORD = "record.json"
DATA = "data"


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
    return pool.store.snapshots_dir


def data_path(pool: StoragePool, snapshot_id: str) -> Path:
    return snapshots_dir(pool) / snapshot_id / DATA


def record_path(pool: StoragePool, snapshot_id: str) -> Path:
    return snapshots_dir(pool) / snapshot_id / RECORD


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


def flush_copied_data(destination: Path, method: str) -> None:
    """Copied bytes are page cache, which the journal commit that makes the snapshot exist does not write out;
    shared extents (a reflink) are journal metadata already, and an empty tree has no data."""
    if method in ("reflink", "none"):
        return
    if method == "sparse-copy" and not destination.is_dir():
        with opened(os.open(destination, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)) as fd:
            os.fdatasync(fd)  # one file: cheaper than writing out the whole filesystem
        return
    atomic.sync_filesystem(destination)


def record_bytes(record: SnapshotRecord) -> bytes:
    return json.dumps(asdict(record), sort_keys=True, separators=(",", ":")).encode()


def read_record(folder_fd: int, name: str) -> SnapshotRecord:
    """The record in `name` under `folder_fd` (attribute or content), refusing symlinks, FIFOs and huge files."""
    return SnapshotRecord.from_json(json.loads(read_record_file(folder_fd, name)))


def data_matches(folder_fd: int, name: str, mode: str) -> str:
    """Why the entry `name` is not a snapshot's data of `mode`; "" when it is."""
    try:
        st = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return "its data is missing"
    if (stat.S_ISREG if mode == "block" else stat.S_ISDIR)(st.st_mode):
        return ""
    return f"its data is {describe(st)}, not {'a regular file' if mode == 'block' else 'a directory'}"


class SnapshotManager:
    """Snapshots of every pool; IDs are unique across the node, like volume IDs."""

    def __init__(self, volumes: VolumeManager) -> None:
        self.volumes = volumes
        self.bad_entries = volumes.bad_entries
        self._guard = threading.Lock()
        self._records: dict[str, SnapshotRecord] = {}
        self._sorted: list[str] = []
        # Made, but their flush failed: on disk (maybe only in the page cache), neither listed nor answered
        # until a flush that started after them succeeds (`find` runs one).
        self._unflushed: dict[str, SnapshotRecord] = {}

    def _bad(self, pool: StoragePool, kind: str, path: Path | str, reason: str) -> None:
        self.bad_entries.add(BadEntry(pool.name, kind, str(path), reason))

    # --- start-up -----------------------------------------------------------------------------------------
    def load(self) -> None:
        records: dict[str, SnapshotRecord] = {}
        for pool in self.volumes.pools.values():
            # What a killed driver made may be only in the page cache: flush it before answering from it.
            pool.store.snapshot_commits.wait_durable()
            folder = snapshots_dir(pool)
            with opened(open_dir(folder)) as folder_fd:
                self._migrate(pool, folder_fd)
                for entry in sorted(os.listdir(folder_fd)):
                    record = self._load_one(pool, folder_fd, entry)
                    if record is None:
                        continue
                    if record.snapshot_id in records:
                        self._bad(pool, "snapshot", folder / entry,
                                  f"snapshot {entry!r} also exists in storage pool {records[entry].pool!r}")
                        continue
                    records[record.snapshot_id] = record
        with self._guard:
            self._records = records
            self._sorted = sorted(records)
            self._unflushed = {}

    def _load_one(self, pool: StoragePool, folder_fd: int, name: str) -> SnapshotRecord | None:
        path = snapshots_dir(pool) / name
        st = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
        if name.startswith(TMP_PREFIX) and stat.S_ISDIR(st.st_mode):
            log.info("removing incomplete snapshot %s", path)
            shutil.rmtree(path)
            return None
        if not stat.S_ISDIR(st.st_mode) or name.startswith("."):
            self._bad(pool, "snapshot", path, f"is {describe(st)} the driver did not make")
            return None
        try:
            with opened(open_dir(name, dir_fd=folder_fd)) as snapshot_fd:
                record = read_record(snapshot_fd, RECORD)
                if record.snapshot_id != name:
                    raise ValueError(f"its record names snapshot {record.snapshot_id!r}")
                problem = data_matches(snapshot_fd, DATA, record.mode)
                if problem:
                    raise ValueError(problem)
        except UnsafePath as exc:
            self._bad(pool, "snapshot", path, f"its record is not a regular file ({exc.strerror})")
            return None
        except (ValueError, TypeError, OSError) as exc:
            self._bad(pool, "snapshot", path, f"is unreadable: {exc}")
            return None
        record.pool = pool.name  # where it is stored wins, should the pool have been renamed
        return record

    def _migrate(self, pool: StoragePool, folder_fd: int) -> None:
        """Move intact snapshots of the old flat layout into their own folders; report the rest."""
        for entry in os.listdir(folder_fd):
            if entry.startswith(MIGRATE_PREFIX):
                try:
                    self._finish_migration(pool, folder_fd, entry[len(MIGRATE_PREFIX):])
                except (ValueError, TypeError, OSError) as exc:
                    self._bad(pool, "snapshot", snapshots_dir(pool) / entry, f"is an unfinishable migration: {exc}")
        legacy = pool.store.legacy_snapshots_dir
        try:
            legacy_fd = open_dir(legacy)
        except FileNotFoundError:
            return
        except UnsafePath as exc:
            self._bad(pool, "legacy-snapshot", legacy, f"is not a directory ({exc.strerror})")
            return
        with opened(legacy_fd):
            names = set(os.listdir(legacy_fd))
            moved: set[str] = set()
            for name in sorted(names):
                if not name.endswith(".json") or name.startswith("."):
                    continue
                snapshot_id = name[: -len(".json")]
                try:
                    record = read_record(legacy_fd, name)
                except (ValueError, TypeError, OSError):
                    continue  # not a record (maybe the data of a snapshot named *.json): judged below
                if record.snapshot_id != snapshot_id or data_matches(legacy_fd, snapshot_id, record.mode):
                    continue
                if os.path.lexists(snapshots_dir(pool) / snapshot_id):
                    continue
                self._migrate_one(pool, folder_fd, legacy_fd, record)
                moved.update((name, snapshot_id))
            for name in sorted(names - moved):
                st = os.stat(name, dir_fd=legacy_fd, follow_symlinks=False)
                if name.startswith(".") and (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                    log.info("removing incomplete snapshot data %s of the old layout", legacy / name)
                    remove_data(legacy / name)  # an interrupted copy or record write of the old driver
                    continue
                self._bad(pool, "legacy-snapshot", legacy / name,
                          f"is {describe(st)} that is not an intact snapshot of the old layout (no record naming "
                          "it with matching data); not migrated")
            if not os.listdir(legacy_fd):
                os.rmdir(legacy)
                log.info("storage pool %s: snapshots moved to %s", pool.name, snapshots_dir(pool))

    def _migrate_one(self, pool: StoragePool, folder_fd: int, legacy_fd: int, record: SnapshotRecord) -> None:
        """record.json first, then the data, then the folder into place: each step resumable after a crash."""
        snapshot_id = record.snapshot_id
        staging = MIGRATE_PREFIX + snapshot_id
        with contextlib.suppress(FileExistsError):  # a migration a crash interrupted
            os.mkdir(staging, 0o700, dir_fd=folder_fd)
        record.pool = pool.name
        pool.store.write_record(str(snapshots_dir(pool) / staging), RECORD, record_bytes(record))
        with opened(open_dir(staging, dir_fd=folder_fd)) as staging_fd:
            os.rename(snapshot_id, DATA, src_dir_fd=legacy_fd, dst_dir_fd=staging_fd)
        self._finish_migration(pool, folder_fd, snapshot_id)
        log.info("storage pool %s: snapshot %s moved to the new layout", pool.name, snapshot_id)

    def _finish_migration(self, pool: StoragePool, folder_fd: int, snapshot_id: str) -> None:
        """Put a migrated snapshot in place and drop its old record; nothing when its data is not moved yet."""
        staging = MIGRATE_PREFIX + snapshot_id
        with opened(open_dir(staging, dir_fd=folder_fd)) as staging_fd:
            if data_matches(staging_fd, DATA, "block") and data_matches(staging_fd, DATA, "mount"):
                return  # the data is still in the old folder: the migration runs again from the start
            if data_matches(staging_fd, DATA, read_record(staging_fd, RECORD).mode):
                raise ValueError("its data does not match its record")
        os.rename(staging, snapshot_id, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
        os.fsync(folder_fd)
        legacy = pool.store.legacy_snapshots_dir
        if not os.path.lexists(legacy / snapshot_id):
            (legacy / f"{snapshot_id}.json").unlink(missing_ok=True)
            atomic.fsync_dir(legacy)

    # --- lookup -------------------------------------------------------------------------------------------
    def find(self, snapshot_id: str) -> SnapshotRecord | None:
        """The snapshot, once durable: one whose flush failed is flushed now (FlushFailed if that fails too)."""
        with self._guard:
            record = self._records.get(snapshot_id)
            pending = self._unflushed.get(snapshot_id) if record is None else None
        if pending is None:
            return record
        self.volumes.pools[pending.pool].store.snapshot_commits.wait_durable()
        with self._guard:
            if self._unflushed.pop(snapshot_id, None) is not None:
                self._add(pending)
        return pending

    def _add(self, record: SnapshotRecord) -> None:
        """Index a durable snapshot (the caller holds the guard)."""
        if record.snapshot_id not in self._records:
            bisect.insort(self._sorted, record.snapshot_id)
        self._records[record.snapshot_id] = record

    def get(self, snapshot_id: str) -> SnapshotRecord:
        record = self.find(snapshot_id)
        if record is None:
            raise errors.not_found(f"snapshot {snapshot_id!r} does not exist on this node")
        return record

    def path_of(self, record: SnapshotRecord) -> Path:
        return data_path(self.volumes.pools[record.pool], record.snapshot_id)

    # --- changes (callers hold the locks) -----------------------------------------------------------------
    def create(self, snapshot_id: str, source: Volume) -> tuple[SnapshotRecord, bool]:
        """Snapshot `source` (callers hold the locks of both IDs and checked the ID is free); (record, created)."""
        pool = source.pool
        final = snapshots_dir(pool) / snapshot_id
        if os.path.lexists(final):
            raise errors.failed_precondition(
                f"snapshot {snapshot_id!r}: {final} exists but is not a snapshot the driver can read (see the "
                "driver's log); it is left alone: move it away by hand, or use another name"
            )
        staging = snapshots_dir(pool) / f"{TMP_PREFIX}{snapshot_id}"
        remove_data(staging)
        started = time.perf_counter()
        description = f"volume {source.volume_id!r}"
        try:
            staging.mkdir(mode=0o700)
            with reading_tenant_data(description, source.path, source.record.mode):
                method = copy_entry(source.path, staging / DATA, source.record.mode)
            flush_copied_data(staging / DATA, method)
            record = SnapshotRecord(
                snapshot_id=snapshot_id, source_volume_id=source.volume_id, pool=pool.name,
                size_bytes=source.record.capacity_bytes, created_ns=time.time_ns(), mode=source.record.mode,
                method=method,
            )
            pool.store.write_record(str(staging), RECORD, record_bytes(record))
            os.rename(staging, final)  # the snapshot exists from here, once flushed
        except BaseException:
            remove_data(staging)
            raise
        try:
            pool.store.snapshot_commits.wait_durable()
        except FlushFailed:
            with self._guard:
                self._unflushed[snapshot_id] = record  # the retry finds it, flushes, and answers it as it is
            raise
        with self._guard:
            self._add(record)
        log.info("snapshot %s of volume %s made by %s in %.1f ms", snapshot_id, source.volume_id, method,
                 (time.perf_counter() - started) * 1e3)
        return record, True

    def delete(self, snapshot_id: str) -> bool:
        """The folder is moved to the trash in one rename (the snapshot is gone), then deleted."""
        record = self.find(snapshot_id)
        if record is None:
            return False
        pool = self.volumes.pools[record.pool]
        trashed = pool.store.trash_dir / f"snapshot-{snapshot_id}.{time.time_ns()}"
        # The snapshot is gone from here, once flushed; no folder: an attempt whose flush failed moved it.
        with contextlib.suppress(FileNotFoundError):
            os.rename(snapshots_dir(pool) / snapshot_id, trashed)
        try:
            pool.store.snapshot_commits.wait_durable()
        except FlushFailed:
            with contextlib.suppress(OSError):  # the flush's error is the one to report; start-up purges the rest
                pool.discard_path(trashed)
            raise  # still listed: its removal is not known to be durable
        with self._guard:
            self._records.pop(snapshot_id, None)
            at = bisect.bisect_left(self._sorted, snapshot_id)
            if at < len(self._sorted) and self._sorted[at] == snapshot_id:
                del self._sorted[at]
        pool.discard_path(trashed)  # nothing when the rename found no folder
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

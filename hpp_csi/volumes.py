"""The volumes of every pool on this node: lookup, creation, deletion, paging; the part the CSI services share.

The index (volume ID -> pool) is rebuilt from the disk at start-up by listing names only; records are read
lazily and cached, so start-up stays fast with many volumes and a restart answers exactly as before.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from hpp_csi import errors
from hpp_csi.config import LEGACY_POOL
from hpp_csi.locks import KeyedLocks
from hpp_csi.pools import StoragePool
from hpp_csi.reflink import clone_file, clone_tree
from hpp_csi.store import VolumeRecord

log = logging.getLogger(__name__)

POOL_PARAMETER = "storagePool"
SIZE_ENFORCED_KEY = "sizeEnforced"
DIR_MODE = 0o777  # VM pods run as an unprivileged user (qemu, 107): the volume must be writable for them


@dataclass(frozen=True)
class Volume:
    record: VolumeRecord
    pool: StoragePool

    @property
    def volume_id(self) -> str:
        return self.record.volume_id

    @property
    def path(self) -> Path:
        return self.pool.volume_path(self.record.volume_id)

    def exists_on_disk(self) -> bool:
        return os.path.lexists(self.path)


@dataclass(frozen=True)
class CreateSpec:
    """A volume as CreateVolume (or an ephemeral publish) asks for it."""

    volume_id: str
    pool: StoragePool
    capacity_bytes: int
    required_bytes: int = 0
    limit_bytes: int = 0
    parameters: dict[str, str] = field(default_factory=dict)
    mode: str = "mount"
    ephemeral: bool = False
    content_source: dict[str, str] | None = None
    source: Source | None = None


@dataclass(frozen=True)
class Source:
    """Data a new volume starts from: another volume's or a snapshot's."""

    path: Path
    mode: str
    capacity_bytes: int
    description: str


def resolve_capacity(required: int, limit: int) -> int:
    """The capacity to give a volume for a CSI capacity range (0 means none was asked for)."""
    if required < 0 or limit < 0:
        raise errors.invalid_argument("capacity_range must not hold negative sizes")
    if required and limit and limit < required:
        raise errors.invalid_argument(f"capacity_range: limit_bytes {limit} is smaller than required_bytes {required}")
    return required or limit


def capacity_fits(capacity: int, required: int, limit: int) -> bool:
    """Whether an existing volume's capacity satisfies a capacity range (CreateVolume idempotency)."""
    if not required and not limit:
        return True
    return capacity >= required and (not limit or capacity <= limit)


class VolumeManager:
    """All pools of the node and the volumes in them; every method is safe to call from many threads."""

    def __init__(self, pools: list[StoragePool]) -> None:
        self.pools = {pool.name: pool for pool in pools}
        self.locks = KeyedLocks()
        self._guard = threading.Lock()
        self._index: dict[str, str] = {}
        self._sorted: list[str] = []
        self._records: dict[str, VolumeRecord] = {}
        self._committed: dict[str, int] = {}  # per quota pool: bytes promised to its volumes

    # --- start-up -----------------------------------------------------------------------------------------
    def load(self) -> None:
        """Rebuild the index from the disk; finish deletions a crash interrupted."""
        index: dict[str, str] = {}
        for pool in self.pools.values():
            pool.purge_trash()
            for volume_id in pool.scan():
                if volume_id in index:
                    log.warning("volume %s exists in pools %r and %r; using %r", volume_id, index[volume_id],
                                pool.name, index[volume_id])
                    continue
                index[volume_id] = pool.name
        with self._guard:
            self._index = index
            self._sorted = sorted(index)
            self._records = {}
            self._committed = {}

    # --- pools --------------------------------------------------------------------------------------------
    def pool_named(self, name: str) -> StoragePool:
        pool = self.pools.get(name)
        if pool is None:
            known = ", ".join(sorted(self.pools)) or "none"
            raise errors.invalid_argument(f"unknown storage pool {name!r}; this node has: {known}")
        return pool

    def pool_for(self, parameters: dict[str, str], fallback_to_first: bool = False) -> StoragePool:
        """The pool a request names with `storagePool`, else the pool named `legacy` as HPP does (ephemeral
        volumes fall back to the first pool, HPP's default pool)."""
        name = parameters.get(POOL_PARAMETER)
        if name is not None:
            return self.pool_named(name)
        if LEGACY_POOL in self.pools:
            return self.pools[LEGACY_POOL]
        if fallback_to_first and self.pools:
            return next(iter(self.pools.values()))
        known = ", ".join(sorted(self.pools))
        raise errors.invalid_argument(
            f"parameter {POOL_PARAMETER!r} is required (no pool is named {LEGACY_POOL!r}); this node has: {known}"
        )

    # --- lookup -------------------------------------------------------------------------------------------
    def find(self, volume_id: str) -> Volume | None:
        with self._guard:
            pool_name = self._index.get(volume_id)
            record = self._records.get(volume_id)
        if pool_name is None:
            return None
        pool = self.pools[pool_name]
        if record is None:
            record = pool.store.load(volume_id) or self._adopted(volume_id, pool)
            with self._guard:
                if self._index.get(volume_id) == pool_name:
                    self._records[volume_id] = record
        return Volume(record, pool)

    def get(self, volume_id: str) -> Volume:
        volume = self.find(volume_id)
        if volume is None:
            raise errors.not_found(f"volume {volume_id!r} does not exist on this node")
        return volume

    @staticmethod
    def _adopted(volume_id: str, pool: StoragePool) -> VolumeRecord:
        """A record for a volume found on disk without metadata."""
        path = pool.volume_path(volume_id)
        mode = "block" if path.is_file() else "mount"
        capacity = path.stat().st_size if mode == "block" and path.exists() else 0
        return VolumeRecord(volume_id=volume_id, pool=pool.name, capacity_bytes=capacity, mode=mode, adopted=True,
                            context={POOL_PARAMETER: pool.name})

    def page(self, start_after: str | None, max_entries: int) -> tuple[list[Volume], str | None]:
        """Volumes in ID order after `start_after`; the ID to continue after, or None at the end."""
        with self._guard:
            start = bisect.bisect_right(self._sorted, start_after) if start_after is not None else 0
            stop = len(self._sorted) if max_entries <= 0 else start + max_entries
            ids = self._sorted[start:stop]
            more = stop < len(self._sorted)
        volumes = [v for v in (self.find(i) for i in ids) if v is not None]
        return volumes, (ids[-1] if more and ids else None)

    def count(self) -> int:
        with self._guard:
            return len(self._index)

    def count_by_pool(self) -> dict[str, int]:
        counts = dict.fromkeys(self.pools, 0)
        with self._guard:
            for pool_name in self._index.values():
                counts[pool_name] += 1
        return counts

    # --- space ------------------------------------------------------------------------------------------
    def committed_bytes(self, pool: StoragePool) -> int:
        """Capacity promised to the pool's volumes; read from every record once, then kept up to date."""
        with self._guard:
            if pool.name in self._committed:
                return self._committed[pool.name]
            ids = [i for i, name in self._index.items() if name == pool.name]
        total = 0
        for volume_id in ids:
            volume = self.find(volume_id)
            total += volume.record.capacity_bytes if volume else 0
        with self._guard:
            self._committed.setdefault(pool.name, total)
            return self._committed[pool.name]

    def _commit(self, pool: StoragePool, delta: int) -> None:
        with self._guard:
            if pool.name in self._committed:
                self._committed[pool.name] += delta

    def available_for_new(self, pool: StoragePool) -> int:
        """What a new volume may ask for. Where sizes are enforced every volume must be able to fill its quota,
        so promised capacity is not handed out twice; elsewhere volumes are thin and free space is the limit."""
        capacity = pool.capacity()
        if not pool.quota:
            return capacity.available_bytes
        unpromised = capacity.total_bytes - self.committed_bytes(pool)
        return max(0, min(capacity.available_bytes, unpromised))

    def size_enforced(self, pool: StoragePool, mode: str, capacity: int) -> bool:
        return mode == "block" or (pool.quota and capacity > 0)

    # --- changes (callers hold self.locks for the volume ID) ----------------------------------------------
    def create(self, spec: CreateSpec) -> tuple[Volume, bool]:
        """Create the volume, or return the existing one when compatible; (volume, created)."""
        existing = self.find(spec.volume_id)
        if existing is not None:
            return self._reuse(existing, spec), False
        self._check_space(spec)
        record = self._record_for(spec)
        path = spec.pool.volume_path(spec.volume_id)
        # Data first, metadata second: a crash in between leaves an entry that a retry adopts.
        self._make_entry(path, spec, record)
        spec.pool.store.save(record)
        self._remember(record)
        if spec.pool.quota:
            self._commit(spec.pool, record.capacity_bytes)
        return Volume(record, spec.pool), True

    def _record_for(self, spec: CreateSpec) -> VolumeRecord:
        enforced = self.size_enforced(spec.pool, spec.mode, spec.capacity_bytes)
        context = {**spec.parameters, POOL_PARAMETER: spec.pool.name, SIZE_ENFORCED_KEY: str(enforced).lower()}
        return VolumeRecord(
            volume_id=spec.volume_id,
            pool=spec.pool.name,
            capacity_bytes=spec.capacity_bytes,
            parameters=dict(spec.parameters),
            mode=spec.mode,
            ephemeral=spec.ephemeral,
            content_source=spec.content_source,
            context=context,
        )

    def _reuse(self, existing: Volume, spec: CreateSpec) -> Volume:
        record = existing.record
        if record.adopted:
            # A create that crashed before its metadata was written, or a volume made by another driver:
            # finish it with what the caller asks for now.
            if existing.pool.name != spec.pool.name:
                raise errors.already_exists(
                    f"volume {spec.volume_id!r} already exists in storage pool {existing.pool.name!r}, "
                    f"not in {spec.pool.name!r}"
                )
            adopted = self._record_for(spec)
            if not existing.exists_on_disk() or spec.source is None:
                self._make_entry(existing.path, spec, adopted)
            spec.pool.store.save(adopted)
            self._remember(adopted)
            with self._guard:
                self._committed.pop(spec.pool.name, None)  # recount: the adopted volume was counted as 0
            return Volume(adopted, spec.pool)
        conflicts = []
        if record.pool != spec.pool.name:
            conflicts.append(f"storage pool {record.pool!r} (asked: {spec.pool.name!r})")
        if record.parameters != spec.parameters:
            conflicts.append(f"parameters {record.parameters} (asked: {spec.parameters})")
        if not capacity_fits(record.capacity_bytes, spec.required_bytes, spec.limit_bytes):
            conflicts.append(f"capacity {record.capacity_bytes} bytes (asked: {spec.required_bytes or 'any'} to "
                             f"{spec.limit_bytes or 'any'} bytes)")
        if record.mode != spec.mode:
            conflicts.append(f"access type {record.mode} (asked: {spec.mode})")
        if record.content_source != spec.content_source:
            conflicts.append(f"content source {record.content_source} (asked: {spec.content_source})")
        if conflicts:
            raise errors.already_exists(
                f"volume {spec.volume_id!r} already exists with different " + "; ".join(conflicts)
            )
        if not existing.exists_on_disk():
            self._make_entry(existing.path, spec, record)  # metadata without data: finish the interrupted create
        return existing

    def _check_space(self, spec: CreateSpec) -> None:
        available = self.available_for_new(spec.pool)
        if spec.capacity_bytes > available:
            what = "not yet promised to other volumes" if spec.pool.quota else "available"
            raise errors.out_of_range(
                f"volume {spec.volume_id!r} asks for {spec.capacity_bytes} bytes but storage pool "
                f"{spec.pool.name!r} has {available} bytes {what}"
            )

    def _make_entry(self, path: Path, spec: CreateSpec, record: VolumeRecord) -> None:
        """Make the volume's data at `path`; a volume from a source is built aside and renamed into place."""
        if spec.source is None:
            self._make_empty(path, spec, record)
            return
        staging = spec.pool.store.staging_dir / spec.volume_id
        spec.pool.discard_path(staging)
        try:
            if spec.mode == "block":
                method = clone_file(spec.source.path, staging).value
                with open(staging, "r+b") as f:
                    if os.fstat(f.fileno()).st_size < spec.capacity_bytes:
                        f.truncate(spec.capacity_bytes)
                    os.fsync(f.fileno())
            else:
                self._make_empty(staging, spec, record)
                method = clone_tree(spec.source.path, staging).method
                os.chmod(staging, DIR_MODE)
            os.rename(staging, path)
        except BaseException:
            spec.pool.discard_path(staging)
            raise
        record.extra["cloned_by"] = method
        log.info("volume %s filled from %s by %s", spec.volume_id, spec.source.description, method)

    @staticmethod
    def _make_empty(path: Path, spec: CreateSpec, record: VolumeRecord) -> None:
        if spec.mode == "block":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o660)
            try:
                if os.fstat(fd).st_size < spec.capacity_bytes:
                    os.ftruncate(fd, spec.capacity_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            if path.is_symlink() or not path.is_dir():
                raise errors.already_exists(f"{path} exists and is not a volume directory") from None
        os.chmod(path, DIR_MODE, follow_symlinks=False)
        if spec.pool.quota:
            record.extra["project"] = spec.pool.assign_quota(path, spec.capacity_bytes)

    def _remember(self, record: VolumeRecord) -> None:
        with self._guard:
            if record.volume_id not in self._index:
                bisect.insort(self._sorted, record.volume_id)
            self._index[record.volume_id] = record.pool
            self._records[record.volume_id] = record

    def expand(self, volume: Volume, capacity: int) -> VolumeRecord:
        """Grow a volume to `capacity` bytes (never shrink): the quota for a directory, the file for block."""
        record = volume.record
        if capacity <= record.capacity_bytes:
            return record
        growth = capacity - record.capacity_bytes
        # The same rule as a new volume's: within what is not promised (quota pools) or free (thin pools).
        available = self.available_for_new(volume.pool)
        if growth > available:
            what = "not yet promised to other volumes" if volume.pool.quota else "available"
            raise errors.out_of_range(
                f"volume {volume.volume_id!r} cannot grow by {growth} bytes: storage pool {volume.pool.name!r} has "
                f"{available} bytes {what}"
            )
        if record.mode == "block":
            with open(volume.path, "r+b") as f:
                f.truncate(capacity)
                os.fsync(f.fileno())
        elif volume.pool.quota:
            volume.pool.resize_quota(volume.path, capacity)
        grown = replace(record, capacity_bytes=capacity, extra=dict(record.extra))
        volume.pool.store.save(grown)
        self._remember(grown)
        if volume.pool.quota:
            self._commit(volume.pool, growth)
        return grown

    def delete(self, volume_id: str) -> bool:
        """Delete the volume's data then its metadata; False when it did not exist."""
        volume = self.find(volume_id)
        if volume is None:
            return False
        if volume.pool.quota and volume.record.mode == "mount" and volume.path.is_dir():
            volume.pool.release_quota(volume.path)
        volume.pool.discard(volume_id)
        volume.pool.store.remove(volume_id)
        with self._guard:
            self._index.pop(volume_id, None)
            self._records.pop(volume_id, None)
            at = bisect.bisect_left(self._sorted, volume_id)
            if at < len(self._sorted) and self._sorted[at] == volume_id:
                del self._sorted[at]
        if volume.pool.quota:
            self._commit(volume.pool, -volume.record.capacity_bytes)
        return True

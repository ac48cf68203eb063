"""The volumes of every pool on this node: lookup, creation, deletion, paging; the part the CSI services share.

The index (volume ID -> pool) is rebuilt from the disk at start-up and every record is read once and cached
(one small file each), so a bad record is found and reported at start, and a restart answers exactly as before.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

from hpp_csi import errors
from hpp_csi.config import LEGACY_POOL
from hpp_csi.linux.reflink import clone_file, clone_tree
from hpp_csi.linux.safe_open import open_dir, opened
from hpp_csi.storage.block_publish import open_image
from hpp_csi.storage.group_commit import FlushFailed
from hpp_csi.storage.locks import KeyedLocks
from hpp_csi.storage.pools import StoragePool
from hpp_csi.storage.store import BadEntries, BadEntry, VolumeRecord, describe

log = logging.getLogger(__name__)

POOL_PARAMETER = "storagePool"
SIZE_ENFORCED_KEY = "sizeEnforced"
# Filesystem volume directories are root:107 with mode 2770 (rwxrws---), not HPP's world-writable 0777.
# Who must write: virt-launcher runs qemu as uid/gid 107 (qemu) and CDI's importer/upload pods run as 107 too.
# With an fsGroup (KubeVirt and CDI set one; the CSIDriver says fsGroupPolicy: File) kubelet gives the group to
# the fsGroup and adds g+rwx and setgid itself, so group access is all any pod needs. Without an fsGroup,
# group 107 still lets qemu write. "Other" gets nothing: no other user on the node can read or write a
# tenant's volume. setgid keeps files made in the volume in the volume's group.
DIR_MODE = 0o2770
VOLUME_GID = 107
# Errors of a copy that met something other than what it expected in the tenant's data (a swap, a vanished
# entry): the volume's data is not in a state to copy, which is the caller's precondition, not our failure.
_SWAPPED = frozenset({errno.ELOOP, errno.ENOTDIR, errno.EINVAL, errno.ENOENT, errno.EXDEV})


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

    def data_problem(self) -> str:
        """Why the entry at the volume's path is not its data as the record says; "" when it is."""
        return data_problem(self.path, self.record.mode)


def data_problem(path: Path, mode: str) -> str:
    """Why `path` is not a volume's data of `mode` ("block": a regular file, else a directory); "" when it is."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "is missing"
    if (stat.S_ISREG if mode == "block" else stat.S_ISDIR)(st.st_mode):
        return ""
    found = describe(st)
    if stat.S_ISLNK(st.st_mode):
        with suppress(OSError):  # swapped again since the lstat: "a symlink" is what was seen
            found += f" to {os.readlink(path)!r}"
    return f"is {found}, not {'a regular file' if mode == 'block' else 'a directory'}"


def unusable(description: str, path: Path, problem: str) -> errors.CsiError:
    return errors.failed_precondition(
        f"{description}: its data {path} {problem}, not what its record says; the driver does not read through "
        "it. Restore the data at that path (or delete the volume) and retry"
    )


@contextmanager
def reading_tenant_data(description: str, path: Path, mode: str) -> Iterator[None]:
    """Check `path` holds data of `mode` before a copy, and turn a swap met during it into FAILED_PRECONDITION."""
    problem = data_problem(path, mode)
    if problem:
        raise unusable(description, path, problem)
    try:
        yield
    except OSError as exc:
        if exc.errno not in _SWAPPED:
            raise
        raise unusable(description, path, data_problem(path, mode) or f"changed during the copy ({exc.strerror})"
                       ) from None


def secure_volume_dir(path: Path) -> None:
    """Give a volume directory the group and mode of DIR_MODE's note, without following a symlink at `path`."""
    with opened(open_dir(path)) as fd:
        os.fchown(fd, -1, VOLUME_GID)
        os.fchmod(fd, DIR_MODE)


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
        # Volumes made whose flush failed: on disk (maybe only in the page cache), so a retry must flush again
        # before it answers. Kept in the index, so the retry finds the volume instead of rebuilding it.
        self._unflushed: set[str] = set()
        self.bad_entries = BadEntries()

    # --- start-up -----------------------------------------------------------------------------------------
    def load(self) -> None:
        """Rebuild the index from the disk and read every record; finish deletions a crash interrupted.

        A bad entry is reported in `bad_entries` and left alone; its volume, if any, is still listed.
        """
        index: dict[str, str] = {}
        records: dict[str, VolumeRecord] = {}
        for pool in self.pools.values():
            # What a killed driver wrote may still be only in the page cache: flush it before answering from it,
            # or a retried call could confirm a change a power cut then loses.
            pool.store.commits.wait_durable()
            pool.purge_trash()
            with opened(pool.store.open_folder()) as folder:
                self._load_pool(pool, folder, index, records)
        with self._guard:
            self._index = index
            self._sorted = sorted(index)
            self._records = records
            self._committed = {}

    def _load_pool(self, pool: StoragePool, folder: int, index: dict[str, str],
                   records: dict[str, VolumeRecord]) -> None:
        """Index the volumes of one pool and read their records through `folder` (opened once)."""
        for volume_id in pool.scan(self.bad_entries):
            if volume_id in index:
                log.warning("volume %s exists in pools %r and %r; using %r", volume_id, index[volume_id],
                            pool.name, index[volume_id])
                continue
            index[volume_id] = pool.name
            record, problem = pool.store.read(volume_id, folder)
            if problem:
                self.bad_entries.add(BadEntry(pool.name, "volume-record", str(pool.store.path_of(volume_id)),
                                              problem, volume_id))
            if record is not None:
                record.pool = pool.name  # where it is stored wins, should the pool have been renamed
                records[volume_id] = record

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
        try:
            st = os.lstat(pool.volume_path(volume_id))
        except FileNotFoundError:
            st = None
        mode = "block" if st is not None and stat.S_ISREG(st.st_mode) else "mount"
        capacity = st.st_size if st is not None and mode == "block" else 0
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
        try:
            spec.pool.store.save(record)
        except FlushFailed:
            self._added(spec.pool, record)
            with self._guard:
                self._unflushed.add(spec.volume_id)
            raise
        self._added(spec.pool, record)
        return Volume(record, spec.pool), True

    def _added(self, pool: StoragePool, record: VolumeRecord) -> None:
        self._remember(record)
        if pool.quota:
            self._commit(pool, record.capacity_bytes)

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
            with self._guard:
                self._unflushed.add(spec.volume_id)
        with self._guard:
            unflushed = spec.volume_id in self._unflushed
        if unflushed:
            existing.pool.store.commits.wait_durable()
            with self._guard:
                self._unflushed.discard(spec.volume_id)
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
        source = spec.source
        try:
            if spec.mode == "block":
                with reading_tenant_data(source.description, source.path, source.mode):
                    method = clone_file(source.path, staging).value
                fd = os.open(staging, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
                with opened(fd):
                    if os.fstat(fd).st_size < spec.capacity_bytes:
                        os.ftruncate(fd, spec.capacity_bytes)
                    os.fsync(fd)
            else:
                self._make_empty(staging, spec, record)
                with reading_tenant_data(source.description, source.path, source.mode):
                    method = clone_tree(source.path, staging).method
                secure_volume_dir(staging)
            os.rename(staging, path)
        except BaseException:
            spec.pool.discard_path(staging)
            raise
        record.extra["cloned_by"] = method
        log.info("volume %s filled from %s by %s", spec.volume_id, spec.source.description, method)

    @staticmethod
    def _make_empty(path: Path, spec: CreateSpec, record: VolumeRecord) -> None:
        """No fsync: a new entry and its size are metadata, made durable by the record's flush that follows."""
        if spec.mode == "block":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o660)
            try:
                if os.fstat(fd).st_size < spec.capacity_bytes:
                    os.ftruncate(fd, spec.capacity_bytes)
            finally:
                os.close(fd)
            return
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if path.is_symlink() or not path.is_dir():
                raise errors.already_exists(f"{path} exists and is not a volume directory") from None
        secure_volume_dir(path)
        if spec.pool.quota:
            record.extra["project"] = spec.pool.assign_quota(path, spec.capacity_bytes)

    def _remember(self, record: VolumeRecord) -> None:
        if self.bad_entries:  # a path built only when something could be forgotten: this is every create's path
            self.bad_entries.forget(str(self.pools[record.pool].store.path_of(record.volume_id)))
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
            # The file in the pool, by descriptor: a symlink, FIFO or device swapped in is refused, never grown.
            fd = open_image(volume.path, os.O_RDWR)
            try:
                if os.fstat(fd).st_size < capacity:
                    os.ftruncate(fd, capacity)  # metadata: durable with the record's flush below
            finally:
                os.close(fd)
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
        volume.pool.store.check_removable(volume_id)  # before the data goes: a record we cannot drop stops here
        if volume.pool.quota and volume.record.mode == "mount" and not volume.data_problem():
            volume.pool.release_quota(volume.path)
        volume.pool.discard(volume_id)
        volume.pool.store.remove(volume_id)
        if self.bad_entries:
            self.bad_entries.forget(str(volume.pool.store.path_of(volume_id)))
        with self._guard:
            self._index.pop(volume_id, None)
            self._records.pop(volume_id, None)
            self._unflushed.discard(volume_id)
            at = bisect.bisect_left(self._sorted, volume_id)
            if at < len(self._sorted) and self._sorted[at] == volume_id:
                del self._sorted[at]
        if volume.pool.quota:
            self._commit(volume.pool, -volume.record.capacity_bytes)
        return True

"""StoragePool: one configured pool on this node, its layout on disk and its capacity."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from hpp_csi.config import PoolConfig
from hpp_csi.linux import mounts, xfs
from hpp_csi.names import RESERVED_NAMES
from hpp_csi.storage.pool_device import PoolDeviceError, mount_pool
from hpp_csi.storage.store import BadEntries, BadEntry, MetadataStore, describe

log = logging.getLogger(__name__)


class PoolError(RuntimeError):
    """A pool cannot be used; the message names the pool and the path."""


@dataclass(frozen=True)
class Capacity:
    total_bytes: int
    available_bytes: int
    used_bytes: int
    total_inodes: int
    free_inodes: int


class StoragePool:
    """A folder holding volumes, one entry per volume, with the driver's metadata in a hidden folder beside them."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.name = config.name
        self.volumes_dir = config.volumes_dir
        self.store = MetadataStore(config.volumes_dir)
        self.quota = False  # volume sizes enforced by XFS project quotas
        self.quota_reason = "not checked yet"
        self._projects: set[int] | None = None
        self._project_lock = threading.Lock()

    def prepare(self, mount_devices: bool = True) -> None:
        """Create the pool's folders (mounting its device first when it has one), or explain why not."""
        if mount_devices and (self.config.device or self.config.size):
            try:
                mounted = mount_pool(self.config)
            except (PoolDeviceError, xfs.DeviceNotBlank, xfs.CommandFailed, OSError) as exc:
                prefix, message = f"storage pool {self.name!r}: ", str(exc)
                # PoolDeviceError names the pool already: say it once
                raise PoolError(message if message.startswith(prefix) else prefix + message) from exc
            log.info("storage pool %s: %s mounted at %s", self.name, mounted.device, mounted.mount_point)
        try:
            self.volumes_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise PoolError(
                f"storage pool {self.name!r}: path {self.volumes_dir} does not exist and cannot be created: "
                f"{exc.strerror}"
            ) from exc
        if self.volumes_dir.is_symlink() or not self.volumes_dir.is_dir():
            what = "a symlink (give the real path)" if self.volumes_dir.is_symlink() else "not a directory"
            raise PoolError(f"storage pool {self.name!r}: {self.volumes_dir} is {what}")
        try:
            self.store.prepare()
        except OSError as exc:
            raise PoolError(f"storage pool {self.name!r}: cannot write in {self.volumes_dir}: {exc.strerror}") from exc
        self._check_own_folders()
        self.quota, self.quota_reason = self._detect_quota()
        if not self.quota:
            log.warning("storage pool %s: volume sizes are not enforced (%s)", self.name, self.quota_reason)

    def _check_own_folders(self) -> None:
        """The driver's folders are where it deletes and renames: it refuses to start rather than work through a
        symlink (or anything else) put in their place, which would point its clean-up at another tree."""
        for folder in self.store.own_folders():
            st = os.lstat(folder)
            if not stat.S_ISDIR(st.st_mode):
                raise PoolError(
                    f"storage pool {self.name!r}: {folder} is {describe(st)}, not the driver's folder; the driver "
                    "will not work through it. Move it away (the driver recreates the folder) and restart"
                )

    def _detect_quota(self) -> tuple[bool, str]:
        entry = mounts.mount_containing(self.volumes_dir)
        if entry.fstype != "xfs":
            return False, f"{entry.fstype} filesystem: project quotas need XFS"
        if not {"prjquota", "pquota"} & entry.super_options:
            return False, f"XFS at {entry.mount_point} is not mounted with prjquota"
        return True, ""

    # --- project quotas (sizes enforced) ------------------------------------------------------------------
    def assign_quota(self, directory: Path, capacity: int) -> int:
        """Give a new volume directory its own project ID with a hard limit of `capacity` bytes."""
        with self._project_lock:
            if self._projects is None:
                self._projects = xfs.used_project_ids(self.volumes_dir)
            current = xfs.project_id(directory)
            project = current if current >= xfs.FIRST_PROJECT_ID else xfs.choose_project_id(self._projects)
            self._projects.add(project)
        xfs.set_project(directory, project)
        if capacity:
            xfs.set_project_limit(self.volumes_dir, project, capacity)
        return project

    def resize_quota(self, directory: Path, capacity: int) -> None:
        xfs.set_project_limit(self.volumes_dir, xfs.project_id(directory), capacity)

    def release_quota(self, directory: Path) -> None:
        """Drop the limit of a volume about to be deleted (its project ID becomes free again)."""
        project = xfs.project_id(directory)
        if project < xfs.FIRST_PROJECT_ID:
            return
        xfs.remove_project_limit(self.volumes_dir, project)
        with self._project_lock:
            if self._projects is not None:
                self._projects.discard(project)

    def quota_usage(self, directory: Path) -> xfs.ProjectQuota:
        return xfs.project_quota(self.volumes_dir, xfs.project_id(directory))

    def problem(self) -> str | None:
        """Why the pool cannot serve calls now, or None when it can."""
        if not self.store.records_dir.is_dir():
            return f"storage pool {self.name!r}: {self.volumes_dir} is missing"
        if not os.access(self.store.records_dir, os.W_OK):
            return f"storage pool {self.name!r}: {self.volumes_dir} is not writable"
        try:
            os.statvfs(self.volumes_dir)
        except OSError as exc:
            return f"storage pool {self.name!r}: statfs {self.volumes_dir} failed: {exc.strerror}"
        return None

    def capacity(self) -> Capacity:
        st = os.statvfs(self.volumes_dir)
        total = st.f_blocks * st.f_frsize
        return Capacity(
            total_bytes=total,
            available_bytes=st.f_bavail * st.f_frsize,
            used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
            total_inodes=st.f_files,
            free_inodes=st.f_favail,
        )

    def shares_os_filesystem(self, host_root: Path = Path("/")) -> bool:
        """True when the pool sits on the filesystem of the OS's root (a risk: it can fill the OS partition).
        In a container `/` is an overlay: `host_root` is where the host's `/` is mounted (bind mounts keep the
        device number, so the comparison is the host's)."""
        return os.stat(self.volumes_dir).st_dev == os.stat(host_root).st_dev

    def volume_path(self, volume_id: str) -> Path:
        return self.volumes_dir / volume_id

    def scan(self, bad: BadEntries | None = None) -> set[str]:
        """IDs of the volumes present: metadata files, and entries on disk (volumes made before a crash or by
        HPP's Go driver, which keeps no metadata). Other entries (a symlink, a FIFO...) are reported to `bad`."""
        ids = set(self.store.ids(self.name, bad))
        if bad is not None:
            known = {folder.name for folder in self.store.own_folders()} | {self.store.legacy_snapshots_dir.name}
            with os.scandir(self.store.root) as entries:
                for entry in entries:
                    if entry.name not in known:
                        what = describe(entry.stat(follow_symlinks=False))
                        bad.add(BadEntry(self.name, "metadata", entry.path, f"is {what} the driver did not make"))
        with os.scandir(self.volumes_dir) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name in RESERVED_NAMES:
                    continue
                if entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False):
                    ids.add(entry.name)
                elif bad is not None:
                    what = describe(entry.stat(follow_symlinks=False))
                    volume_id = entry.name if entry.name in ids else ""
                    bad.add(BadEntry(self.name, "pool-entry", entry.path, f"is {what}, not a volume", volume_id))
        return ids

    def discard(self, volume_id: str) -> None:
        """Remove a volume's data: first moved aside atomically, then deleted without following symlinks."""
        source = f"{self.volumes_dir}/{volume_id}"
        trashed = f"{self.store.trash_dir}/{volume_id}.{time.time_ns()}"
        try:
            os.rename(source, trashed)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            trashed = source  # a mount point in the way: delete in place
        self._delete(trashed)

    def purge_trash(self) -> None:
        """Finish deletions a crash interrupted, and drop clones a crash left half-made."""
        for folder in (self.store.trash_dir, self.store.staging_dir):
            with os.scandir(folder) as entries:
                for entry in entries:
                    self.discard_path(Path(entry.path))

    def discard_path(self, path: Path) -> None:
        if os.path.lexists(path):
            self._delete(path)

    @staticmethod
    def _delete(path: str | Path) -> None:
        try:
            os.rmdir(path)  # an empty directory (a volume never written to) in one call; never follows a symlink
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EBUSY):
                raise
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            with suppress(FileNotFoundError):
                os.unlink(path)  # a file, or a symlink itself, never what it points to
    def __repr__(self) -> str:
        return f"StoragePool({self.name!r}, {str(self.volumes_dir)!r})"


def check_path_not_shared(pool: StoragePool, host_root: Path = Path("/")) -> bool:
    """Log the documented warning when a pool shares the OS filesystem; return whether it does."""
    shared = pool.shares_os_filesystem(host_root)
    if shared:
        log.warning(
            "storage pool %r at %s is on the same filesystem as the host's / (seen at %s): volumes can fill the "
            "operating system's partition and make the node unstable; use a dedicated filesystem",
            pool.name,
            pool.volumes_dir,
            host_root,
        )
    return shared

"""The node's volumes as the upload daemon sees them: found by ID in the driver's pools, opened by descriptor.

A volume's contents belong to its tenant, who may have planted symlinks, FIFOs or hard links there. The daemon
opens the volume's directory (or a block volume's image) beneath the pool's directory descriptor without
following links, and from then on names it only as /proc/<pid>/fd/<fd>: whatever is renamed or swapped at the
volume's path afterwards, the import keeps writing into the volume it checked.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from hpp_csi import names
from hpp_csi.errors import CsiError
from hpp_csi.linux.safe_open import UnsafePath, open_beneath, open_dir, opened
from hpp_csi.storage.block_publish import open_image
from hpp_csi.storage.pools import StoragePool
from hpp_csi.storage.publications import Publications
from importer.serve.resume_state import RecordStore
from importer.target import DISK_IMAGE_NAME, BlockTarget, FileTarget, Target

UPLOADS_DIR = "uploads"  # beside the driver's records in <pool>/.hpp-csi/: one resume record per volume


class VolumeBusy(Exception):
    """The volume cannot take an upload now (it holds a disk, a pod uses it, its data is not what it should be)."""


@dataclass(frozen=True)
class NodeVolume:
    volume_id: str
    pool: StoragePool
    mode: str  # "block" (an image file in the pool) or "mount" (a directory)
    capacity: int  # the recorded capacity in bytes; 0 when none was recorded

    @property
    def path(self) -> Path:
        return self.pool.volume_path(self.volume_id)

    @property
    def is_block(self) -> bool:
        return self.mode == "block"


def valid_volume_name(volume_id: str) -> bool:
    try:
        names.volume_id(volume_id)
    except CsiError:
        return False
    return True


def find_volume(pools: list[StoragePool], volume_id: str) -> NodeVolume | None:
    """The volume of that ID in any pool: by its record, else by its entry (HPP's Go driver keeps no records)."""
    if not valid_volume_name(volume_id):
        return None
    for pool in pools:
        record, _problem = pool.store.read(volume_id)
        if record is not None:
            return NodeVolume(volume_id, pool, "block" if record.mode == "block" else "mount", record.capacity_bytes)
    for pool in pools:
        try:
            st = os.lstat(pool.volume_path(volume_id))
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            return NodeVolume(volume_id, pool, "mount", 0)
        if stat.S_ISREG(st.st_mode):
            return NodeVolume(volume_id, pool, "block", st.st_size)
    return None


def fd_path(fd: int) -> Path:
    """A path naming what `fd` is open on, for this process and its children (qemu-img) alike."""
    return Path(f"/proc/{os.getpid()}/fd/{fd}")


def open_volume_dir(volume: NodeVolume) -> int:
    """The volume's directory, opened beneath its pool's directory without following a symlink."""
    try:
        with opened(open_dir(volume.pool.volumes_dir)) as pool_fd:
            return open_beneath(pool_fd, volume.volume_id, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise VolumeBusy(f"volume {volume.volume_id!r} has no data on this node") from None
    except UnsafePath:
        raise VolumeBusy(f"volume {volume.volume_id!r}: its data is not a directory (a symlink?)") from None
    except OSError as err:
        if err.errno == errno.ENOTDIR:
            raise VolumeBusy(f"volume {volume.volume_id!r}: its data is not a directory") from None
        raise


def open_volume_image(volume: NodeVolume) -> int:
    """A block volume's image file, read-write; a symlink, FIFO, device or hard-linked file is refused."""
    try:
        return open_image(volume.path, os.O_RDWR)
    except CsiError as err:
        raise VolumeBusy(f"volume {volume.volume_id!r}: {err.message}") from None


def has_data(fd: int) -> bool:
    """Whether a file holds any data (SEEK_DATA finds some), rather than only holes."""
    try:
        return os.lseek(fd, 0, os.SEEK_DATA) < os.fstat(fd).st_size
    except OSError as err:
        if err.errno == errno.ENXIO:  # no data past offset 0
            return False
        raise


def check_free(volume: NodeVolume, partial_upload: bool = False) -> None:
    """VolumeBusy when the volume is published to a pod or already holds a disk.

    partial_upload: a resume record says an upload of ours was under way; a block volume's data is its bytes.
    """
    if Publications().of_volume(volume.path, volume.mode):
        raise VolumeBusy(f"volume {volume.volume_id!r} is published to a pod; upload before it is in use")
    if volume.is_block:
        if partial_upload:
            with opened(open_volume_image(volume)):
                return  # still checked: no symlink, FIFO or hard link in its place
        with opened(open_volume_image(volume)) as fd:
            if has_data(fd):
                raise VolumeBusy(f"volume {volume.volume_id!r} already holds data")
        return
    with opened(open_volume_dir(volume)) as dir_fd:
        try:
            st = os.stat(DISK_IMAGE_NAME, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        # A symlink a tenant left at disk.img is no disk: the upload replaces the link itself, never its target.
        if not stat.S_ISLNK(st.st_mode):
            raise VolumeBusy(f"volume {volume.volume_id!r} already holds a disk ({DISK_IMAGE_NAME})")


class _HeldByDescriptor(Target):
    """A target named through /proc/<pid>/fd/<fd>: the descriptor is closed once the import is over."""

    _fd = -1

    def commit(self) -> None:
        super().commit()  # on failure the fd stays open: abort() still needs it to clean up
        self._close()

    def abort(self) -> None:
        try:
            super().abort()
        finally:
            self._close()

    def release(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class VolumeDirTarget(_HeldByDescriptor, FileTarget):
    """A file volume's directory: disk.img and its temporary .part name are made in that directory."""

    def __init__(self, dir_fd: int) -> None:
        self._fd = dir_fd
        FileTarget.__init__(self, fd_path(dir_fd))


class VolumeImageTarget(_HeldByDescriptor, BlockTarget):
    """A block volume's image file in the pool: written in place like a device, no filesystem overhead."""

    def __init__(self, image_fd: int) -> None:
        self._fd = image_fd
        Target.__init__(self, fd_path(image_fd))  # not BlockTarget's: an image file is no device to hold

    def available(self) -> int:
        return os.fstat(self._fd).st_size

    def abort(self) -> None:
        """Back to what it was before the upload (admitted only when it held no data): all holes, same size."""
        try:
            size = os.fstat(self._fd).st_size
            os.ftruncate(self._fd, 0)
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
        finally:
            super().abort()


def open_volume_target(volume: NodeVolume) -> Target:
    if volume.is_block:
        return VolumeImageTarget(open_volume_image(volume))
    return VolumeDirTarget(open_volume_dir(volume))


def resume_store_for(volume: NodeVolume) -> RecordStore | None:
    """The volume's resume record, in the pool's driver-owned folder (never inside the volume); None when that
    folder cannot be made (the driver has not prepared the pool)."""
    directory = volume.pool.store.root / UPLOADS_DIR
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    return RecordStore(directory, f"{volume.volume_id}.json")


def scratch_dir_for(volume: NodeVolume, configured: Path | None) -> Path:
    """Where a format that needs scratch is staged: --scratch, else a private folder in the volume's pool.

    The pool's staging folder is the driver's (0700, never inside a volume), on the volume's own filesystem,
    and the driver empties it at start, so a crash leaves nothing behind for long.
    """
    if configured is not None:
        return configured
    return volume.pool.store.staging_dir


"""Block-backed storage pools (as OpenShift Virtualization's pools made from PVC templates): a device or a loop
file, formatted XFS with reflink when it holds nothing, mounted with project quotas at the pool's volumes folder.
What is attached and mounted is read from the system every time, so a restarted driver finds its pools as they
are."""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from hpp_csi.config import PoolConfig
from hpp_csi.linux import loop, mounts, xfs

log = logging.getLogger(__name__)


class PoolDeviceError(RuntimeError):
    """The pool's device cannot be used; the message names the pool and the device."""


@dataclass(frozen=True)
class PoolMount:
    pool: str
    device: str
    backing_file: str | None
    mount_point: str
    quotas_enforced: bool
    reason: str
    formatted: bool


def backing_path(config: PoolConfig) -> str:
    """The device or file behind a pool: `device` when given, else `<path>.img` for a `size:` pool."""
    if config.device:
        return config.device
    if config.size:
        return f"{str(config.path).rstrip('/')}.img"
    raise PoolDeviceError(
        f"storage pool {config.name!r} is backed by a Block PVC: give its device (e.g. --device /dev/data)"
    )


def _ensure_backing_file(path: str, size: int | None, pool: str) -> None:
    if os.path.exists(path):
        if size and stat.S_ISREG(os.stat(path).st_mode) and os.stat(path).st_size < size:
            raise PoolDeviceError(
                f"storage pool {pool!r}: {path} is smaller than the configured size {size}; grow it on purpose "
                "(truncate, then restart) rather than have the driver do it"
            )
        return
    if not size:
        raise PoolDeviceError(f"storage pool {pool!r}: device {path} does not exist")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as f:
        f.truncate(size)
    log.info("storage pool %s: created sparse backing file %s of %d bytes", pool, path, size)


def _block_device(path: str) -> tuple[str, str | None, bool]:
    """(block device, backing file or None, whether we attached it now): a regular file is attached to a loop
    device (reused if one already backs it)."""
    mode = os.stat(path).st_mode
    if stat.S_ISBLK(mode):
        return path, None, False
    if not stat.S_ISREG(mode):
        raise PoolDeviceError(f"{path} is neither a block device nor a regular file")
    existing = loop.devices_backing(path)
    if existing:
        return existing[0].path, path, False
    return loop.attach(path).path, path, True


def _same_device(entry: mounts.MountEntry, device: str) -> bool:
    rdev = os.stat(device).st_rdev
    return (entry.major, entry.minor) == (os.major(rdev), os.minor(rdev))


def mount_pool(config: PoolConfig, force: bool = False) -> PoolMount:
    """Make the pool's filesystem ready at its volumes folder; idempotent."""
    target = str(config.volumes_dir)
    source = backing_path(config)
    _ensure_backing_file(source, config.size, config.name)
    Path(target).mkdir(parents=True, exist_ok=True)
    device, backing, attached = _block_device(source)
    try:
        return _mount_device(config, source, device, backing, force)
    except BaseException:
        if attached:  # a refused pool must not keep a loop device on its file
            loop.detach(device)
        raise


def _mount_device(config: PoolConfig, source: str, device: str, backing: str | None, force: bool) -> PoolMount:
    """Mount `device` at the pool's volumes folder, formatting it first only when it holds nothing."""
    target = str(config.volumes_dir)
    present = mounts.mounts_at(target)
    if present:
        if not _same_device(present[-1], device):
            raise PoolDeviceError(f"storage pool {config.name!r}: {target} already holds another filesystem "
                                  f"({present[-1].source}); refusing to mount {source} over it")
        enforced = bool({"prjquota", "pquota"} & present[-1].super_options)
        return PoolMount(config.name, device, backing, target, enforced,
                         "" if enforced else "mounted without prjquota", formatted=False)
    found = xfs.signatures(device)
    formatted = False
    if not found or force:
        xfs.make_filesystem(device, label=config.name[:12], force=force)
        formatted = True
        log.info("storage pool %s: formatted %s as XFS with reflink", config.name, device)
    elif not any(sig.type == "xfs" for sig in found):
        kinds = ", ".join(sorted({sig.type for sig in found}))
        raise PoolDeviceError(
            f"storage pool {config.name!r}: {source} already holds {kinds}; refusing to format it "
            "(wipe it yourself, or pass --force to destroy its content)"
        )
    result = xfs.mount_xfs(device, target, quota=True)
    if not result.quotas_enforced:
        log.warning("storage pool %s: volume sizes are not enforced: %s", config.name, result.reason)
    return PoolMount(config.name, device, backing, target, result.quotas_enforced, result.reason, formatted)


def unmount_pool(config: PoolConfig) -> list[str]:
    """Unmount the pool and detach the loop devices behind its file; what was undone, for the log."""
    done = []
    target = str(config.volumes_dir)
    while mounts.is_mount_point(target):
        mounts.umount(target)
        done.append(f"unmounted {target}")
    source = backing_path(config)
    if os.path.exists(source) and stat.S_ISREG(os.stat(source).st_mode):
        for device in loop.devices_backing(source):
            loop.detach(device.path)
            done.append(f"detached {device.path}")
    return done

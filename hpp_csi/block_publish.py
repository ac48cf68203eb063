"""Block volumes on a node: a sparse file attached to a loop device (direct I/O), whose device node is
bind-mounted onto the target file kubelet gives. Loop devices and mounts are always looked up in sysfs and
mountinfo, so nothing leaks across a restart: a device no target uses any more is detached."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from hpp_csi import errors, loop, mounts

log = logging.getLogger(__name__)


def device_of_target(target: str) -> str | None:
    """The loop device bind-mounted at `target`, from the device number of the node there."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    name = Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}").resolve().name
    return f"/dev/{name}" if name.startswith("loop") else None


def targets_of(device: str) -> list[str]:
    """Mount points where the device node `device` (in /dev) is bind-mounted."""
    dev = os.stat("/dev").st_dev
    key = (os.major(dev), os.minor(dev), "/" + os.path.basename(device))
    return mounts.mount_sources().get(key, [])


def _usable_device(image: Path, read_only: bool) -> str:
    """A loop device on `image` with the wanted write mode: reuse one (after a restart too), else attach."""
    for device in loop.devices_backing(image):
        if device.read_only == read_only:
            return device.path
    attached = loop.attach(image, read_only=read_only)
    log.info("attached %s to %s%s (direct I/O: %s)", image, attached.path, " read-only" if read_only else "",
             attached.direct_io)
    return attached.path


def _same_file(a: str, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def publish(image: Path, target: str, read_only: bool) -> None:
    """Bind the image's loop device onto `target` (a file, created); idempotent for the same image and mode."""
    if mounts.is_mount_point(target):
        device = device_of_target(target)
        current = loop.status(device) if device else None
        if current is not None and current.read_only == read_only and _same_file(current.backing_file, image):
            return
        raise errors.already_exists(f"{target} is already published from another device or with another mode")
    device = _usable_device(image, read_only)
    os.makedirs(os.path.dirname(target), mode=0o750, exist_ok=True)
    if os.path.lexists(target) and not os.path.isfile(target):
        raise errors.failed_precondition(f"{target} exists and is not a file; a block volume needs a file target")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o660)
    os.close(fd)
    try:
        mounts.bind_mount(device, target, mounts.MS_RDONLY if read_only else 0)
    except OSError:
        release(device)
        raise


def release(device: str) -> None:
    """Detach `device` when no target uses it any more."""
    if not targets_of(device):
        loop.detach(device)
        log.info("detached %s", device)


def detach_unused(image: Path) -> None:
    """Detach every loop device on `image` that no target uses (before deleting the image, or after a crash)."""
    if image.is_file():
        for device in loop.devices_backing(image):
            release(device.path)


def refresh(image: Path) -> None:
    """Make every loop device on `image` see the file's new size (online expansion)."""
    for device in loop.devices_backing(image):
        loop.refresh_capacity(device.path)


def detach_orphans(folders: list[Path]) -> list[str]:
    """At start-up: detach loop devices on images in our pools that no target uses (a crash between attach
    and mount, or a volume unpublished by hand). Devices on other files are not ours and are left alone."""
    roots = [os.path.realpath(folder) + "/" for folder in folders]
    detached = []
    for device in loop.attached():
        backing = device.backing_file.removesuffix(" (deleted)")
        if any(backing.startswith(root) for root in roots) and not targets_of(device.path):
            loop.detach(device.path)
            detached.append(device.path)
            log.info("detached %s: it backed %s but no target used it", device.path, backing)
    return detached

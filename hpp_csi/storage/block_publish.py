"""Block volumes on a node: a sparse file attached to a loop device (direct I/O), whose device node is
bind-mounted onto the target file kubelet gives. Loop devices and mounts are always looked up in sysfs and
mountinfo, so nothing leaks across a restart: a device no target uses any more is detached.

The image is always opened beneath its pool's directory descriptor and the loop device is given that
descriptor, so a symlink, FIFO or device node put in the image's place is refused, never attached or grown.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

from hpp_csi import errors
from hpp_csi.linux import loop, mounts
from hpp_csi.linux.safe_open import UnsafePath, open_dir, open_regular, opened

log = logging.getLogger(__name__)

Identity = tuple[int, int]  # (st_dev, st_ino): what a file is, whatever its path names by now


def kind_of(mode: int) -> str:
    """A file type as a person reads it in an error message."""
    for test, name in ((stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "regular file" if stat.S_ISREG(mode) else "special file"


def _not_an_image(image: Path, what: str) -> errors.CsiError:
    return errors.failed_precondition(
        f"block volume image {image} {what}, not the regular file the driver made; the driver will not follow "
        "or use it: move it away and restore the volume's image, or delete the volume"
    )


def open_image(image: Path, flags: int = os.O_RDONLY) -> int:
    """A descriptor of the block volume image `image`, opened beneath its pool's directory descriptor.

    Missing: NOT_FOUND. A symlink, FIFO, device, directory, or a file with other hard links: FAILED_PRECONDITION.
    """
    try:
        pool_fd = open_dir(image.parent)
    except UnsafePath as exc:
        raise errors.failed_precondition(f"storage pool folder {image.parent} is not a directory: {exc}") from None
    with opened(pool_fd):
        try:
            st = os.stat(image.name, dir_fd=pool_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise errors.not_found(f"block volume {image.name!r} has no image at {image}") from None
        if not stat.S_ISREG(st.st_mode):  # checked before opening: opening a device node can have effects
            raise _not_an_image(image, f"is a {kind_of(st.st_mode)}")
        try:
            fd = open_regular(pool_fd, image.name, flags)
        except FileNotFoundError:
            raise errors.not_found(f"block volume {image.name!r} has no image at {image}") from None
        except UnsafePath:
            raise _not_an_image(image, "was replaced while being opened") from None
    links = os.fstat(fd).st_nlink
    if links != 1:
        os.close(fd)
        raise _not_an_image(image, f"has {links} hard links (another name outside the pool may share it)")
    return fd


def identity_of(fd: int) -> Identity:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def image_identity(image: Path) -> Identity | None:
    """The image's identity when it is a regular file, else None (a symlink there is not the image)."""
    try:
        st = os.stat(image, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def devices_of(image: Path, ident: Identity) -> list[loop.LoopDevice]:
    """Loop devices on the file `ident`, the image at `image`: found by identity alone, as the path sysfs shows
    for a device is the attaching namespace's (a previous driver container's) and may name nothing here."""
    return loop.devices_backing_inode(*ident)


def device_of_target(target: str) -> str | None:
    """The loop device bind-mounted at `target`, from the device number of the node there."""
    try:
        st = os.stat(target, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    name = Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}").resolve().name
    return f"/dev/{name}" if name.startswith("loop") else None


def device_backs(device: str | None, image: Path, ident: Identity | None) -> bool:
    """Whether loop device `device` is attached to the file `ident` (the image at `image`)."""
    return device is not None and ident is not None and any(d.path == device for d in devices_of(image, ident))


def targets_of(device: str) -> list[str]:
    """Mount points where the device node `device` (in /dev) is bind-mounted."""
    dev = os.stat("/dev").st_dev
    key = (os.major(dev), os.minor(dev), "/" + os.path.basename(device))
    return mounts.mount_sources().get(key, [])


def _usable_device(image: Path, image_fd: int, read_only: bool) -> tuple[str, bool]:
    """A loop device on the open image with the wanted write mode: reuse one (after a restart too), else attach
    that descriptor; (device, whether attached now)."""
    for device in devices_of(image, identity_of(image_fd)):
        if device.read_only == read_only:
            return device.path, False
    attached = loop.attach_fd(image_fd, str(image), read_only=read_only)
    log.info("attached %s to %s%s (direct I/O: %s)", image, attached.path, " read-only" if read_only else "",
             attached.direct_io)
    return attached.path, True


def _folder(path: str) -> int:
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _open_parent(target: str, check_folder: Callable[[int], None]) -> int:
    """An O_PATH handle on the target's folder (kubelet's folders may be symlinks), checked, then created if
    missing and checked again: nothing is created where `check_folder` refuses."""
    parent = existing = os.path.dirname(target)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    with opened(_folder(existing)) as fd:
        check_folder(fd)
    os.makedirs(parent, mode=0o750, exist_ok=True)
    fd = _folder(parent)
    try:
        check_folder(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_target_file(parent_fd: int, target: str) -> int:
    """Create or open the target file beneath its folder, refusing anything but a regular file."""
    name = os.path.basename(target)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o660,
                     dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR):
            raise errors.failed_precondition(
                f"{target} exists and is not a file (a symlink, directory or special file); a block volume "
                "needs a regular file target"
            ) from None
        raise errors.failed_precondition(f"cannot create the target file {target}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise errors.failed_precondition(f"{target} is a {kind_of(mode)}; a block volume needs a file target")
    return fd


def publish(image: Path, target: str, read_only: bool, check_folder: Callable[[int], None]) -> None:
    """Bind the image's loop device onto `target` (a file, created); idempotent for the same image and mode.

    `check_folder` gets the target folder's descriptor before anything is attached or created there. A failure
    after attaching detaches the device again (unless another target uses it)."""
    with opened(open_image(image, os.O_RDONLY if read_only else os.O_RDWR)) as image_fd:
        if mounts.is_mount_point(target):
            device = device_of_target(target)
            current = loop.status(device) if device else None
            if current is not None and current.read_only == read_only and \
                    device_backs(device, image, identity_of(image_fd)):
                return
            raise errors.already_exists(f"{target} is already published from another device or with another mode")
        with opened(_open_parent(target, check_folder)) as parent_fd:
            try:
                existing = os.stat(os.path.basename(target), dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                existing = None
            if existing is not None and not stat.S_ISREG(existing.st_mode):
                raise errors.failed_precondition(
                    f"{target} exists and is a {kind_of(existing.st_mode)}; a block volume needs a file target"
                )
            device, _ = _usable_device(image, image_fd, read_only)
            try:
                with opened(_open_target_file(parent_fd, target)) as target_fd:
                    try:
                        mounts.bind_mount(device, f"/proc/self/fd/{target_fd}",
                                          mounts.MS_RDONLY if read_only else 0, remount_at=target)
                    except FileNotFoundError:
                        raise errors.failed_precondition(
                            f"{target} was removed while it was being published; nothing was mounted, retry"
                        ) from None
            except BaseException:
                release(device)
                raise


def release(device: str) -> None:
    """Detach `device` when no target uses it any more."""
    if not targets_of(device):
        loop.detach(device)
        log.info("detached %s", device)


def detach_unused(image: Path) -> None:
    """Detach every loop device on `image` that no target uses (before deleting the image, or after a crash)."""
    ident = image_identity(image)
    if ident is not None:
        for device in devices_of(image, ident):
            release(device.path)


def refresh(image: Path) -> None:
    """Make every loop device on `image` see the file's new size (online expansion)."""
    with opened(open_image(image)) as fd:
        for device in devices_of(image, identity_of(fd)):
            loop.refresh_capacity(device.path)


def detach_orphans(folders: list[Path]) -> list[str]:
    """At start-up: detach loop devices on images in our pools that no target uses (a crash between attach
    and mount, or a volume unpublished by hand). Devices on other files are not ours and are left alone.

    A device is ours when it backs, by device and inode (LOOP_GET_STATUS64), a regular file directly in a pool
    folder; sysfs's backing_file path is written in the namespace of whoever attached it (a previous driver
    container) and is trusted only for an image already deleted, on a pool's own filesystem."""
    images: dict[tuple[int, int, int], str] = {}
    pool_devices: set[tuple[int, int]] = set()
    for folder in folders:
        info = os.stat(folder)
        pool_devices.add((os.major(info.st_dev), os.minor(info.st_dev)))
        with os.scandir(folder) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    images[(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)] = entry.path
    roots = [os.path.realpath(folder) + "/" for folder in folders]
    detached = []
    for device in loop.attached():
        key = loop.backing_inode(device.path)
        if key is None:
            continue
        backing = images.get(key)
        if backing is None and device.backing_file.endswith(" (deleted)") and key[:2] in pool_devices:
            path = device.backing_file.removesuffix(" (deleted)")
            backing = path if any(path.startswith(root) for root in roots) else None
        if backing is not None and not targets_of(device.path):
            loop.detach(device.path)
            detached.append(device.path)
            log.info("detached %s: it backed %s but no target used it", device.path, backing)
    return detached

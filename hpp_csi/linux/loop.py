"""Loop devices through ioctls on /dev/loop-control and /dev/loopN: no `losetup` process is forked.

What is attached is always read back from the kernel, never remembered: after a restart the driver finds the
devices backing its files the same way it finds them the first time, by the backing file's device and inode.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
LOOP_SET_DIRECT_IO = 0x4C08
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
BLKGETSIZE64 = 0x80081272

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
LO_NAME_SIZE = 64

LOOP_CONTROL = Path("/dev/loop-control")
SYS_BLOCK = Path("/sys/block")
# Another process can take the number LOOP_CTL_GET_FREE handed us before we bind it: ask again.
_ATTACH_ATTEMPTS = 8


class LoopInfo64(ctypes.Structure):
    """struct loop_info64 from <linux/loop.h>."""

    _fields_ = [
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_char * LO_NAME_SIZE),
        ("lo_crypt_name", ctypes.c_char * LO_NAME_SIZE),
        ("lo_encrypt_key", ctypes.c_char * 32),
        ("lo_init", ctypes.c_uint64 * 2),
    ]


class LoopConfig(ctypes.Structure):
    """struct loop_config (LOOP_CONFIGURE, Linux >= 5.8)."""

    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", LoopInfo64),
        ("reserved", ctypes.c_uint64 * 8),
    ]


class LoopError(OSError):
    """A loop operation failed; the message names the device and the backing file."""


@dataclass(frozen=True)
class LoopDevice:
    """An attached loop device as the kernel reports it in sysfs."""

    path: str
    number: int
    backing_file: str
    direct_io: bool
    autoclear: bool
    read_only: bool
    size: int


def _number(device: str | os.PathLike[str]) -> int:
    name = os.path.basename(os.fspath(device))
    if not name.startswith("loop") or not name[4:].isdigit():
        raise ValueError(f"{device} is not a loop device (expected /dev/loopN)")
    return int(name[4:])


def _sys(number: int) -> Path:
    return SYS_BLOCK / f"loop{number}"


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def status(device: str | os.PathLike[str]) -> LoopDevice | None:
    """What sysfs says about `device`, or None when nothing is attached to it."""
    number = _number(device)
    base = _sys(number)
    if not (base / "loop").is_dir():
        return None
    return LoopDevice(
        path=f"/dev/loop{number}",
        number=number,
        backing_file=_read(base / "loop" / "backing_file"),
        direct_io=_read(base / "loop" / "dio") == "1",
        autoclear=_read(base / "loop" / "autoclear") == "1",
        read_only=_read(base / "ro") == "1",
        size=int(_read(base / "size", "0")) * 512,
    )


def _attached_numbers() -> list[int]:
    """Numbers of the loop devices sysfs shows something attached to, in order."""
    numbers = sorted(int(p.name[4:]) for p in SYS_BLOCK.glob("loop*") if p.name[4:].isdigit())
    return [n for n in numbers if (_sys(n) / "loop").is_dir()]


def attached() -> list[LoopDevice]:
    """Every attached loop device, in device order."""
    found = (status(f"/dev/loop{n}") for n in _attached_numbers())
    return [dev for dev in found if dev is not None]


def devices_backing(path: str | os.PathLike[str]) -> list[LoopDevice]:
    """Loop devices whose backing file is `path` (compared by inode, so any path to the file matches)."""
    target = os.stat(path)
    return devices_backing_inode(target.st_dev, target.st_ino)


def backing_inode(device: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    """(major, minor, inode) of the file the kernel holds behind `device` (LOOP_GET_STATUS64), whatever its
    path names now; None when nothing is attached."""
    number = _number(device)
    try:
        fd = os.open(_device_node(number), os.O_RDONLY | os.O_CLOEXEC)
    except ValueError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
            return None  # detached and removed by another call meanwhile
        raise
    info = LoopInfo64()
    try:
        fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise _failed(exc, f"status of /dev/loop{number}") from exc
    finally:
        os.close(fd)
    return os.major(info.lo_device), os.minor(info.lo_device), int(info.lo_inode)


def devices_backing_inode(st_dev: int, st_ino: int) -> list[LoopDevice]:
    """Loop devices whose backing file is the inode (st_dev, st_ino), e.g. from fstat of a descriptor.

    Every attached device is asked through LOOP_GET_STATUS64, never through sysfs's backing_file: that path is
    written in the namespace of whoever attached it (a previous driver container, say) and may name nothing,
    or something else, here; renames and symlinks change nothing either."""
    wanted = (os.major(st_dev), os.minor(st_dev), st_ino)
    matching = (f"/dev/loop{n}" for n in _attached_numbers() if backing_inode(f"/dev/loop{n}") == wanted)
    found = (status(path) for path in matching)  # sysfs read only for the few that match: it costs ten ioctls
    return [dev for dev in found if dev is not None]


def _device_node(number: int) -> str:
    """/dev/loopN, created from sysfs's major:minor when /dev is not a devtmpfs (as in some containers)."""
    node = f"/dev/loop{number}"
    if not os.path.exists(node):
        major, minor = (int(x) for x in _read(_sys(number) / "dev").split(":"))
        with contextlib.suppress(FileExistsError):
            os.mknod(node, 0o660 | 0o060000, os.makedev(major, minor))
    return node


def supports_direct_io(path: str | os.PathLike[str]) -> bool:
    """Whether the filesystem holding `path` accepts O_DIRECT (tmpfs, for one, does not); pass
    /proc/self/fd/N to ask about an open file without resolving its name again."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


def _info(backing_path: str, flags: int) -> LoopInfo64:
    info = LoopInfo64()
    info.lo_flags = flags
    info.lo_file_name = os.fsencode(backing_path)[: LO_NAME_SIZE - 1]
    return info


def _bind(dev_fd: int, file_fd: int, backing_path: str, flags: int) -> None:
    """LOOP_CONFIGURE in one call; the older LOOP_SET_FD + LOOP_SET_STATUS64 pair where it is missing."""
    config = LoopConfig()
    config.fd = file_fd
    config.info = _info(backing_path, flags)
    try:
        fcntl.ioctl(dev_fd, LOOP_CONFIGURE, config)
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    fcntl.ioctl(dev_fd, LOOP_SET_FD, file_fd)
    try:
        fcntl.ioctl(dev_fd, LOOP_SET_STATUS64, _info(backing_path, flags & ~LO_FLAGS_DIRECT_IO))
        if flags & LO_FLAGS_DIRECT_IO:
            fcntl.ioctl(dev_fd, LOOP_SET_DIRECT_IO, 1)
    except OSError:
        fcntl.ioctl(dev_fd, LOOP_CLR_FD, 0)
        raise


OnAttached = Callable[[LoopDevice], None]


def _failed(exc: OSError, what: str) -> LoopError:
    code = exc.errno or errno.EIO
    return LoopError(code, f"{what}: {os.strerror(code)}")


def _free_number() -> int:
    ctl = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        return int(fcntl.ioctl(ctl, LOOP_CTL_GET_FREE))
    finally:
        os.close(ctl)


def _attach_once(file_fd: int, path: str, flags: int, while_open: OnAttached | None) -> LoopDevice | None:
    """One attempt on the device LOOP_CTL_GET_FREE names; None when someone took it first (EBUSY)."""
    node = _device_node(_free_number())
    dev_fd = os.open(node, (os.O_RDONLY if flags & LO_FLAGS_READ_ONLY else os.O_RDWR) | os.O_CLOEXEC)
    try:
        try:
            _bind(dev_fd, file_fd, path, flags)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return None
            raise _failed(exc, f"attach {path} to {node}") from exc
        device = status(node)
        if device is None:
            raise LoopError(errno.EIO, f"{node} shows no backing file right after attaching {path}")
        if while_open is not None:
            try:
                while_open(device)
            except BaseException:
                fcntl.ioctl(dev_fd, LOOP_CLR_FD, 0)
                raise
        return device
    finally:
        os.close(dev_fd)


def attach(backing_file: str | os.PathLike[str], read_only: bool = False, autoclear: bool = False,
           direct_io: bool | None = None, while_open: OnAttached | None = None) -> LoopDevice:
    """Bind `backing_file` to a free loop device; direct I/O is used when the backing filesystem allows it.

    `autoclear` makes the kernel detach the device on its last close, which would be ours: `while_open`
    (e.g. a mount, which then holds the device) runs before we close it. An error in it detaches.
    """
    if autoclear and while_open is None:
        raise ValueError("autoclear needs while_open: the device would detach as soon as attach() closes it")
    path = os.path.abspath(backing_file)
    file_fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    try:
        return attach_fd(file_fd, path, read_only, autoclear, direct_io, while_open)
    finally:
        os.close(file_fd)


def attach_fd(file_fd: int, name: str, read_only: bool = False, autoclear: bool = False,
              direct_io: bool | None = None, while_open: OnAttached | None = None) -> LoopDevice:
    """attach() for a file already open (O_RDWR, or O_RDONLY for read_only): the device gets exactly that
    file, whatever its path names by now; `name` is only for messages. The caller keeps `file_fd`."""
    if autoclear and while_open is None:
        raise ValueError("autoclear needs while_open: the device would detach as soon as attach() closes it")
    use_dio = supports_direct_io(f"/proc/self/fd/{file_fd}") if direct_io is None else direct_io
    flags = (LO_FLAGS_READ_ONLY if read_only else 0) | (LO_FLAGS_AUTOCLEAR if autoclear else 0)
    flags |= LO_FLAGS_DIRECT_IO if use_dio else 0
    for _ in range(_ATTACH_ATTEMPTS):
        device = _attach_once(file_fd, name, flags, while_open)
        if device is not None:
            return device
    raise LoopError(errno.EBUSY, f"attach {name}: every free loop device was taken by someone else first")


def detach(device: str | os.PathLike[str]) -> bool:
    """Unbind `device`: True when it is free now, False when the kernel defers it to the last close."""
    node = f"/dev/loop{_number(device)}"
    try:
        fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD, 0)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: nothing was attached
            raise _failed(exc, f"detach {node}") from exc
    finally:
        os.close(fd)
    return status(node) is None


def device_size(device: str | os.PathLike[str]) -> int:
    """Size in bytes of a block device (BLKGETSIZE64)."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    finally:
        os.close(fd)
    return int(struct.unpack("Q", buf)[0])


def refresh_capacity(device: str | os.PathLike[str]) -> int:
    """Make `device` see its backing file's current size (after the file grew); returns the new size."""
    node = f"/dev/loop{_number(device)}"
    fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, LOOP_SET_CAPACITY, 0)
    except OSError as exc:
        raise _failed(exc, f"refresh capacity of {node}") from exc
    finally:
        os.close(fd)
    return device_size(node)

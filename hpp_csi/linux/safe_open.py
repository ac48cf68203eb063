"""Open paths beneath a directory descriptor without ever leaving it.

Everything inside a volume is written by its tenant and may become a symlink, FIFO, device node or hard link at
any moment, so the driver and importer never re-resolve a path string there. They hold a descriptor of a
directory they trust (a pool, a volume, a destination) and open the rest relative to it with
openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS) (Linux 5.6+): a symlink anywhere on the
way, or `..` climbing out, fails with ELOOP/EXDEV instead of being followed. Where openat2 is missing (ENOSYS) the
same walk is done one component at a time with O_NOFOLLOW.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

SYS_OPENAT2 = 437  # same number on every architecture (added after the syscall table unification)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
STRICT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

_libc = ctypes.CDLL(None, use_errno=True)
_openat2_missing = False


class OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class UnsafePath(OSError):
    """A path that would leave its directory, or pass through a symlink, or is not the kind of file expected."""


def openat2(dir_fd: int, path: str, flags: int, mode: int = 0, resolve: int = STRICT) -> int:
    """The raw syscall; raises OSError with the kernel's errno (ENOSYS where the kernel lacks it)."""
    how = OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, resolve)
    fd = _libc.syscall(SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def _open_by_components(dir_fd: int, path: str, flags: int, mode: int) -> int:
    """Fallback for kernels without openat2: each directory opened with O_NOFOLLOW relative to the last."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        return os.open(".", flags | os.O_CLOEXEC, dir_fd=dir_fd)
    if ".." in parts:
        raise OSError(errno.EXDEV, "path climbs out with ..", path)
    current = dir_fd
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
            except NotADirectoryError:
                if stat.S_ISLNK(os.stat(part, dir_fd=current, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, "symlink on the way", path) from None
                raise
            if current != dir_fd:
                os.close(current)
            current = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=current)
    finally:
        if current != dir_fd:
            os.close(current)


def open_beneath(dir_fd: int, path: str, flags: int, mode: int = 0o600) -> int:
    """Open `path` (relative) beneath `dir_fd`, refusing symlinks at every step and any way out.

    Raises UnsafePath (errno ELOOP or EXDEV) when the path leaves the directory or crosses a symlink; other
    errors (ENOENT, EEXIST, ...) as OSError, unchanged.
    """
    global _openat2_missing
    if os.path.isabs(path):
        raise UnsafePath(errno.EXDEV, "absolute path where a path relative to its directory is expected", path)
    try:
        if not _openat2_missing:
            try:
                return openat2(dir_fd, path, flags, mode)
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise
                _openat2_missing = True
        return _open_by_components(dir_fd, path, flags, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EXDEV):
            raise UnsafePath(exc.errno, "leaves its directory or passes through a symlink", path) from None
        raise


def open_dir(path: str | os.PathLike[str], dir_fd: int | None = None) -> int:
    """A directory descriptor for a path the driver owns, refusing a symlink in the last component."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(exc.errno, "not a directory (a symlink or another file)", os.fspath(path)) from None
        raise


def open_regular(dir_fd: int, path: str, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """open_beneath for a regular file: a FIFO or device is refused without blocking on it."""
    fd = open_beneath(dir_fd, path, flags | os.O_NONBLOCK, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(errno.EINVAL, f"not a regular file (mode {stat.filemode(st.st_mode)})", path)
        if not flags & os.O_NONBLOCK:
            os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def opened(fd: int) -> Iterator[int]:
    """Close `fd` when the block ends, however it ends."""
    try:
        yield fd
    finally:
        os.close(fd)

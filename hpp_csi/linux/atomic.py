"""Crash-safe small files: made under a temporary name, then renamed over the final one.

`write_bytes` makes the file durable itself (two flushes: the data, then the folder). `write_xattr_file` puts
the value in an extended attribute, which the filesystem's journal carries: nothing is flushed, and one later
fsync of the folder makes the whole change durable (the caller's group commit). `sync_filesystem` is for file
content the journal does not carry (a copy where no reflink could be made).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import threading
import weakref
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syncfs.argtypes = [ctypes.c_int]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FolderFlush:
    """fsync of one folder through a descriptor opened on first use and kept: a flush on every change then
    costs one system call, not three. For folders the driver made and never replaces (its records folders).
    A lock keeps close() from freeing the descriptor under a flush: a reused number would flush another file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()  # uncontended: a GroupCommit runs one flush at a time
        self._fd: int | None = None
        self._finalizer: weakref.finalize[[int], FolderFlush] | None = None

    def __call__(self) -> None:
        with self._lock:
            fd = self._fd
            if fd is None:
                fd = self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                self._finalizer = weakref.finalize(self, os.close, fd)  # a store dropped without close()
            os.fsync(fd)

    def close(self) -> None:
        with self._lock:
            if self._finalizer is not None:
                self._finalizer()
            self._fd = self._finalizer = None


def sync_filesystem(path: str | os.PathLike[str]) -> None:
    """Write out every dirty page of the filesystem holding `path` (syncfs): copied data is page cache that no
    journal commit of its metadata flushes, so it must reach the disk before a record points at it."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes, mode: int = 0o600) -> None:
    """After a crash at any point `path` holds either its old content or `data`, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    # O_NOFOLLOW and O_NONBLOCK: a symlink or FIFO found at the temporary name fails at once (ELOOP, ENXIO)
    # instead of being written through or blocking the call forever.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)


def write_xattr_file(folder: str, name: str, attribute: str, value: bytes, mode: int = 0o600) -> None:
    """After a crash `folder/name` is either what it was or an empty file carrying `value` in `attribute`; not
    durable until `folder` is fsynced. Raises OSError (ENOTSUP, E2BIG, ENOSPC...) when the filesystem cannot
    hold it. Plain strings, not Paths: this is on every CreateVolume's path."""
    path = f"{folder}/{name}"
    tmp = f"{folder}/.{name}.{os.getpid()}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        try:
            os.setxattr(fd, attribute, value)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)  # the temporary name never outlives a failed write (start-up removes a crash's)
        raise


def write_json(path: Path, value: Any) -> None:
    write_bytes(path, json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


def remove(path: str | os.PathLike[str], durable: bool = True) -> bool:
    """Unlink `path` (durably unless the caller flushes the folder itself); False when it was already gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    if durable:
        fsync_dir(os.path.dirname(path))
    return True

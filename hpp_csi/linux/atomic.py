"""Crash-safe small files: write a temporary file, fsync it, rename it over the name, fsync the folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
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


def write_json(path: Path, value: Any) -> None:
    write_bytes(path, json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


def remove(path: Path) -> bool:
    """Unlink `path` durably; False when it was already gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True

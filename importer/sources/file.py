"""A local file (file:// endpoint or a path), read in place by qemu-img when it needs random access."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from importer.errors import ConfigError, SourceError
from importer.formats import HEADER_SIZE
from importer.pipeline import Reader
from importer.sources.base import Source, SourceInfo


def path_from_endpoint(endpoint: str) -> Path:
    """The local path of a file:// URL or a plain path."""
    if endpoint.startswith("file:"):
        parts = urlsplit(endpoint)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"file URL {endpoint!r} names a remote host")
        return Path(unquote(parts.path))
    return Path(endpoint)


class FileSource(Source):
    def __init__(self, endpoint: str) -> None:
        # Absolute, so qemu-img never mistakes a "name:with:colons" for a protocol prefix.
        self.path = path_from_endpoint(endpoint).absolute()
        self.description = str(self.path)

    def probe(self) -> SourceInfo:
        try:
            with self.path.open("rb") as f:
                header = f.read(HEADER_SIZE)
                size = self.path.stat().st_size
        except OSError as err:
            raise SourceError(f"cannot read {self.path}: {err.strerror}") from err
        if not self.path.is_file():
            raise SourceError(f"{self.path} is not a regular file")
        return SourceInfo(size=size, random_access=True, header=header)

    def open(self) -> Reader:
        try:
            return self.path.open("rb")
        except OSError as err:
            raise SourceError(f"cannot read {self.path}: {err.strerror}") from err

    def open_range(self, start: int, end: int) -> Reader:
        try:
            return FileRange(self.path, start, end)
        except OSError as err:
            raise SourceError(f"cannot read {self.path}: {err.strerror}") from err

    def qemu_input(self, stack: contextlib.ExitStack, workdir: Path) -> str:
        return str(self.path)


class FileRange:
    """Bytes [start, end) of a file through pread: each range has its own position, so threads can share none."""

    def __init__(self, path: Path, start: int, end: int) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._pos, self._end = start, end

    def read(self, size: int, /) -> bytes:
        data = os.pread(self._fd, min(size, self._end - self._pos), self._pos) if self._pos < self._end else b""
        self._pos += len(data)
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

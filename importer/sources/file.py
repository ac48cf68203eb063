"""A local file (file:// endpoint or a path), read in place by qemu-img when it needs random access."""

from __future__ import annotations

import contextlib
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

    def qemu_input(self, stack: contextlib.ExitStack, workdir: Path) -> str:
        return str(self.path)

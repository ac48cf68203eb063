"""The blank source (IMPORTER_SOURCE=none): no bytes, just an empty disk of the usable size."""

from __future__ import annotations

from importer.pipeline import Reader
from importer.sources.base import Source, SourceInfo


class _Empty:
    def read(self, size: int, /) -> bytes:
        return b""

    def close(self) -> None:
        pass


class BlankSource(Source):
    description = "blank image"

    def probe(self) -> SourceInfo:
        return SourceInfo(size=0, random_access=False, header=b"")

    def open(self) -> Reader:
        return _Empty()

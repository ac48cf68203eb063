"""A container disk in a registry: the file under disk/ of an image, streamed out of its layer as it downloads.

Read once, in order (like an upload): probe() resolves the image, finds the layer holding the disk and reads its
first bytes; open() replays them and streams the rest. Which manifest and layer were imported is kept for the logs
and the termination message, so boot-source pipelines can pin what they got.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable

from importer.errors import SourceError
from importer.formats import HEADER_SIZE
from importer.net.pools import Pools
from importer.pipeline import Reader, read_full
from importer.registry.client import RegistryClient, RegistryOptions
from importer.registry.layers import DiskStream, open_disk
from importer.registry.reference import parse_reference
from importer.sources.base import Source, SourceInfo

log = logging.getLogger(__name__)


class RegistrySource(Source):
    """IMPORTER_SOURCE=registry: `docker://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]`."""

    def __init__(self, endpoint: str, options: RegistryOptions, pools: Pools | None = None) -> None:
        self.reference = parse_reference(endpoint)  # a malformed endpoint fails before any connection
        self.description = str(self.reference)
        self.sequential_reason = "a container disk streams out of its layer"
        self._client = RegistryClient(self.reference, options, pools)
        self.watch = self._client.watch
        self.image_digest: str | None = None  # the platform manifest imported (what the termination message says)
        self.index_digest: str | None = None  # the manifest list / index it was picked from, if any
        self.disk_layer_digest: str | None = None
        self.disk_name: str | None = None
        self._disk: DiskStream | None = None
        self._header = b""
        self._opened = False

    def probe(self) -> SourceInfo:
        if self._disk is None:
            image = self._client.resolve()
            self.image_digest, self.index_digest = image.digest, image.index_digest
            layers = [(layer, functools.partial(self._client.open_blob, layer)) for layer in reversed(image.layers)]
            self._disk = disk = open_disk(layers)
            self.disk_layer_digest, self.disk_name = disk.layer_digest, disk.name
            log.info("importing disk/%s (%d bytes) of %s: manifest %s%s, layer %s", disk.name, disk.size,
                     self.description, image.digest, f" (index {image.index_digest})" if image.index_digest else "",
                     disk.layer_digest)
            self._header = read_full(disk, HEADER_SIZE)
        return SourceInfo(size=self._disk.size, random_access=False, header=self._header)

    def open(self) -> Reader:
        if self._opened:
            raise SourceError(f"the container disk of {self.description} can be read only once")
        self._opened = True
        self.probe()
        assert self._disk is not None
        return _Replay(self._header, self._disk, self.close)

    def close(self) -> None:
        """Drop the layer download and the connections (also when the import stopped before open())."""
        if self._disk is not None:
            with contextlib.suppress(Exception):
                self._disk.close()
        self._client.close()


class _Replay:
    """The header probe() read, then the rest of the disk; closing it ends the download."""

    def __init__(self, head: bytes, rest: DiskStream, on_close: Callable[[], None]) -> None:
        self._head, self._rest, self._on_close = head, rest, on_close

    def read(self, size: int, /) -> bytes:
        if self._head:
            out, self._head = self._head[:size], self._head[size:]
            return out
        return self._rest.read(size)

    def close(self) -> None:
        self._on_close()

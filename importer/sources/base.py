"""The interface every source implements; registry and upload sources will fit the same three calls."""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from pathlib import Path

from importer.deadline import ProgressWatch
from importer.pipeline import Reader


@dataclass(frozen=True)
class SourceInfo:
    """What a cheap look at the source tells: size as served, whether qemu-img can read it in place, the header."""

    size: int | None
    random_access: bool
    header: bytes


class Source(abc.ABC):
    """An endpoint serving the image bytes exactly as stored (compressed or not)."""

    description: str = "source"
    watch: ProgressWatch | None = None  # the progress deadlines of a remote source; None for local ones
    # Why the bytes can only be read in order, when probe() says so (it names the cause in scratch errors).
    sequential_reason: str = "the server does not support Range requests"
    image_digest: str | None = None  # the manifest digest a registry source imported (termination message, logs)

    @abc.abstractmethod
    def probe(self) -> SourceInfo:
        """Look at the source without downloading it."""

    @abc.abstractmethod
    def open(self) -> Reader:
        """A sequential stream of the bytes as served, resuming by itself after transient failures."""

    def close(self) -> None:
        """Release connections held across probe() and open(); most sources hold none."""
        return None

    def open_range(self, start: int, end: int) -> Reader:
        """Bytes [start, end) as a stream; only for sources whose probe said random_access."""
        raise NotImplementedError(f"{self.description} cannot be read at an offset")

    def qemu_input(self, stack: contextlib.ExitStack, workdir: Path) -> str:
        """A filename or URI qemu-img can read at random offsets, kept alive until stack closes."""
        raise NotImplementedError(f"{self.description} cannot be read in place")

"""Clusters of a streamed qcow2 that passed before the L2 table mapping them: kept in memory, then in scratch.

The stream cannot be read twice (an upload, a registry layer), so what may still be data is kept until the last
L2 table has passed. Memory holds up to `memory_limit` bytes; beyond that the clusters go to an unnamed file in
the scratch directory, at their offset in the image (sparse), capped by the scratch volume's free space. Without
a scratch directory, going over the memory bound fails with the bound in the message.
"""

from __future__ import annotations

import bisect
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from importer.errors import InvalidImage, ScratchSpaceRequired

log = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT = 64 * 1024 * 1024
SCRATCH_RESERVE = 0.02  # as the scratch route: a full scratch volume makes every later error confusing


class ClusterBuffer:
    """Cluster index → bytes, for clusters whose role is not known yet; all-zero ones cost no memory."""

    def __init__(self, cluster_size: int, memory_limit: int = DEFAULT_MEMORY_LIMIT, scratch_dir: Path | None = None,
                 on_spill: Callable[[], None] = lambda: None) -> None:
        self._cluster = cluster_size
        self._limit = memory_limit
        self._scratch_dir = scratch_dir
        self._on_spill = on_spill
        self._memory: dict[int, bytes] = {}
        self._memory_bytes = 0
        self._spilled: set[int] = set()
        self._spill: IO[bytes] | None = None
        self._spill_limit = 0
        self._zero_starts: list[int] = []  # runs [start, end) of all-zero clusters, appended in order
        self._zero_ends: list[int] = []
        self.peak_memory = 0
        self.peak_scratch = 0

    def put(self, index: int, data: bytes) -> None:
        if data.count(0) == len(data):
            self._add_zero(index)
        elif self._memory_bytes + len(data) <= self._limit:
            self._memory[index] = data
            self._memory_bytes += len(data)
            self.peak_memory = max(self.peak_memory, self._memory_bytes)
        else:
            self._spill_cluster(index, data)

    def get(self, index: int) -> bytes | None:
        """The cluster's bytes when kept (zeros for an all-zero one), else None."""
        data = self._memory.get(index)
        if data is not None:
            return data
        if index in self._spilled:
            assert self._spill is not None
            return os.pread(self._spill.fileno(), self._cluster, index * self._cluster)
        if self._is_zero(index):
            return bytes(self._cluster)
        return None

    def discard(self, index: int) -> None:
        data = self._memory.pop(index, None)
        if data is not None:
            self._memory_bytes -= len(data)
        self._spilled.discard(index)

    def clear(self) -> None:
        """Every table has passed: nothing kept can be data any more."""
        self._memory.clear()
        self._memory_bytes = 0
        self._zero_starts.clear()
        self._zero_ends.clear()
        self._spilled.clear()
        self.close()

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()  # unnamed: closing frees the space
            self._spill = None

    def _spill_cluster(self, index: int, data: bytes) -> None:
        if self._scratch_dir is None:
            raise ScratchSpaceRequired(
                f"this qcow2 has more than {self._limit} bytes (the in-memory bound) of clusters that arrive "
                "before the L2 tables mapping them; they must wait in scratch space")
        if self._spill is None:
            self._spill = self._open_spill(self._scratch_dir)
            log.warning("qcow2 stream: clusters arriving before their L2 tables exceed %d bytes of memory; "
                        "falling back to scratch %s (an unnamed file, at most %d bytes)", self._limit,
                        self._scratch_dir, self._spill_limit)
            self._on_spill()
        used = (len(self._spilled) + 1) * self._cluster
        if used > self._spill_limit:
            raise InvalidImage(f"the qcow2 clusters waiting for their L2 tables do not fit in scratch space "
                               f"{self._scratch_dir} ({self._spill_limit} bytes usable)")
        os.pwrite(self._spill.fileno(), data, index * self._cluster)
        self._spilled.add(index)
        self.peak_scratch = max(self.peak_scratch, used)

    def _open_spill(self, directory: Path) -> IO[bytes]:
        if not directory.is_dir():
            raise InvalidImage(f"scratch directory {directory} does not exist")
        st = os.statvfs(directory)
        self._spill_limit = int(st.f_bavail * st.f_frsize * (1 - SCRATCH_RESERVE))
        return tempfile.TemporaryFile(dir=directory, prefix="hpp-qcow2-spill-")

    def _add_zero(self, index: int) -> None:
        if self._zero_ends and self._zero_ends[-1] == index:
            self._zero_ends[-1] = index + 1
        else:
            self._zero_starts.append(index)
            self._zero_ends.append(index + 1)

    def _is_zero(self, index: int) -> bool:
        at = bisect.bisect_right(self._zero_starts, index) - 1
        return at >= 0 and index < self._zero_ends[at]

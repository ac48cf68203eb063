"""Where volumes are published, read from the kernel's mount table rather than remembered."""

from __future__ import annotations

import os
from pathlib import Path

from hpp_csi.mounts import MountEntry, mount_containing, mount_table


class Publications:
    """A snapshot of the mount table that answers 'where is this volume bind-mounted?'."""

    def __init__(self, table: list[MountEntry] | None = None) -> None:
        self.table = table if table is not None else mount_table()
        self._by_source: dict[tuple[int, int, str], list[str]] = {}
        for entry in self.table:
            self._by_source.setdefault((entry.major, entry.minor, entry.root), []).append(entry.mount_point)
        self._fs_of_dir: dict[str, tuple[int, int, str]] = {}

    def _source_key(self, path: Path) -> tuple[int, int, str]:
        """How mountinfo names `path` as a bind-mount source; the parent's answer is cached (one pool)."""
        parent = str(path.parent)
        if parent not in self._fs_of_dir:
            entry = mount_containing(parent, self.table)
            rel = os.path.relpath(os.path.realpath(parent), entry.mount_point)
            inner = entry.root if rel == "." else os.path.normpath(os.path.join(entry.root, rel))
            self._fs_of_dir[parent] = (entry.major, entry.minor, inner)
        major, minor, inner = self._fs_of_dir[parent]
        return major, minor, os.path.join(inner, path.name)

    def targets(self, volume_path: Path) -> list[str]:
        """Mount points where `volume_path` is bind-mounted."""
        return list(self._by_source.get(self._source_key(volume_path), []))

    def is_source_of(self, volume_path: Path, target: str) -> bool:
        return target in self.targets(volume_path)

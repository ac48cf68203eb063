"""Where volumes are published, read from the kernel's mount table rather than remembered."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hpp_csi.linux import loop
from hpp_csi.linux.mounts import MountEntry, escape, mount_sources, parse_mountinfo, read_mountinfo


class Publications:
    """A snapshot of the mount table that answers 'where is this volume bind-mounted?'."""

    def __init__(self) -> None:
        self._text = read_mountinfo()
        self._sources: dict[tuple[int, int, str], list[str]] | None = None
        self._table: list[MountEntry] | None = None
        self._fs_of_dir: dict[str, tuple[int, int, str]] = {}

    @property
    def _by_source(self) -> dict[tuple[int, int, str], list[str]]:
        """(major, minor, root) -> mount points, built on first need: most questions end at `_named`."""
        if self._sources is None:
            self._sources = mount_sources(self._text)
        return self._sources

    def _named(self, name: str) -> bool:
        """Whether `name` (escaped as mountinfo writes it) appears in the table at all; a bind mount of a
        volume names the volume's folder in its root field, so when it does not, nothing to parse."""
        return escape(name) in self._text

    @property
    def table(self) -> list[MountEntry]:
        """The full table, parsed only when a caller needs more than sources and mount points."""
        if self._table is None:
            self._table = parse_mountinfo(self._text)
        return self._table

    def _source_key(self, path: Path) -> tuple[int, int, str]:
        """How mountinfo names `path` as a bind-mount source; the parent's answer is cached (one pool)."""
        parent = str(path.parent)
        if parent not in self._fs_of_dir:
            real = os.path.realpath(parent)
            best: tuple[int, int, str, str] | None = None
            for (major, minor, root), points in self._by_source.items():
                for point in points:
                    inside = real == point or real.startswith(point.rstrip("/") + "/")
                    if inside and (best is None or len(point) >= len(best[3])):
                        best = (major, minor, root, point)
            if best is None:
                raise FileNotFoundError(f"no mount holds {parent}")
            major, minor, root, point = best
            rel = os.path.relpath(real, point)
            inner = root if rel == "." else os.path.normpath(os.path.join(root, rel))
            self._fs_of_dir[parent] = (major, minor, inner)
        major, minor, inner = self._fs_of_dir[parent]
        return major, minor, os.path.join(inner, path.name)

    def targets(self, volume_path: Path) -> list[str]:
        """Mount points where `volume_path` is bind-mounted."""
        if not self._named(volume_path.name):
            return []
        return list(self._by_source.get(self._source_key(volume_path), []))

    def of_volume(self, volume_path: Path, mode: str) -> list[str]:
        """Where a volume is published: bind mounts of its directory, or of the loop devices on its image."""
        if mode != "block":
            return self.targets(volume_path)
        try:
            image = os.stat(volume_path, follow_symlinks=False)
        except FileNotFoundError:
            return []
        if not stat.S_ISREG(image.st_mode):
            return []  # a symlink in the image's place is not the image: what it points to is not published
        dev = os.stat("/dev").st_dev
        found = []
        for device in loop.devices_backing_inode(image.st_dev, image.st_ino):
            found += self._by_source.get((os.major(dev), os.minor(dev), "/" + os.path.basename(device.path)), [])
        return found

    def is_source_of(self, volume_path: Path, target: str) -> bool:
        return target in self.targets(volume_path)

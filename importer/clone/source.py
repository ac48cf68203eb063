"""The source side: a volume (or a directory or device) read as a clone manifest and its non-zero blocks.

A volume's contents were written by its tenant: everything is opened beneath a directory descriptor without
following links, and only regular files at the top of a filesystem volume travel (symlinks, FIFOs and
directories are left behind and named in a notice).
"""

from __future__ import annotations

import errno
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hpp_csi.errors import CsiError
from hpp_csi.linux.safe_open import UnsafePath, open_dir, open_regular, opened
from hpp_csi.storage.block_publish import open_image
from hpp_csi.storage.pools import StoragePool
from hpp_csi.storage.publications import Publications
from importer.clone.wire import BLOCK, NAME, Digest, FileEntry, Manifest, is_zero
from importer.errors import ConfigError, ImporterError
from importer.serve.volumes import NodeVolume, VolumeBusy, find_volume, open_volume_dir
from importer.target import DISK_IMAGE_NAME

SKIPPED = frozenset({"lost+found"})  # as CDI's cloner: the filesystem's own folder never travels
PREFETCH = 4  # blocks read ahead of the sender


class SourceRefused(ImporterError):
    """The source cannot be cloned now (published read-write, not a volume, no disk image)."""


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The allocated ranges of a file (SEEK_DATA/SEEK_HOLE); a device or a filesystem without it: all of it."""
    ranges: list[tuple[int, int]] = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            ranges.append((start, end))
            offset = end
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return [(0, size)] if size else []
    return ranges


def grid_blocks(ranges: list[tuple[int, int]], size: int) -> list[int]:
    """The offsets of the BLOCK-sized grid blocks that any range touches, in order."""
    blocks: list[int] = []
    for start, end in ranges:
        first = max(start // BLOCK * BLOCK, blocks[-1] + BLOCK if blocks else 0)
        blocks.extend(range(first, min(end, size), BLOCK))
    return blocks


@dataclass
class SourceFile:
    entry: FileEntry
    fd: int
    blocks: list[int] = field(default_factory=list)  # grid blocks holding data


class CloneSource:
    """The files of one source, opened; its manifest; its non-zero blocks from any logical offset on."""

    def __init__(self, files: list[SourceFile], identity: str, skipped: list[str] | None = None) -> None:
        self.files = files
        self.identity = identity  # what makes the upload id stable for this source (device and inode)
        self.skipped = skipped or []
        self.manifest = Manifest(tuple(f.entry for f in files),
                                 next(i for i, f in enumerate(files) if f.entry.name == DISK_IMAGE_NAME))
        for item in files:
            item.blocks = grid_blocks(data_ranges(item.fd, item.entry.size), item.entry.size)

    @property
    def disk_size(self) -> int:
        return self.manifest.disk_size

    def only_disk(self) -> CloneSource:
        """The disk image alone (a block volume target takes nothing else)."""
        disk = self.files[self.manifest.disk]
        return CloneSource([disk], self.identity, [f.entry.name for f in self.files if f is not disk])

    def data_bytes(self, start: int = 0) -> int:
        """How many bytes of blocks will be read from logical offset start on (the progress total)."""
        total = 0
        for index, item in enumerate(self.files):
            base = self.manifest.base(index)
            total += sum(min(BLOCK, item.entry.size - b) for b in item.blocks if base + b >= start)
        return total

    def blocks(self, start: int = 0, digest: Digest | None = None,
               read: Callable[[int], None] | None = None) -> Iterator[tuple[int, int, memoryview]]:
        """(file, offset, data) of every non-zero block at or after logical offset start; blocks before start are
        read too and fed to digest only (a resumed clone still proves the whole disk). Read ahead in a thread
        into a few reused buffers: a block's data is valid until the next one is asked for."""
        prefetch = _Prefetch(self, start, digest, read)
        try:
            yield from prefetch.blocks()
        finally:
            prefetch.close()

    def close(self) -> None:
        for item in self.files:
            os.close(item.fd)
        self.files = []


class _Prefetch:
    """Reading, zero checks and hashing on their own thread (all three let go of the GIL), so they overlap the
    sender's TLS; PREFETCH buffers go round, none allocated per block."""

    def __init__(self, source: CloneSource, start: int, digest: Digest | None,
                 read: Callable[[int], None] | None) -> None:
        self._source, self._start, self._digest, self._read = source, start, digest, read
        self._full: queue.Queue[tuple[int, int, bytearray, int] | BaseException | None] = queue.Queue()
        self._free: queue.Queue[bytearray | None] = queue.Queue()
        for _ in range(PREFETCH):
            self._free.put(bytearray(BLOCK))
        self._thread = threading.Thread(target=self._run, name="clone-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for index, item in enumerate(self._source.files):
                base = self._source.manifest.base(index)
                for offset in item.blocks:
                    buf = self._free.get()
                    if buf is None:
                        return
                    length = min(BLOCK, item.entry.size - offset)
                    if os.preadv(item.fd, [memoryview(buf)[:length]], offset) != length:
                        raise ImporterError(f"{item.entry.name} shrank while it was cloned (at byte {offset})")
                    if self._read is not None:
                        self._read(length)
                    data = buf if length == BLOCK else bytes(buf[:length])
                    if is_zero(data):
                        self._free.put(buf)
                        continue
                    if self._digest is not None:
                        self._digest.add(index, offset, memoryview(buf)[:length])
                    if base + offset >= self._start:
                        self._full.put((index, offset, buf, length))
                    else:
                        self._free.put(buf)
            self._full.put(None)
        except BaseException as err:  # handed to the consumer
            self._full.put(err)

    def blocks(self) -> Iterator[tuple[int, int, memoryview]]:
        while (item := self._full.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            index, offset, buf, length = item
            yield index, offset, memoryview(buf)[:length]
            self._free.put(buf)

    def close(self) -> None:
        self._free.put(None)
        while self._thread.is_alive():
            try:  # the reader may be waiting to hand over a block: take it so it sees the stop
                item = self._full.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(item, tuple):
                self._free.put(item[2])
                self._free.put(None)
        self._thread.join()


def _entry(name: str, fd: int) -> FileEntry:
    st = os.fstat(fd)
    size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
    return FileEntry(name, size, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)


def open_directory(dir_fd: int, where: str) -> CloneSource:
    """A filesystem volume: disk.img and the other regular files at its top, none of them followed if a link."""
    files: list[SourceFile] = []
    skipped: list[str] = []
    try:
        for name in sorted(os.listdir(dir_fd)):
            if name in SKIPPED:
                continue
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or not NAME.fullmatch(name):
                skipped.append(name)
                continue
            try:
                fd = open_regular(dir_fd, name, os.O_RDONLY)
            except UnsafePath:
                skipped.append(name)  # swapped for a link or FIFO since the listing
                continue
            files.append(SourceFile(_entry(name, fd), fd))
        if not any(f.entry.name == DISK_IMAGE_NAME for f in files):
            raise SourceRefused(f"{where} holds no {DISK_IMAGE_NAME} (a regular file) to clone")
        st = os.fstat(dir_fd)
        return CloneSource(files, f"dir:{st.st_dev}:{st.st_ino}", skipped)
    except BaseException:
        for item in files:
            os.close(item.fd)
        raise


def open_path(path: Path) -> CloneSource:
    """--path: a directory (a filesystem volume's data), or a block device or image file (its raw content)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError as err:
        raise ConfigError(f"cannot read the source {path}: {err.strerror or err}") from err
    if stat.S_ISDIR(st.st_mode):
        with opened(open_dir(path)) as dir_fd:
            return open_directory(dir_fd, str(path))
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ConfigError(f"the source {path} is not a directory, block device or image file (a symlink?)")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    entry = _entry(DISK_IMAGE_NAME, fd)
    return CloneSource([SourceFile(FileEntry(DISK_IMAGE_NAME, entry.size), fd)], f"dev:{st.st_dev}:{st.st_ino}")


def writable_publications(volume: NodeVolume) -> list[str]:
    """Where the volume is published read-write (a pod could be writing it while we read)."""
    targets = Publications().of_volume(volume.path, volume.mode)
    if not targets:
        return []
    from hpp_csi.linux.mounts import mount_table  # the options of each publication's mount

    options = {entry.mount_point: entry.options for entry in mount_table()}
    return [t for t in targets if "ro" not in options.get(t, frozenset())]


def open_volume(pools: list[StoragePool], volume_id: str) -> CloneSource:
    """A volume of this node's pools, refused while a pod has it read-write (the VM must be off)."""
    volume = find_volume(pools, volume_id)
    if volume is None:
        raise SourceRefused(f"volume {volume_id!r} does not exist on this node")
    busy = writable_publications(volume)
    if busy:
        raise SourceRefused(f"volume {volume_id!r} is published read-write at {', '.join(busy)}; stop the VM "
                            "(or publish it read-only) before cloning it")
    if volume.is_block:
        try:
            fd = open_image(volume.path, os.O_RDONLY)
        except CsiError as err:
            raise SourceRefused(f"volume {volume_id!r}: {err.message}") from None
        st = os.fstat(fd)
        return CloneSource([SourceFile(FileEntry(DISK_IMAGE_NAME, st.st_size), fd)], f"vol:{volume_id}:{st.st_ino}")
    try:
        with opened(open_volume_dir(volume)) as dir_fd:
            return open_directory(dir_fd, f"volume {volume_id!r}")
    except VolumeBusy as err:
        raise SourceRefused(str(err)) from None

"""The target side: a clone written into a Target (a file volume's directory, a block volume or device).

Our format arrives as blocks at known offsets; CDI's as a raw stream or a tar, both snappy framed. Every write
is bounded by the target's usable size, holes are skipped (a new file) or punched (a device), and a failure
leaves the target as it was: the temporary disk image and every file this clone made are removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import tarfile
import threading
from dataclasses import dataclass
from typing import IO

from hpp_csi.linux.safe_open import UnsafePath, open_beneath, opened
from importer.archive import Extraction
from importer.clone.wire import Digest, FileEntry, Manifest, is_zero
from importer.errors import ChecksumMismatch, ImporterError, InvalidImage
from importer.pipeline import Reader
from importer.serve.body import BadRequest
from importer.target import (
    DISK_IMAGE_NAME,
    Preallocation,
    SparseWriter,
    Target,
    ZeroPolicy,
    preallocate_file,
    usable_size,
)

log = logging.getLogger(__name__)

FILESYSTEM_CLONE = "filesystem-clone"  # CDI: a tar of the volume's files
BLOCKDEVICE_CLONE = "blockdevice-clone"  # CDI: the raw device
READ_SIZE = 1024 * 1024
WRITE_DEPTH = 4  # blocks received ahead of the writer thread


class TargetTooSmall(InvalidImage):
    """CDI's wording, with the sizes a person needs to pick a larger volume."""

    def __init__(self, source: int, usable: int) -> None:
        super().__init__(f"target resources requests storage size is smaller than the source: the source disk is "
                         f"{source} bytes, the target can hold {usable}")


@dataclass(frozen=True)
class CloneResult:
    kind: str  # the content type that was received
    disk_size: int
    preallocation_applied: bool


@dataclass(frozen=True)
class Placement:
    """Where a clone goes and how much it may hold."""

    target: Target
    usable: int
    preallocate: bool


def placement(target: Target, image_size: int | None, overhead: float, preallocate: bool) -> Placement:
    return Placement(target, usable_size(target.available(), image_size, target.overhead(overhead)), preallocate)


class DiskFile:
    """The disk image being written: the target's temporary file (a directory) or the device itself."""

    def __init__(self, place: Placement, size: int, size_known: bool = True) -> None:
        self.place = place
        self.size = size  # the disk's size, or (a stream) the most it may grow to until finish
        target = place.target
        self.work = target.begin()
        self.fd = target.open_work(self.work, create=not target.is_block)
        mode = Preallocation.FULL if place.preallocate and target.is_block else Preallocation.NONE
        if place.preallocate and size_known and not target.is_block:
            preallocate_file(self.fd, 0, size)
        self.writer = SparseWriter(self.fd, target.zero_policy(mode), size)
        self.zeroed = 0  # a device: everything below this was written or zeroed

    def write_block(self, offset: int, data: bytes) -> None:
        if self.writer.zeroes_holes and offset > self.zeroed:
            self.writer.zero(self.zeroed, offset - self.zeroed)  # the device's old bytes in a hole must go
        self.writer.write_at(offset, data)
        self.zeroed = max(self.zeroed, offset + len(data))

    def sync(self) -> None:
        os.fsync(self.fd)

    def finish(self, entry: FileEntry | None) -> bool:
        """Holes up to the end zeroed (a device), owner and mode set (a file), grown to the usable size; True when
        preallocation was applied."""
        target = self.place.target
        if self.writer.zeroes_holes and self.size > self.zeroed:
            self.writer.zero(self.zeroed, self.size - self.zeroed)
        if not target.is_block:
            if os.fstat(self.fd).st_size < self.size:
                os.ftruncate(self.fd, self.size)
            if entry is not None:
                os.fchown(self.fd, entry.uid, entry.gid)
                os.fchmod(self.fd, entry.mode & 0o777)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        applied = target.finish_size(self.work, self.place.usable, self.place.preallocate, self.size)
        target.commit()
        return self.place.preallocate or applied is not Preallocation.NONE

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.place.target.abort()


class SideFiles:
    """The other files of a filesystem volume, made beside disk.img (never replacing anything there)."""

    def __init__(self, target: Target) -> None:
        self._dir = os.open(target.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._open: dict[str, int] = {}
        self.made: list[str] = []

    def fd(self, entry: FileEntry) -> int:
        if entry.name not in self._open:
            try:
                fd = open_beneath(self._dir, entry.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except (FileExistsError, UnsafePath):
                raise BadRequest(f"{entry.name!r} already exists in the target volume; refusing to replace it") \
                    from None
            self.made.append(entry.name)
            self._open[entry.name] = fd
        return self._open[entry.name]

    def finish(self, entries: list[FileEntry]) -> None:
        for entry in entries:
            fd = self.fd(entry)
            os.ftruncate(fd, entry.size)
            os.fchown(fd, entry.uid, entry.gid)
            os.fchmod(fd, entry.mode & 0o777)
            os.fsync(fd)
        self.close()
        os.fsync(self._dir)

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()

    def abort(self) -> None:
        self.close()
        for name in self.made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self._dir)
        self.made.clear()

    def release(self) -> None:
        os.close(self._dir)


class SparseSession:
    """One clone in our format into one target, across as many connections as it takes (resume)."""

    def __init__(self, place: Placement, manifest: Manifest, upload_id: str) -> None:
        if manifest.disk_size > place.usable:
            raise TargetTooSmall(manifest.disk_size, place.usable)
        self.place = place
        self.manifest = manifest
        self.upload_id = upload_id
        self.position = 0  # logical offset: every block before it is written
        self.digest = Digest()
        self.lock = threading.Lock()
        self.parked = False
        self.expiry: threading.Timer | None = None
        if not place.target.is_block and manifest.total > place.target.available():
            raise TargetTooSmall(manifest.total, place.target.available())  # the other files must fit too
        self.disk = DiskFile(place, manifest.disk_size)
        self.side = None if place.target.is_block else SideFiles(place.target)
        # Hashing and writing on their own thread overlap receiving (TLS) the next blocks; all let go of the GIL.
        self._queue: queue.Queue[tuple[int, int, bytes] | None] = queue.Queue(WRITE_DEPTH)
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._run, name="clone-writer", daemon=True)
        self._writer.start()

    def write(self, file: int, offset: int, data: bytes) -> None:
        """Queued; a write error is raised by a later write, checkpoint or finish."""
        if self._error is not None:
            raise self._error
        self._queue.put((file, offset, data))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self._error is None:
                    self._apply(*item)
            except BaseException as err:
                self._error = err
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _drain(self) -> None:
        self._queue.join()
        if self._error is not None:
            raise self._error

    def _stop(self, discard: bool) -> None:
        if discard and self._error is None:
            self._error = ImporterError("the clone was stopped")  # what is still queued is skipped
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()

    def _apply(self, file: int, offset: int, data: bytes) -> None:
        if is_zero(data):  # a source may send one; it counts for nothing, as holes
            self.position = self.manifest.base(file) + offset + len(data)
            return
        self.digest.add(file, offset, data)
        if file == self.manifest.disk:
            self.disk.write_block(offset, data)
        elif self.side is not None:
            entry = self.manifest.files[file]
            os.pwrite(self.side.fd(entry), data, offset)
        self.position = self.manifest.base(file) + offset + len(data)

    def checkpoint(self) -> int:
        """Durable before it is answered: where a continuation must start."""
        self._drain()
        self.disk.sync()
        return self.position

    def finish(self, digest: bytes) -> CloneResult:
        self._drain()
        self._stop(discard=False)
        expected = self.digest.final(self.manifest)
        if digest != expected:
            raise ChecksumMismatch(f"checksum mismatch: the source's digest of its disk is sha256:{digest.hex()}, "
                                   f"the data received has sha256:{expected.hex()}")
        if self.side is not None:
            self.side.finish([f for i, f in enumerate(self.manifest.files) if i != self.manifest.disk])
        applied = self.disk.finish(self.manifest.files[self.manifest.disk] if self.side is not None else None)
        self._release()
        return CloneResult("hpp-sparse-clone", self.manifest.disk_size, applied)

    def abort(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
        self._stop(discard=True)
        with contextlib.suppress(OSError):
            self.disk.abort()
        if self.side is not None:
            with contextlib.suppress(OSError):
                self.side.abort()
        self._release()

    def _release(self) -> None:
        if self.side is not None:
            self.side.release()
            self.side = None
        self.place.target.release()


# -- CDI's formats ---------------------------------------------------------------------------------------

def receive_raw(stream: Reader, place: Placement, kind: str) -> CloneResult:
    """blockdevice-clone, or the disk.img member of a filesystem-clone: a raw stream written in order."""
    disk = DiskFile(place, place.usable, size_known=False)
    try:
        written = 0
        while data := stream.read(READ_SIZE):
            disk.write_block(written, data)
            written += len(data)
        disk.size = written
        if place.preallocate and not place.target.is_block and written:
            preallocate_file(disk.fd, 0, written)
        applied = disk.finish(None)
    except BaseException:
        disk.abort()
        raise
    return CloneResult(kind, written, applied)


class _TarDisk:
    """A Reader over the first member of a tar whose name holds disk.img (CDI's rule for fs-to-block)."""

    def __init__(self, stream: Reader) -> None:
        self._tar = tarfile.open(fileobj=stream, mode="r|")  # type: ignore[call-overload]  # noqa: SIM115
        for member in self._tar:
            if DISK_IMAGE_NAME in member.name and member.isfile():
                data = self._tar.extractfile(member)
                assert data is not None
                self._data = data
                return
        raise InvalidImage("no disk image found in tar")

    def read(self, size: int, /) -> bytes:
        return bytes(self._data.read(size))

    def close(self) -> None:
        self._tar.close()


class SparseExtraction(Extraction):
    """CDI's tar extracted beneath the volume's directory, zero blocks of each file left as holes."""

    def _write_data(self, fd: int, data: IO[bytes] | None, member: tarfile.TarInfo) -> None:
        writer = SparseWriter(fd, ZeroPolicy.SKIP, member.size)
        offset = 0
        if data is not None:
            while chunk := data.read(READ_SIZE):
                writer.write_at(offset, chunk)
                offset += len(chunk)
        os.ftruncate(fd, member.size)
        os.fsync(fd)


def receive_cdi(kind: str, stream: Reader, place: Placement) -> CloneResult:
    """CDI's cloner stream (already unwrapped from snappy) into the target, as CDI's upload server writes it."""
    if kind == BLOCKDEVICE_CLONE:
        return receive_raw(stream, place, kind)
    try:
        if place.target.is_block:
            return receive_raw(_TarDisk(stream), place, kind)
        with opened(os.open(place.target.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)) as dir_fd:
            extraction = SparseExtraction(dir_fd, place.usable)
            try:
                extraction.run(stream)
                size = _disk_size(dir_fd)
                if place.preallocate and size:
                    with opened(open_beneath(dir_fd, DISK_IMAGE_NAME, os.O_WRONLY)) as fd:
                        preallocate_file(fd, 0, size)
                os.fsync(dir_fd)
            except BaseException:
                extraction.undo()
                raise
        return CloneResult(kind, size, place.preallocate)
    except tarfile.TarError as err:
        raise InvalidImage(f"invalid tar archive: {err}") from err
    finally:
        place.target.release()


def _disk_size(dir_fd: int) -> int:
    try:
        return os.stat(DISK_IMAGE_NAME, dir_fd=dir_fd, follow_symlinks=False).st_size
    except FileNotFoundError:
        return 0


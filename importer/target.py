"""Where the image lands: a directory (disk.img) or a block device; usable space, preallocation, sparse writes."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import math
import os
import queue
import re
import stat
import struct
import threading
import uuid
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from hpp_csi.linux.safe_open import open_regular, opened
from importer.errors import ConfigError, ImageTooLarge, ImporterError
from importer.units import MiB, round_down

DISK_IMAGE_NAME = "disk.img"
PART_NAME = re.compile(r"\.disk\.img\.[0-9a-f]{12}\.part")  # the temporary name of an image being written
DEFAULT_FILESYSTEM_OVERHEAD = 0.055  # CDI's default: 5.5% of a Filesystem-mode PVC is kept for metadata
ZERO_BLOCK = 4096  # hole granularity, as qemu-img convert -S 4k
_ZEROS = bytes(1024 * 1024)
_ZERO_BLOCK = bytes(ZERO_BLOCK)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_BLKGETSIZE64 = 0x80081272

SYNC_FILE_RANGE_WRITE = 0x2
WRITEBACK_EVERY = 32 * 1024 * 1024  # start writeback this often, so the final fsync has little left to wait for
# How often the pacer starts writeback of a file another process writes (xz, zstd, qemu-img): the dirty limits
# of a large node (10% of RAM) would otherwise leave the whole image for the final fsync.
WRITEBACK_INTERVAL = 0.05

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) itself: unlike os.posix_fallocate, it says EOPNOTSUPP instead of silently writing zeros."""
    if length <= 0:
        return
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range now (sync_file_range); errors only lose the overlap."""
    _libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


class WritebackPacer:
    """Starts writeback of a file written by a child process every WRITEBACK_INTERVAL, until the block ends.

    The import then overlaps disk writes with downloading and decoding instead of paying for them all in the
    final fsync. The file is opened by path once it exists (qemu-img creates its own target).
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writeback", daemon=True)

    def __enter__(self) -> WritebackPacer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        fd = -1
        try:
            while not self._stop.wait(WRITEBACK_INTERVAL):
                if fd < 0:
                    try:
                        fd = os.open(self._path, os.O_RDONLY)
                    except OSError:
                        continue  # not created yet
                start_writeback(fd, 0, 0)  # 0, 0: the whole file
        finally:
            if fd >= 0:
                os.close(fd)


def usable_size(available: int, requested: int | None, overhead: float) -> int:
    """Space the disk may use: min(requested, available) * (1 - overhead), rounded down to 1 MiB."""
    if not 0 <= overhead < 1:
        raise ConfigError(f"filesystem overhead {overhead} must be in [0, 1)")
    base = available if requested is None else min(requested, available)
    return round_down(math.floor(base * (1 - overhead)), MiB)


class Preallocation(Enum):
    """What preallocation actually did; CDI reports it in the termination message."""

    NONE = "off"
    FALLOC = "falloc"
    FULL = "full"


class ZeroPolicy(Enum):
    """What to do with an all-zero block of the image."""

    SKIP = "skip"  # a new file, or preallocated with fallocate: the range already reads as zeros
    PUNCH = "punch"  # a block device: discard so it reads as zeros and keeps no stale data
    ALLOCATE = "allocate"  # a block device with preallocation: zero it and keep it allocated
    WRITE = "write"  # full preallocation where fallocate is unsupported: write the zeros


def has_zero_block(data: bytes) -> bool:
    """Whether data holds ZERO_BLOCK zero bytes in a row anywhere: only then can a write of it leave a hole."""
    return _ZERO_BLOCK in data


class SparseWriter:
    """Writes image bytes, turning all-zero 4 KiB blocks into holes (or zeros, by policy).

    write() appends a stream at increasing offsets; write_at() places bytes anywhere below the limit, and is safe
    from several threads at once (pwrite, no shared position) for readers that fetch an image out of order.
    """

    def __init__(self, fd: int, policy: ZeroPolicy, limit: int, skip_below: int = 0) -> None:
        self._fd, self._policy, self._limit = fd, policy, limit
        self.offset = 0
        self._synced = 0
        self._skip = skip_below  # a resumed upload: these first bytes are on disk already, counted but not written
        self._lock = threading.Lock()  # write() against sync_prefix(), which may run on another thread

    @property
    def zeroes_holes(self) -> bool:
        """Whether ranges the image leaves empty must be zeroed (a device) rather than left alone (a new file)."""
        return self._policy is not ZeroPolicy.SKIP

    def write(self, data: bytes) -> None:
        with self._lock:
            start = self.offset
            if start + len(data) > self._skip:
                cut = max(0, self._skip - start)
                self.write_at(start + cut, data[cut:] if cut else data)
            self.offset = end = start + len(data)
        if end - self._synced >= WRITEBACK_EVERY:
            start_writeback(self._fd, self._synced, end - self._synced)
            self._synced = end

    def sync_prefix(self, fd: int, extend: bool) -> int:
        """Make what write() wrote durable through fd (a duplicate of the writer's); the prefix it covers.

        extend: a file whose trailing zero blocks were skipped is grown to the prefix, so the prefix reads back
        whole after a restart.
        """
        with self._lock:
            end = self.offset
            if extend and os.fstat(fd).st_size < end:
                os.ftruncate(fd, end)
        os.fsync(fd)
        return end

    def write_at(self, offset: int, data: bytes) -> None:
        self._check_limit(offset + len(data))
        if data == _ZEROS[: len(data)]:
            self.zero(offset, len(data))
        elif not has_zero_block(data):  # no 4 KiB run of zeros anywhere: one write, no per-block scan
            os.pwrite(self._fd, data, offset)
        else:
            self._write_mixed(offset, data)

    def write_dense(self, offset: int, data: memoryview) -> None:
        """write_at for bytes with no all-zero ZERO_BLOCK anywhere (has_zero_block), at least ZERO_BLOCK of them,
        often a view into a larger chunk: nothing to make a hole of, so one pwrite, no copy, no scan."""
        self._check_limit(offset + len(data))
        os.pwrite(self._fd, data, offset)

    def _check_limit(self, end: int) -> None:
        if end > self._limit:
            raise ImageTooLarge(end, self._limit, at_least=True)

    def _write_mixed(self, offset: int, data: bytes) -> None:
        run_start, run_zero = 0, data[:ZERO_BLOCK] == _ZEROS[: min(ZERO_BLOCK, len(data))]
        for pos in range(ZERO_BLOCK, len(data), ZERO_BLOCK):
            block = data[pos : pos + ZERO_BLOCK]
            zero = block == _ZEROS[: len(block)]
            if zero != run_zero:
                self._emit(offset, data, run_start, pos, run_zero)
                run_start, run_zero = pos, zero
        self._emit(offset, data, run_start, len(data), run_zero)

    def _emit(self, offset: int, data: bytes, start: int, end: int, zero: bool) -> None:
        if zero:
            self.zero(offset + start, end - start)
        else:
            os.pwrite(self._fd, memoryview(data)[start:end], offset + start)

    def zero(self, offset: int, length: int) -> None:
        if self._policy is ZeroPolicy.SKIP:
            return
        if self._policy in (ZeroPolicy.PUNCH, ZeroPolicy.ALLOCATE):
            # Devices zero whole sectors only: write the unaligned edges, let the device zero the middle.
            start = -(-offset // ZERO_BLOCK) * ZERO_BLOCK
            end = max(start, round_down(offset + length, ZERO_BLOCK))
            punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            mode = punch if self._policy is ZeroPolicy.PUNCH else FALLOC_FL_ZERO_RANGE
            try:
                fallocate(self._fd, mode, start, end - start)
                write_zeros(self._fd, offset, min(start, offset + length) - offset)
                write_zeros(self._fd, end, max(0, offset + length - end))
                return
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                    raise
                self._policy = ZeroPolicy.WRITE  # the device cannot zero by itself; remember, do not retry
        write_zeros(self._fd, offset, length)


class BackgroundWriter:
    """Feeds a SparseWriter from its own thread, so decoding the next chunk overlaps writing this one.

    Both sides release the GIL (zlib-ng, socket reads, pwrite), so on two cores a gzip import costs about
    max(decode, write) instead of their sum. At most `depth` chunks wait in between; a write error is raised
    to the producer at its next write() or at close().
    """

    def __init__(self, writer: SparseWriter, depth: int = 8) -> None:
        self._writer = writer
        self._queue: queue.Queue[bytes | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._error is None:  # after a failure, keep draining so the producer never blocks
                try:
                    self._writer.write(data)
                except BaseException as err:  # handed to the producer thread
                    self._error = err

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(data)

    def close(self) -> None:
        """Wait for every queued chunk; raises the writer's error if there was one."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            with contextlib.suppress(BaseException):  # the producer's own error explains more
                self.close()


def write_zeros(fd: int, offset: int, length: int) -> None:
    while length > 0:
        step = min(length, len(_ZEROS))
        os.pwrite(fd, _ZEROS[:step], offset)
        offset += step
        length -= step


def preallocate_file(fd: int, offset: int, length: int) -> Preallocation:
    """Allocate [offset, offset+length): fallocate where the filesystem can, else write zeros ("full")."""
    try:
        fallocate(fd, 0, offset, length)
        return Preallocation.FALLOC
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    write_zeros(fd, offset, length)
    return Preallocation.FULL


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Target:
    """Common interface of the two destinations; the processor only talks to this."""

    path: Path

    is_block = False

    def available(self) -> int:
        raise NotImplementedError

    def overhead(self, configured: float) -> float:
        return configured

    def begin(self) -> Path:
        """The path to write to until commit."""
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def current_size(self, work: Path) -> int:
        raise NotImplementedError

    def adopt(self, name: str) -> None:
        """Go on writing the temporary file `name` a previous process left (a resumed upload)."""
        raise ImporterError(f"{self.path} is written in place: there is no temporary file to resume")

    def open_work(self, work: Path, create: bool) -> int:
        """The path begin() returned, opened for writing: a new file (create), or the one a resumed upload left."""
        raise NotImplementedError

    def open_prefix(self, name: str) -> int:
        """What a resumed upload left (its temporary file `name`, or the device), opened to read its prefix back."""
        raise NotImplementedError

    def release(self) -> None:
        """Done with this target without an import (a check): close what it holds, touch nothing."""

    def discard_leftovers(self) -> None:
        """Remove what an import that did not end (a killed process) left in the destination."""

    def zero_policy(self, preallocation: Preallocation) -> ZeroPolicy:
        raise NotImplementedError

    def finish_size(self, work: Path, usable: int, preallocate: bool, written: int) -> Preallocation:
        """Grow to the usable size (never shrink) and preallocate the growth when asked."""
        raise NotImplementedError


class FileTarget(Target):
    """A directory (the PVC mount); the image becomes <dir>/disk.img through a hidden temporary name."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        if not directory.is_dir():
            raise ConfigError(f"destination {directory} is not a directory or a block device")
        self.final = directory / DISK_IMAGE_NAME
        self.work: Path | None = None

    def available(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def begin(self) -> Path:
        if self.work is None:  # else adopted: a resumed upload goes on in the file it left
            self.work = self.path / f".{DISK_IMAGE_NAME}.{uuid.uuid4().hex[:12]}.part"
        return self.work

    def adopt(self, name: str) -> None:
        """Go on writing the temporary file a previous process left (a resumed upload); begin() returns it."""
        if not PART_NAME.fullmatch(name):
            raise ImporterError(f"{name!r} is not a temporary image name in {self.path}")
        self.work = self.path / name

    def _dir(self) -> int:
        # By path each time: the path is trusted (the mount, or /proc/<pid>/fd/<fd> of a checked volume); what is
        # inside it is not, so every name below is opened beneath this descriptor without following links.
        return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def open_work(self, work: Path, create: bool) -> int:
        flags = os.O_WRONLY | (os.O_CREAT | os.O_EXCL if create else 0)
        with opened(self._dir()) as dir_fd:
            fd = open_regular(dir_fd, work.name, flags, 0o660)
        return _single_link(fd, work)

    def open_prefix(self, name: str) -> int:
        if not PART_NAME.fullmatch(name):
            raise ImporterError(f"{name!r} is not a temporary image name in {self.path}")
        with opened(self._dir()) as dir_fd:
            fd = open_regular(dir_fd, name, os.O_RDONLY)
        return _single_link(fd, self.path / name)

    def discard_leftovers(self) -> None:
        """Temporary images of imports that never ended: only our own names, never followed."""
        with opened(self._dir()) as dir_fd:
            for name in os.listdir(dir_fd):
                if PART_NAME.fullmatch(name) and (self.work is None or name != self.work.name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=dir_fd)
            os.fsync(dir_fd)

    def commit(self) -> None:
        with opened(self._dir()) as dir_fd:
            if self.work is not None:  # else an archive: its entries were renamed into place one by one
                with opened(open_regular(dir_fd, self.work.name, os.O_RDONLY)) as fd:
                    os.fsync(fd)
                os.replace(self.work.name, DISK_IMAGE_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)  # the rename itself must survive a crash
        self.work = None

    def abort(self) -> None:
        if self.work is not None:
            with opened(self._dir()) as dir_fd, contextlib.suppress(FileNotFoundError):
                os.unlink(self.work.name, dir_fd=dir_fd)
            self.work = None

    def current_size(self, work: Path) -> int:
        return work.stat().st_size

    def zero_policy(self, preallocation: Preallocation) -> ZeroPolicy:
        # A new file reads as zeros, and a preallocated one was allocated (or zero-filled) beforehand.
        return ZeroPolicy.SKIP

    def finish_size(self, work: Path, usable: int, preallocate: bool, written: int) -> Preallocation:
        with opened(self._dir()) as dir_fd:
            fd = open_regular(dir_fd, work.name, os.O_RDWR | os.O_CREAT, 0o660)
        try:
            size = os.fstat(fd).st_size
            applied = Preallocation.NONE
            if usable > size:
                # Only the growth: the image part was preallocated while it was written (or by qemu-img).
                if preallocate:
                    applied = preallocate_file(fd, size, usable - size)
                else:
                    os.ftruncate(fd, usable)
            os.fsync(fd)
            return applied
        finally:
            os.close(fd)


class BlockTarget(Target):
    """A raw block device (volumeMode: Block): written in place, no filesystem, so no overhead."""

    is_block = True

    def __init__(self, device: Path) -> None:
        super().__init__(device)
        self._check_not_in_use()

    def _check_not_in_use(self) -> None:
        # O_EXCL on a block device fails with EBUSY while it is mounted or held by another opener.
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_EXCL)
        except OSError as err:
            raise ImporterError(f"cannot open block device {self.path} exclusively: {err.strerror}") from err
        os.close(fd)

    def available(self) -> int:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
            return int(struct.unpack("Q", buf)[0])
        finally:
            os.close(fd)

    def overhead(self, configured: float) -> float:
        return 0.0

    def begin(self) -> Path:
        return self.path

    def commit(self) -> None:
        fsync_path(self.path)

    def abort(self) -> None:
        # A device cannot be swapped atomically; everything checkable was checked before the first write.
        pass

    def current_size(self, work: Path) -> int:
        return self.available()

    def open_work(self, work: Path, create: bool) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)

    def open_prefix(self, name: str) -> int:
        return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def zero_policy(self, preallocation: Preallocation) -> ZeroPolicy:
        return ZeroPolicy.PUNCH if preallocation is Preallocation.NONE else ZeroPolicy.ALLOCATE

    def finish_size(self, work: Path, usable: int, preallocate: bool, written: int) -> Preallocation:
        """Zero the device past the image, so the guest never sees what was there before."""
        fd = os.open(self.path, os.O_RDWR)
        try:
            writer = SparseWriter(fd, ZeroPolicy.ALLOCATE if preallocate else ZeroPolicy.PUNCH, usable)
            writer.zero(written, usable - written)
            os.fsync(fd)
        finally:
            os.close(fd)
        return Preallocation.FULL if preallocate else Preallocation.NONE


def _single_link(fd: int, work: Path) -> int:
    """A temporary image hard-linked elsewhere would have us write into another file: refused."""
    if os.fstat(fd).st_nlink != 1:
        os.close(fd)
        raise ImporterError(f"{work.name} in {work.parent} has other hard links; refusing to write it")
    return fd


def open_target(dest: Path) -> Target:
    """A FileTarget for a directory, a BlockTarget for a block device."""
    try:
        mode = os.stat(dest).st_mode
    except FileNotFoundError as err:
        raise ConfigError(f"destination {dest} does not exist") from err
    if stat.S_ISBLK(mode):
        return BlockTarget(dest)
    return FileTarget(dest)

"""A resumable upload's durable state: the record that lets it continue after the server process is restarted.

The record says which bytes of the image are on disk and fsynced (the committed prefix of the target's temporary
file, of a block target, or of a scratch file) and for which upload. It lives in a directory the server owns, is
replaced atomically (temporary file, fsync, rename, fsync of the directory), and is read back as hostile input:
every field is checked, it is opened without following links, and nothing it says is trusted beyond what reading
the prefix back (and the final checksum) verifies. See docs/upload.md.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hpp_csi.linux.safe_open import UnsafePath, open_beneath, open_regular, opened
from importer.errors import ConfigError, ImporterError, InvalidImage
from importer.pipeline import Checksum, Reader
from importer.processor import Route
from importer.target import PART_NAME, SparseWriter, Target

log = logging.getLogger(__name__)

VERSION = 1
MAX_RECORD = 4096
# While bytes flow, commit this often (bytes or seconds), so a kill during a live connection keeps most of them.
# Rare on purpose: the fsync holds the connection's reader; a park or a HEAD commits anyway.
COMMIT_EVERY = 1024 * 1024 * 1024
COMMIT_INTERVAL = 10.0
RAW, SCRATCH = "raw", "scratch"  # the committed prefix is the target's (written in place) or a scratch file's
SCRATCH_NAME = re.compile(r"hpp-import-[0-9a-f]{12}\.[a-z0-9]{1,8}")
_ID = re.compile(r"[A-Za-z0-9._-]{8,128}")


class RecordRefused(ImporterError):
    """A record that is malformed, forged or no longer matches the disk: the upload starts again from byte 0."""


@dataclass(frozen=True)
class ResumeRecord:
    upload_id: str
    length: int
    checksum: str | None
    route: str  # RAW or SCRATCH
    resumable: bool  # False: a stream decoded on its way (gz, xz ...); kept only so a restart cleans its work
    offset: int  # bytes of the image on disk and fsynced
    work: str  # the target's temporary file ("" on a block target) or the scratch file, a bare name

    def to_json(self) -> bytes:
        return json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True).encode()


def parse_record(data: bytes) -> ResumeRecord:
    """The record, every field checked; RecordRefused says what is wrong."""
    try:
        value = json.loads(data)
    except ValueError as err:
        raise RecordRefused(f"not JSON: {err}") from None
    if not isinstance(value, dict) or value.get("version") != VERSION:
        raise RecordRefused("not a version 1 record")
    upload_id, length, offset = value.get("upload_id"), value.get("length"), value.get("offset")
    checksum, route, resumable, work = value.get("checksum"), value.get("route"), value.get("resumable"), \
        value.get("work")
    if not isinstance(upload_id, str) or not _ID.fullmatch(upload_id):
        raise RecordRefused("bad upload id")
    if not isinstance(length, int) or not isinstance(offset, int) or not _count(length) or not _count(offset) \
            or offset > length:
        raise RecordRefused(f"bad length or offset ({length!r}, {offset!r})")
    if checksum is not None:
        if not isinstance(checksum, str):
            raise RecordRefused("bad checksum")
        try:
            Checksum(checksum)
        except ConfigError as err:
            raise RecordRefused(str(err)) from None
    if route not in (RAW, SCRATCH) or not isinstance(resumable, bool) or not isinstance(work, str):
        raise RecordRefused("bad route or work file")
    if not valid_work_name(route, work):
        raise RecordRefused(f"bad work file name {work[:64]!r}")
    return ResumeRecord(upload_id, length, checksum, route, resumable, offset, work)


def valid_work_name(route: object, work: object) -> bool:
    if not isinstance(work, str):
        return False
    if route == SCRATCH:
        return SCRATCH_NAME.fullmatch(work) is not None
    return work == "" or PART_NAME.fullmatch(work) is not None


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


def open_owned_dir(directory: Path) -> int:
    """A folder the server owns (configured, trusted: followed); the names in it are opened beneath it."""
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


class RecordStore:
    """One destination's record: `name` in `directory` (a folder the server owns)."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory, self.name = directory, name
        self._tmp = f".{name}.tmp"

    def write(self, record: ResumeRecord) -> None:
        """Atomically: after a crash the record is the old one or this one, never a mix."""
        with opened(open_owned_dir(self.directory)) as dir_fd:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp, dir_fd=dir_fd)
            fd = open_beneath(dir_fd, self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, record.to_json())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(self._tmp, self.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)

    def read(self) -> ResumeRecord | None:
        """None when there is no record; RecordRefused for one that is malformed or not a plain file."""
        data = self.read_bytes()
        return None if data is None else parse_record(data)

    def read_bytes(self) -> bytes | None:
        try:
            with opened(open_owned_dir(self.directory)) as dir_fd, \
                    opened(open_regular(dir_fd, self.name, os.O_RDONLY)) as fd:
                data = os.read(fd, MAX_RECORD + 1)
        except FileNotFoundError:
            return None
        except UnsafePath as err:
            raise RecordRefused(f"{self.name} is not a plain file ({err.strerror})") from None
        except OSError as err:
            if err.errno in (errno.ENXIO, errno.ENOTDIR):
                raise RecordRefused(f"{self.name} is not a plain file") from None
            raise
        if len(data) > MAX_RECORD:
            raise RecordRefused(f"larger than {MAX_RECORD} bytes")
        return data

    def remove(self) -> None:
        """Durably; whatever is at the name (a planted link is removed, never followed)."""
        try:
            with opened(open_owned_dir(self.directory)) as dir_fd:
                for name in (self.name, self._tmp):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=dir_fd)
                os.fsync(dir_fd)
        except FileNotFoundError:
            pass


@dataclass(frozen=True)
class Destination:
    """What a resumable upload needs to know about where it lands: its record, its target, its scratch folder."""

    store: RecordStore
    scratch_dir: Path | None


def clean(destination: Destination, target: Target) -> None:
    """Remove every trace of an upload that will not continue: its record, its work file, stale temporary files.

    target is a fresh one, used only for this (it is aborted: a block volume's image goes back to holes).
    """
    try:
        work = ""
        try:
            data = destination.store.read_bytes()
            value = json.loads(data) if data else None
            if isinstance(value, dict) and valid_work_name(value.get("route"), value.get("work")):
                work = value["work"] if value.get("route") == SCRATCH else ""
        except (RecordRefused, ValueError, OSError):
            pass  # nothing readable names a scratch file; the rest is still cleaned
        if work and destination.scratch_dir is not None:
            with opened(open_owned_dir(destination.scratch_dir)) as fd, \
                    contextlib.suppress(FileNotFoundError):
                os.unlink(work, dir_fd=fd)
        target.discard_leftovers()
        destination.store.remove()
    finally:
        target.abort()  # a block volume's image back to holes: it held nothing before, or this upload's bytes


def restore(destination: Destination, target: Target, upload_id: str, length: int | None) -> ResumeRecord | None:
    """The committed prefix of upload_id when it can go on after a restart; None when nothing of it is held.

    RecordRefused when the record names it but cannot be trusted (forged, another length, a prefix missing on
    disk) or belongs to a stream that cannot resume: the caller cleans and the client starts from byte 0.
    length None (a HEAD): any length; the continuation checks it.
    """
    record = destination.store.read()
    if record is None or record.upload_id != upload_id:
        return None
    if length is not None and record.length != length:
        raise RecordRefused(f"upload {upload_id} is {record.length} bytes long, not {length}")
    if not record.resumable:
        raise RecordRefused(f"upload {upload_id} was a compressed stream decoded straight into its target, "
                            "which cannot resume after a restart")
    if record.route == RAW and bool(record.work) == target.is_block:
        raise RecordRefused("its work file does not match the destination")
    try:
        fd = open_prefix(destination, target, record)
    except (FileNotFoundError, UnsafePath, ImporterError) as err:
        raise RecordRefused(f"its work file is gone or not a plain file ({err})") from None
    with opened(fd):
        size = os.fstat(fd).st_size if not target.is_block or record.route == SCRATCH else None
    if size is not None and size < record.offset:
        raise RecordRefused(f"it says {record.offset} bytes are on disk, the file holds {size}")
    return record


def open_prefix(destination: Destination, target: Target, record: ResumeRecord) -> int:
    """The file holding the committed prefix, opened for reading without following links."""
    if record.route == RAW:
        return target.open_prefix(record.work)
    if destination.scratch_dir is None:
        raise RecordRefused("the record names a scratch file and no scratch folder is configured")
    with opened(open_owned_dir(destination.scratch_dir)) as dir_fd:
        return open_regular(dir_fd, record.work, os.O_RDONLY)


class ResumedReader:
    """The committed prefix read back from disk, then the rest as it arrives: the import sniffs, checks and hashes
    the whole image as it did the first time, while its writer skips the prefix (those bytes are there)."""

    def __init__(self, fd: int, length: int, rest: Reader) -> None:
        self._fd, self._left, self._offset, self._rest = fd, length, 0, rest

    def read(self, size: int, /) -> bytes:
        if self._left <= 0:
            self.close()
            return self._rest.read(size)
        data = os.pread(self._fd, min(size, self._left), self._offset)
        if not data:
            raise RecordRefused(f"the prefix on disk ended at byte {self._offset}")
        self._offset += len(data)
        self._left -= len(data)
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class DurableUpload:
    """The ImportProcessor's DurableWork for one resumable upload: writes and updates its record.

    attach() (the import chose its route) writes the record; commit() (a park, a HEAD, and periodically while
    bytes flow) fsyncs the prefix the writer has written and records it; close() (the import ended, either way)
    removes the record.
    """

    def __init__(self, store: RecordStore, upload_id: str, length: int, checksum: str | None,
                 restored: ResumeRecord | None = None) -> None:
        self._store, self._id, self._length, self._checksum = store, upload_id, length, checksum
        self._restored = restored
        self.offset = restored.offset if restored else 0
        self.scratch_name = restored.work if restored and restored.route == SCRATCH else None
        self.committed = self.offset
        self.resumable = False
        self._record: ResumeRecord | None = None
        self._writer: SparseWriter | None = None
        self._fd = -1
        self._extend = True
        self._closed = False
        self._lock = threading.Lock()
        self._last_commit = (time.monotonic(), self.offset)
        self.prefix: ResumedReader | None = None  # closed with the upload

    def attach(self, route: Route, resumable: bool, work: Path, fd: int, writer: SparseWriter | None) -> None:
        kind = SCRATCH if route is Route.SCRATCH else RAW
        restored = self._restored
        if restored is not None and (not resumable or restored.route != kind):
            raise InvalidImage(f"the bytes of upload {self._id} on disk no longer make the image they started; "
                               "start again from byte 0")
        name = work.name if kind == SCRATCH or PART_NAME.fullmatch(work.name) else ""
        with self._lock:
            if self._closed:
                return
            self._record = ResumeRecord(self._id, self._length, self._checksum, kind, resumable and writer is not None,
                                        self.committed, name)
            try:
                self._store.write(self._record)
            except OSError as err:  # the upload still resumes in memory; a restart starts it again
                log.warning("upload %s: cannot write its resume record in %s: %s", self._id, self._store.directory,
                            err)
                self._record = None
                return
            if self._record.resumable:
                self._writer, self._fd, self._extend = writer, os.dup(fd), kind == SCRATCH or bool(name)
                self.resumable = True

    def commit(self) -> int:
        """Make the bytes written so far durable and record them; the committed offset."""
        with self._lock:
            if self._closed or self._writer is None or self._record is None:
                return self.committed
            end = self._writer.sync_prefix(self._fd, self._extend)
            if end > self.committed:
                self._record = ResumeRecord(**{**asdict(self._record), "offset": end})
                self._store.write(self._record)
                self.committed = end
            self._last_commit = (time.monotonic(), end)
            return self.committed

    def behind(self) -> bool:
        """The writer has written bytes past the committed offset (a cheap look, no lock: a hint for a commit)."""
        writer = self._writer
        return self.resumable and writer is not None and writer.offset > self.committed

    def commit_if_due(self, taken: int) -> None:
        """While bytes flow: a commit every COMMIT_EVERY bytes or COMMIT_INTERVAL seconds."""
        when, where = self._last_commit
        if self.resumable and (taken - where >= COMMIT_EVERY or time.monotonic() - when >= COMMIT_INTERVAL):
            self.commit()

    def close(self) -> None:
        """The import ended (complete, failed, cancelled): nothing is left to resume."""
        with self._lock:
            self._closed, self.resumable, self._writer = True, False, None
            if self.prefix is not None:
                self.prefix.close()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            try:
                self._store.remove()
            except OSError as err:
                log.warning("cannot remove the resume record %s: %s", self._store.name, err)

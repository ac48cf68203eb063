"""Per-volume metadata: one small record per volume beside the volumes, never inside one.

A pool's records live in `<volumes_dir>/.hpp-csi/volumes/<id>.json`: an empty file whose extended attribute
`trusted.hpp-csi.record` holds the JSON. Made under a temporary name and renamed into place, it is all
metadata, carried by the filesystem's journal, so one fsync of the records folder makes a change durable, and
calls in flight together share that fsync (group_commit.py). Records written before this layout (or where the
filesystem takes no such attribute, or the record is too large for one) hold the JSON as the file's content;
both are read, and a record is rewritten in the new form the next time it changes (docs/reliability.md).
Snapshot records (snapshots.py) take the same two forms, with a flush of their own folder.

There is no global state file, so a change costs the same whatever the number of volumes. An entry that is not
what the driver wrote (a directory, a symlink, unreadable JSON, a record naming another volume) is a BadEntry:
logged, counted, reported in the volume's condition, and left where it is.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpp_csi import errors
from hpp_csi.linux import atomic
from hpp_csi.linux.safe_open import UnsafePath, open_regular, opened
from hpp_csi.storage.group_commit import GroupCommit

log = logging.getLogger(__name__)

META_DIR = ".hpp-csi"
FORMAT_VERSION = 1
RECORD_XATTR = "trusted.hpp-csi.record"  # trusted.*: only root (CAP_SYS_ADMIN) reads or writes it
# Above this a record is kept as file content: ext4 holds an attribute in one block, XFS up to 64 KiB.
XATTR_LIMIT = 3072
# The filesystem (or the driver's privileges) cannot hold the record as an attribute: keep it as content.
_NO_XATTR = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.E2BIG, errno.ENOSPC, errno.ERANGE, errno.EPERM})


@dataclass
class VolumeRecord:
    """What the driver must remember about a volume to answer calls the same way after a restart."""

    volume_id: str
    pool: str
    capacity_bytes: int = 0
    parameters: dict[str, str] = field(default_factory=dict)
    mode: str = "mount"  # "mount": a directory; "block": a sparse file attached to a loop device
    ephemeral: bool = False
    content_source: dict[str, str] | None = None
    context: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    adopted: bool = False  # found on disk without metadata (a crash, or a volume made by another driver)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        # A shallow walk: dataclasses.asdict deep-copies every value and was half the cost of a CreateVolume.
        return {"version": FORMAT_VERSION, **{name: getattr(self, name) for name in self.__dataclass_fields__}}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> VolumeRecord:
        if not isinstance(raw, dict):
            raise TypeError(f"expected a JSON object, found {type(raw).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass(frozen=True)
class BadEntry:
    """Something in a pool the driver did not write as it is now; reported, never deleted."""

    pool: str
    kind: str  # "volume-record", "pool-entry", "snapshot", "legacy-snapshot", "metadata"
    path: str
    reason: str
    volume_id: str = ""


class BadEntries:
    """The bad entries found so far, for logs, the `hpp_csi_bad_entries` metric and volume conditions."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._entries: dict[str, BadEntry] = {}

    def add(self, entry: BadEntry) -> None:
        with self._guard:
            if entry.path in self._entries:
                return
            self._entries[entry.path] = entry
        log.error("storage pool %s: %s %s: %s; leaving it as it is", entry.pool, entry.kind, entry.path, entry.reason)

    def forget(self, path: str) -> None:
        """The entry at `path` was replaced by the driver on request (a retried create wrote a good record)."""
        with self._guard:
            self._entries.pop(path, None)

    def __len__(self) -> int:
        return len(self._entries)

    def counts(self) -> Counter[tuple[str, str]]:
        with self._guard:
            return Counter((e.pool, e.kind) for e in self._entries.values())

    def of_volume(self, volume_id: str) -> list[BadEntry]:
        with self._guard:
            return [e for e in self._entries.values() if e.volume_id == volume_id]

    def all(self) -> list[BadEntry]:
        with self._guard:
            return list(self._entries.values())


def describe(st: os.stat_result) -> str:
    """What kind of file `st` is, in words for a message."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file"), (stat.S_ISLNK, "a symlink"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((text for test, text in kinds if test(st.st_mode)), "an unknown kind of file")


class MetadataStore:
    """Reads and writes the records of one pool; every write is atomic, and durable when it returns."""

    def __init__(self, volumes_dir: Path) -> None:
        self.root = volumes_dir / META_DIR
        self.records_dir = self.root / "volumes"
        self._records = str(self.records_dir)
        # Every create, change and delete of a record renames or unlinks in records_dir, after the volume's own
        # changes: fsyncing that folder forces the journal past all of them (XFS and ext4 commit in order).
        self._records_flush = atomic.FolderFlush(self._records)
        self.commits = GroupCommit(self._records_flush, f"the records in {self.records_dir}")
        self.xattrs = True  # records as attributes; False once the filesystem refused one
        self.trash_dir = self.root / "trash"
        self.staging_dir = self.root / "staging"

        self.snapshots_dir = self.root / "snapshots-v2"  # one folder per snapshot: {record.json, data}
        self.legacy_snapshots_dir = self.root / "snapshots"  # before: <id> and <id>.json side by side
        # A snapshot is made or removed by one rename in snapshots_dir: its own folder, its own shared flush
        # (fsyncing the records folder would not force the journal past a change made only here).
        self._snapshots_flush = atomic.FolderFlush(self.snapshots_dir)
        self.snapshot_commits = GroupCommit(self._snapshots_flush, f"the snapshots in {self.snapshots_dir}")

    def own_folders(self) -> tuple[Path, ...]:
        return self.root, self.records_dir, self.trash_dir, self.staging_dir, self.snapshots_dir

    def prepare(self) -> None:
        for folder in self.own_folders():
            try:
                folder.mkdir(mode=0o700)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(folder).st_mode):
                    return  # never create inside what is there instead: the pool's check names it

    def path_of(self, volume_id: str) -> Path:
        return self.records_dir / f"{volume_id}.json"

    def ids(self, pool: str = "", bad: BadEntries | None = None) -> list[str]:
        """IDs with a metadata entry; leftovers of our interrupted writes are removed on the way, and entries
        that are not regular files are reported to `bad` (their volume is still listed, as abnormal)."""
        found = []
        with os.scandir(self.records_dir) as entries:
            for entry in entries:
                name = entry.name
                regular = entry.is_file(follow_symlinks=False)
                if name.startswith(".") and name.endswith(atomic.TMP_SUFFIX) and regular:
                    os.unlink(entry.path)
                elif name.endswith(".json") and not name.startswith("."):
                    found.append(name[: -len(".json")])
                    if not regular and bad is not None:
                        what = describe(entry.stat(follow_symlinks=False))
                        bad.add(BadEntry(pool, "volume-record", entry.path, f"is {what}, not a record file",
                                         name[: -len(".json")]))
                elif bad is not None:
                    bad.add(BadEntry(pool, "metadata", entry.path, "is not a file the driver writes"))
        return found

    def read(self, volume_id: str, folder: int | None = None) -> tuple[VolumeRecord | None, str]:
        """(the record, "") or (None, why it cannot be used); (None, "") when there is none. `folder`: the
        records folder, opened once by a caller reading many (start-up)."""
        try:
            if folder is None:
                with opened(self.open_folder()) as own:
                    return self.read(volume_id, own)
            raw = json.loads(self._read_attribute(volume_id, folder) or self._read_content(volume_id, folder))
            record = VolumeRecord.from_json(raw)
            if record.volume_id != volume_id:
                raise ValueError(f"it names volume {record.volume_id!r}")
            return record, ""
        except FileNotFoundError:
            return None, ""
        except UnsafePath as exc:
            return None, f"is not a record file ({exc.strerror})"
        except (ValueError, TypeError, OSError) as exc:
            return None, f"is unreadable ({exc})"

    def _read_attribute(self, volume_id: str, folder: int) -> bytes:
        """The record of an empty regular record file, by two path calls (start-up reads 10,000 of them);
        b"" when the file is anything else, which `_read_content` then judges."""
        name = f"{volume_id}.json"
        st = os.lstat(name, dir_fd=folder)
        if not stat.S_ISREG(st.st_mode) or st.st_size:
            return b""
        try:
            return os.getxattr(f"{self._records}/{name}", RECORD_XATTR, follow_symlinks=False)
        except OSError:
            return b""  # swapped since the lstat, or no attribute: the careful path says why

    @staticmethod
    def _read_content(volume_id: str, folder: int) -> bytes:
        return read_record_file(folder, f"{volume_id}.json")

    def load(self, volume_id: str) -> VolumeRecord | None:
        """The record, or None when absent or unreadable (then the volume is adopted from what is on disk)."""
        record, problem = self.read(volume_id)
        if problem:
            log.warning("metadata of volume %s %s; treating the volume as adopted", volume_id, problem)
        return record

    def open_folder(self) -> int:
        """The records folder, as a descriptor to read records beneath."""
        return os.open(self._records, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def save(self, record: VolumeRecord) -> None:
        """Write the record and return once it is durable (with everything the caller changed before)."""
        data = json.dumps(record.to_json(), sort_keys=True, separators=(",", ":")).encode()
        try:
            self.write_record(self._records, f"{record.volume_id}.json", data)
        except IsADirectoryError:
            raise self._not_a_record(record.volume_id) from None
        self.commits.wait_durable()

    def write_record(self, folder: str, name: str, data: bytes) -> None:
        """Put a record (a volume's or a snapshot's) at `folder/name`: as an attribute, durable with the next
        flush of `folder`'s filesystem journal; as content, flushed itself, where no attribute can hold it."""
        if not self._save_as_xattr(folder, name, data):
            atomic.write_bytes(Path(folder, name), data)

    def _save_as_xattr(self, folder: str, name: str, data: bytes) -> bool:
        if not self.xattrs or len(data) > XATTR_LIMIT:
            return False
        try:
            atomic.write_xattr_file(folder, name, RECORD_XATTR, data)
        except OSError as exc:
            if exc.errno not in _NO_XATTR:
                raise
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                self.xattrs = False
                log.warning("%s cannot hold records as %s (%s): writing them as file content, which costs a "
                            "second flush per change", folder, RECORD_XATTR, exc.strerror)
            return False
        return True

    def remove(self, volume_id: str) -> None:
        """Remove the record and return once that is durable (with everything the caller changed before)."""
        try:
            atomic.remove(f"{self._records}/{volume_id}.json", durable=False)
        except IsADirectoryError:
            raise self._not_a_record(volume_id) from None
        self.commits.wait_durable()

    def close(self) -> None:
        """Let go of the folders' descriptors (the driver stops)."""
        self._records_flush.close()
        self._snapshots_flush.close()

    def check_removable(self, volume_id: str) -> None:
        """Raise FAILED_PRECONDITION when the record's place holds a directory, which remove() would refuse."""
        try:
            st = os.lstat(f"{self._records}/{volume_id}.json")
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise self._not_a_record(volume_id)

    def _not_a_record(self, volume_id: str) -> errors.CsiError:
        return errors.failed_precondition(
            f"volume {volume_id!r}: {self.path_of(volume_id)} is a directory where its record file belongs; the "
            "driver leaves it alone: move it away by hand, then retry"
        )


def read_record_file(folder: int, name: str) -> bytes:
    """A record's JSON, either form: the file's content, or the attribute of an empty file. Refuses what is not
    a regular file (UnsafePath) and anything too large."""
    with opened(open_regular(folder, name)) as fd:
        return read_record_bytes(fd) or read_record_xattr(fd)


def read_record_xattr(fd: int) -> bytes:
    """The record an empty record file carries as its attribute."""
    try:
        return os.getxattr(fd, RECORD_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise ValueError("empty, and without a record attribute") from None
        raise


def read_record_bytes(fd: int, limit: int = 1 << 20) -> bytes:
    """A record's bytes; a record is small, so a huge file is refused rather than read."""
    data = os.read(fd, limit + 1)
    chunks = [data]
    while data and sum(map(len, chunks)) <= limit:
        data = os.read(fd, limit + 1)
        chunks.append(data)
    joined = b"".join(chunks)
    if len(joined) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return joined

"""Per-volume metadata: one small JSON file per volume beside the volumes, never inside one.

A pool's metadata lives in `<volumes_dir>/.hpp-csi/volumes/<id>.json`. There is no global state file, so a
change costs one atomic write whatever the number of volumes. An entry that is not what the driver wrote (a
directory, a symlink, unreadable JSON, a record naming another volume) is a BadEntry: logged, counted, reported
in the volume's condition, and left where it is.
"""

from __future__ import annotations

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

log = logging.getLogger(__name__)

META_DIR = ".hpp-csi"
FORMAT_VERSION = 1


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
    """Reads and writes the records of one pool; every write is atomic and durable."""

    def __init__(self, volumes_dir: Path) -> None:
        self.root = volumes_dir / META_DIR
        self.records_dir = self.root / "volumes"
        self.trash_dir = self.root / "trash"
        self.staging_dir = self.root / "staging"

        self.snapshots_dir = self.root / "snapshots-v2"  # one folder per snapshot: {record.json, data}
        self.legacy_snapshots_dir = self.root / "snapshots"  # before: <id> and <id>.json side by side

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

    def read(self, volume_id: str) -> tuple[VolumeRecord | None, str]:
        """(the record, "") or (None, why it cannot be used); (None, "") when there is none."""
        try:
            with opened(self._records_fd()) as folder, opened(open_regular(folder, f"{volume_id}.json")) as fd:
                raw = json.loads(read_record_bytes(fd))
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

    def load(self, volume_id: str) -> VolumeRecord | None:
        """The record, or None when absent or unreadable (then the volume is adopted from what is on disk)."""
        record, problem = self.read(volume_id)
        if problem:
            log.warning("metadata of volume %s %s; treating the volume as adopted", volume_id, problem)
        return record

    def _records_fd(self) -> int:
        return os.open(self.records_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def save(self, record: VolumeRecord) -> None:
        try:
            atomic.write_json(self.path_of(record.volume_id), record.to_json())
        except IsADirectoryError:
            raise self._not_a_record(record.volume_id) from None

    def remove(self, volume_id: str) -> None:
        try:
            atomic.remove(self.path_of(volume_id))
        except IsADirectoryError:
            raise self._not_a_record(volume_id) from None

    def check_removable(self, volume_id: str) -> None:
        """Raise FAILED_PRECONDITION when the record's place holds a directory, which remove() would refuse."""
        if os.path.isdir(self.path_of(volume_id)) and not os.path.islink(self.path_of(volume_id)):
            raise self._not_a_record(volume_id)

    def _not_a_record(self, volume_id: str) -> errors.CsiError:
        return errors.failed_precondition(
            f"volume {volume_id!r}: {self.path_of(volume_id)} is a directory where its record file belongs; the "
            "driver leaves it alone: move it away by hand, then retry"
        )


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

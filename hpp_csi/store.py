"""Per-volume metadata: one small JSON file per volume beside the volumes, never inside one.

A pool's metadata lives in `<volumes_dir>/.hpp-csi/volumes/<id>.json`. There is no global state file, so a
change costs one atomic write whatever the number of volumes, and start-up only lists names.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpp_csi import atomic

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


class MetadataStore:
    """Reads and writes the records of one pool; every write is atomic and durable."""

    def __init__(self, volumes_dir: Path) -> None:
        self.root = volumes_dir / META_DIR
        self.records_dir = self.root / "volumes"
        self.trash_dir = self.root / "trash"
        self.staging_dir = self.root / "staging"

    def prepare(self) -> None:
        for folder in (self.root, self.records_dir, self.trash_dir, self.staging_dir):
            folder.mkdir(mode=0o700, exist_ok=True)

    def path_of(self, volume_id: str) -> Path:
        return self.records_dir / f"{volume_id}.json"

    def ids(self) -> list[str]:
        """IDs with a metadata file; leftovers of interrupted writes are removed on the way."""
        found = []
        with os.scandir(self.records_dir) as entries:
            for entry in entries:
                name = entry.name
                if name.endswith(atomic.TMP_SUFFIX):
                    os.unlink(entry.path)
                elif name.endswith(".json") and not name.startswith("."):
                    found.append(name[: -len(".json")])
        return found

    def load(self, volume_id: str) -> VolumeRecord | None:
        """The record, or None when absent or unreadable (then the volume is adopted from what is on disk)."""
        try:
            raw = json.loads(self.path_of(volume_id).read_bytes())
            record = VolumeRecord.from_json(raw)
            if record.volume_id != volume_id:
                raise ValueError(f"it names volume {record.volume_id!r}")
            return record
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            log.warning("metadata of volume %s is unreadable (%s); treating the volume as adopted", volume_id, exc)
            return None

    def save(self, record: VolumeRecord) -> None:
        atomic.write_json(self.path_of(record.volume_id), record.to_json())

    def remove(self, volume_id: str) -> None:
        atomic.remove(self.path_of(volume_id))

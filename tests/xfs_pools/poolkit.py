"""A real `hpp-csi serve` over a block-backed pool, and the util-linux probes the XFS pool tests judge with.

The driver process, requests, and the mountinfo and loop-device views are in tests/drivertools.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from drivertools import HPP_CSI, Driver, GiB, MiB, block_cap, make_root, mount_cap

POOL_SIZE = 4 * GiB


def run(command: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {proc.returncode}: {proc.stderr}")
    return proc


def device_size(path: str | Path) -> int:
    """`blockdev --getsize64`: what a writer of the device sees."""
    return int(run(["blockdev", "--getsize64", str(path)]).stdout)


def write_pattern(path: str | Path, size: int, seed: int = 0) -> bytes:
    """Fill `path` with `size` bytes of non-zero data (real extents, nothing a filesystem can skip)."""
    chunk = bytes((seed + i) % 251 + 1 for i in range(MiB))
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return chunk


@dataclass
class PoolDriver(Driver):
    """The driver with pool `legacy` on a sparse loop file (`<root>/pool.img`) or on `device`, mounted at
    <root>/pool/csi; publishes block volumes unless told otherwise."""

    root: Path = field(default_factory=lambda: make_root("hppxfs-"))
    size: str = "4Gi"
    device: str | None = None
    start_timeout: float = 20.0
    call_timeout: float = 30.0

    def datadir(self) -> list[dict[str, str]]:
        backing = {"device": self.device} if self.device else {"size": self.size}
        return [{"name": "legacy", "path": str(self.root / "pool"), **backing}]

    @property
    def image(self) -> Path:
        return self.root / "pool.img"

    @property
    def pool_dir(self) -> Path:
        return self.root / "pool" / "csi"

    def volume_path(self, volume_id: str, pool: str = "legacy") -> Path:
        return self.pool_dir / volume_id

    def snapshot_path(self, snapshot_id: str) -> Path:
        """The snapshot's data (its folder also holds record.json)."""
        return self.pool_dir / ".hpp-csi" / "snapshots-v2" / snapshot_id / "data"

    def new_target(self, name: str = "blk") -> Path:
        """A target in a folder that does not exist yet: the driver must make it."""
        return self.targets / uuid.uuid4().hex[:8] / name

    def mount_pool(self, *flags: str) -> subprocess.CompletedProcess[str]:
        return run([HPP_CSI, "mount-pool", "--datadir", json.dumps(self.datadir()), *flags], check=False)

    def publish(self, volume_id: str, target: str | Path, readonly: bool = False,  # type: ignore[override]
                block: bool = True) -> None:
        super().publish(volume_id, target, readonly, cap=block_cap() if block else mount_cap())

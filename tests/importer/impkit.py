"""Helpers shared by the importer tests (a unique module name: every test folder has its own conftest)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024
BASE_SIZE = 8 * MiB


def run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


def allocated(path: Path) -> int:
    """Bytes the filesystem actually allocated (what `du` reports)."""
    return path.stat().st_blocks * 512


def compare(reference: Path, target: Path) -> subprocess.CompletedProcess[str]:
    """qemu-img compare in its default (non-strict) mode: a larger target must be zero past the reference."""
    return subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(reference), str(target)],
                          capture_output=True, text=True, check=False)


@dataclass
class Images:
    """Every test image, by name, plus the raw reference each one must import to."""

    root: Path
    files: dict[str, Path]
    references: dict[str, Path]
    data_bytes: int  # non-zero bytes in base.raw


@dataclass
class LoopDevice:
    device: Path
    backing: Path
    size: int

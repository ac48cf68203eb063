"""Puts tests/ on sys.path, so the shared kits (drivertools, vmkit) import the same way from rootless test
folders (tests/csi) and from packages (tests/xfs_pools), whichever folder a run starts from."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

"""The image tests run our images for real; only `make image-test` runs them (it builds the images first).

The driver image is judged by the CSI conformance tests themselves (tests/csi), and the importer by the image
server of tests/importer: both folders go on sys.path, and the borrowed test modules get pytest's assertion
rewriting like any collected one.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from dockerkit import CDI_UID

TESTS = Path(__file__).resolve().parents[1]
for folder in ("csi", "importer"):
    if str(TESTS / folder) not in sys.path:
        sys.path.insert(0, str(TESTS / folder))
pytest.register_assert_rewrite("test_identity", "test_controller", "test_node", "test_block")



@pytest.fixture(scope="session")
def disk_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An 8 MiB raw disk with data at a few offsets (`raw`), and the same disk as qcow2, vmdk, raw.xz and raw.gz."""
    root = tmp_path_factory.mktemp("disk-images")
    rng = random.Random(20261201)
    raw = root / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(8 << 20)
        for offset in (0, (3 << 20) + 12345, 6 << 20):
            f.seek(offset)
            f.write(rng.randbytes(300 * 1024))
    files = {"raw": raw}
    for fmt in ("qcow2", "vmdk"):
        files[fmt] = root / f"disk.{fmt}"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(files[fmt])], check=True)
    for name, tool in (("raw.xz", ["xz", "-c", "-1"]), ("raw.gz", ["gzip", "-c", "-1"])):
        files[name] = root / f"disk.{name}"
        with files[name].open("wb") as out:
            subprocess.run([*tool, str(raw)], stdout=out, check=True)
    return files


@pytest.fixture
def pod_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(volume folder, scratch folder, termination log) owned by UID 107, as kubelet prepares them for CDI's pods."""
    volume, scratch, log = tmp_path / "volume", tmp_path / "scratch", tmp_path / "termination-log"
    volume.mkdir()
    scratch.mkdir()
    log.touch()
    for path in (volume, scratch, log):
        os.chown(path, CDI_UID, CDI_UID)
    return volume, scratch, log

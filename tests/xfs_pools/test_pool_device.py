"""Block-backed pools through a real driver: the sparse file, XFS with reflink, the mount at <path>/csi, reuse
across restarts, `hpp-csi mount-pool`, and devices that hold something else being left alone."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from blocks.test_xfs import write_gpt
from drivertools import MiB, loops_backing, mounts_at

from .conftest import LoopTracker
from .poolkit import POOL_SIZE, PoolDriver, run

QUOTA_KERNEL = Path("/proc/fs/xfs/xqmstat").exists()


def test_driver_formats_a_sparse_file_and_mounts_it_at_csi(driver: PoolDriver) -> None:
    st = driver.image.stat()
    assert st.st_size == POOL_SIZE
    assert st.st_blocks * 512 < 128 * MiB, "the backing file should be sparse (only XFS metadata written)"
    [device] = loops_backing(driver.image)
    [mount] = mounts_at(driver.pool_dir)
    assert (mount.fstype, mount.source) == ("xfs", device)
    info = run(["xfs_info", str(driver.pool_dir)]).stdout
    assert re.search(r"\breflink=1\b", info) and re.search(r"\bcrc=1\b", info), info
    if QUOTA_KERNEL:
        assert "prjquota" in mount.super_options
    else:  # this host: mounted without quotas, and the operator is told why
        assert not {"prjquota", "pquota"} & mount.super_options
        assert "volume sizes are not enforced: quota support not available in this kernel" in driver.log()


def test_restart_reuses_the_mount_and_the_loop_device(spawn: Callable[..., PoolDriver]) -> None:
    proc = spawn().start()
    volume = proc.create("pvc-kept", 64 * MiB).volume_id
    (proc.volume_path(volume) / "data").write_bytes(b"kept across restarts")
    [device] = loops_backing(proc.image)
    [mount] = mounts_at(proc.pool_dir)
    proc.restart()  # a crash: SIGKILL, then a new process
    assert proc.terminate() == 0  # and a graceful stop ...
    proc.start()  # ... then a third process
    assert loops_backing(proc.image) == [device]
    assert [m.mount_id for m in mounts_at(proc.pool_dir)] == [mount.mount_id]
    assert (proc.volume_path(volume) / "data").read_bytes() == b"kept across restarts"
    assert proc.listed_ids() == [volume]
    assert "formatted" not in proc.log()


def test_mount_pool_describes_mounts_and_unmounts(spawn: Callable[..., PoolDriver]) -> None:
    proc = spawn()
    described = proc.mount_pool("--describe")
    assert described.returncode == 0, described.stderr
    assert described.stdout.strip() == (
        f"legacy: XFS on a sparse {POOL_SIZE}-byte loop file {proc.root}/pool.img, mounted at {proc.pool_dir}"
    )
    assert not proc.image.exists(), "--describe must not create anything"

    first = proc.mount_pool()
    assert first.returncode == 0, first.stderr
    [device] = loops_backing(proc.image)
    assert first.stdout.startswith(f"legacy: {device} mounted at {proc.pool_dir} (formatted XFS);")
    (proc.pool_dir / "marker").write_text("made before the unmount")

    undone = proc.mount_pool("--unmount")
    assert undone.returncode == 0, undone.stderr
    assert undone.stdout.splitlines() == [f"legacy: unmounted {proc.pool_dir}", f"legacy: detached {device}"]
    assert mounts_at(proc.pool_dir) == [] and loops_backing(proc.image) == []
    assert proc.mount_pool("--unmount").stdout.strip() == "legacy: nothing mounted"

    again = proc.mount_pool()
    assert again.returncode == 0 and "formatted" not in again.stdout, again.stdout + again.stderr
    assert (proc.pool_dir / "marker").read_text() == "made before the unmount"
    [device] = loops_backing(proc.image)
    proc.start()  # the driver takes the pool as mount-pool left it
    assert loops_backing(proc.image) == [device] and len(mounts_at(proc.pool_dir)) == 1


def ext4_image(path: Path, content: Path) -> None:
    """A 64 MiB ext4 filesystem holding the files of `content`."""
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(path)])


@pytest.mark.parametrize("form", ["size", "device"])
def test_a_pool_holding_ext4_is_refused_and_left_intact(form: str, spawn: Callable[..., PoolDriver],
                                                        loops: LoopTracker, tmp_path: Path) -> None:
    (tmp_path / "content").mkdir()
    (tmp_path / "content" / "precious.txt").write_text("do not format me\n")
    proc = spawn(size="64Mi")
    image = proc.image if form == "size" else tmp_path / "disk.img"
    ext4_image(image, tmp_path / "content")
    if form == "device":
        proc.device = loops.attach(image)
    status, log = proc.run_to_exit()
    assert status != 0
    [message] = [line for line in log.splitlines() if line.startswith("hpp-csi: ")]
    assert f"{proc.device or image} already holds ext4; refusing to format it" in message
    assert message.count("storage pool 'legacy'") == 1, message
    assert mounts_at(proc.pool_dir) == []
    expected_loops = [proc.device] if proc.device else []
    assert loops_backing(image) == expected_loops, "a refused pool must not leave a loop device behind"
    assert run(["debugfs", "-R", "cat /precious.txt", str(image)]).stdout == "do not format me\n"
    assert run(["e2fsck", "-fn", str(image)], check=False).returncode == 0


def test_a_partitioned_device_is_refused_and_left_intact(spawn: Callable[..., PoolDriver], loops: LoopTracker,
                                                         tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    write_gpt(str(disk), 64 * MiB)
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    proc = spawn(device=loops.attach(disk))
    status, log = proc.run_to_exit()
    assert status != 0
    assert re.search(r"already holds [^;]*\bgpt\b[^;]*; refusing to format it", log), log
    assert mounts_at(proc.pool_dir) == []
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before

"""Threat 3 of issue 9 on the node: unpublish touches only what this driver published, a target is never inside
(or around) a pool, stats never follow what a tenant plants. Hostile by construction, with a victim tree outside
the pool that must stay bit-identical and no mount left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from drivertools import Driver, MiB, block_cap, is_mounted, mount, rpc_error, umount, unique, unmount_under

from hpp_csi.spec import csi_pb2 as csi

from .nodekit import fingerprint, flipping, mounts_under

pytestmark = pytest.mark.timeout(60)
FAILED = grpc.StatusCode.FAILED_PRECONDITION
INVALID = grpc.StatusCode.INVALID_ARGUMENT

if os.geteuid() != 0:
    pytest.fail("the node security tests need root (bind mounts, tmpfs)", pytrace=False)


@pytest.fixture(autouse=True)
def untouched(driver: Driver, victim: Path) -> Iterator[None]:
    """Every test: the victim is bit-identical afterwards and no mount under the driver's root is left behind."""
    before, mounts = fingerprint(victim), mounts_under(driver.root)
    yield
    assert fingerprint(victim) == before
    assert not is_mounted(victim)
    assert mounts_under(driver.root) == mounts


@pytest.fixture
def volume(driver: Driver) -> str:
    name = driver.create(unique(), 8 * MiB).volume_id
    (driver.volume_path(name) / "data").write_text("the tenant's data")
    return name


# --- NodeUnpublishVolume touches only its own ---------------------------------------------------------------
class TestUnpublishOnlyOwn:
    def test_foreign_tmpfs_is_left_mounted(self, driver: Driver, volume: str, target: Path) -> None:
        target.mkdir()
        mount(["-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)])
        try:
            (target / "theirs").write_text("foreign")
            with rpc_error(FAILED, "not of volume"):
                driver.unpublish(volume, target)
            with rpc_error(FAILED, "not of volume"):
                driver.unpublish("no-such-volume-123", target)
            assert is_mounted(target) and (target / "theirs").read_text() == "foreign"
        finally:
            umount(target)
        assert target.is_dir()

    def test_mount_of_another_volume_is_left(self, driver: Driver, volume: str, target: Path) -> None:
        other = driver.create(unique(), MiB).volume_id
        driver.publish(other, target)
        with rpc_error(FAILED, volume):
            driver.unpublish(volume, target)
        assert is_mounted(target)
        driver.unpublish(other, target)
        assert not os.path.lexists(target)

    def test_foreign_mount_over_own_is_left(self, driver: Driver, volume: str, target: Path) -> None:
        driver.publish(volume, target)
        mount(["-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)])
        with rpc_error(FAILED):
            driver.unpublish(volume, target)
        umount(target)
        driver.unpublish(volume, target)
        assert not is_mounted(target) and not os.path.lexists(target)

    def test_non_empty_file_is_kept(self, driver: Driver, volume: str, target: Path) -> None:
        target.write_text("never a target")
        with rpc_error(FAILED, "non-empty file"):
            driver.unpublish(volume, target)
        assert target.read_text() == "never a target"

    def test_symlink_and_fifo_are_kept(self, driver: Driver, volume: str, target: Path, victim: Path) -> None:
        target.symlink_to(victim)
        with rpc_error(FAILED, "symlink"):
            driver.unpublish(volume, target)
        assert target.is_symlink()
        target.unlink()
        os.mkfifo(target)
        with rpc_error(FAILED, "FIFO"):
            driver.unpublish(volume, target)
        assert target.exists()

    def test_what_publish_leaves_is_removed(self, driver: Driver, volume: str, target: Path) -> None:
        target.mkdir()
        driver.unpublish(volume, target)
        assert not os.path.lexists(target)
        target.touch()
        driver.unpublish(volume, target)
        assert not os.path.lexists(target)
        driver.unpublish(volume, target)  # nothing there: idempotent OK

    def test_own_mount_is_unmounted(self, driver: Driver, volume: str, target: Path) -> None:
        driver.publish(volume, target)
        driver.unpublish(volume, target)
        assert not os.path.lexists(target)
        assert (driver.volume_path(volume) / "data").read_text() == "the tenant's data"


# --- NodePublishVolume never targets a pool -----------------------------------------------------------------
def pool_listing(driver: Driver) -> set[str]:
    return {str(p.relative_to(driver.pool_path())) for p in driver.pool_path().rglob("*")}


class TestTargetOutsidePools:
    @pytest.mark.parametrize("where", ["pool root", "other volume", "nested in other volume", "metadata",
                                       "the pool", "around the pool"])
    def test_refused(self, driver: Driver, volume: str, where: str) -> None:
        other = driver.create(unique(), MiB).volume_id
        pool = driver.pool_path()
        path = {
            "pool root": pool / "planted",
            "other volume": driver.volume_path(other) / "mnt",
            "nested in other volume": driver.volume_path(other) / "a" / "b" / "mnt",
            "metadata": pool / ".hpp-csi" / "mnt",
            "the pool": pool,
            "around the pool": pool.parent,
        }[where]
        listing = pool_listing(driver)
        with rpc_error(INVALID, "storage pool"):
            driver.publish(volume, path)
        with rpc_error(INVALID, "storage pool"):
            driver.publish(other, path)
        assert pool_listing(driver) == listing
        assert not is_mounted(path)

    def test_refused_through_symlinked_folders(self, driver: Driver, volume: str, target: Path) -> None:
        """The string does not name the pool; the folders it resolves to are in it."""
        other = driver.create(unique(), MiB).volume_id
        link = target.parent / "innocent"
        link.symlink_to(driver.volume_path(other))
        listing = pool_listing(driver)
        for path in (link / "mnt", link / "deeper" / "mnt"):
            with rpc_error(INVALID, "storage pool"):
                driver.publish(volume, path)
        bind = target.parent / "pool-view"
        bind.mkdir()
        subprocess.run(["mount", "--bind", str(driver.pool_path()), str(bind)], check=True)
        try:
            with rpc_error(INVALID, "storage pool"):
                driver.publish(volume, bind / "x")
        finally:
            umount(bind)
        assert pool_listing(driver) == listing

    def test_refused_inside_a_published_volume(self, driver: Driver, volume: str, target: Path) -> None:
        other = driver.create(unique(), MiB).volume_id
        driver.publish(other, target)
        with rpc_error(INVALID, "storage pool"):
            driver.publish(volume, target / "sub")
        block = driver.create(unique("blk"), 4 * MiB, block=True).volume_id
        with rpc_error(INVALID, "storage pool"):
            driver.publish(block, target / "file", cap=block_cap())
        assert not (driver.volume_path(other) / "sub").exists()
        driver.unpublish(other, target)

    def test_block_target_in_pool_refused(self, driver: Driver) -> None:
        name = driver.create(unique("blk"), 4 * MiB, block=True).volume_id
        listing = pool_listing(driver)
        with rpc_error(INVALID, "storage pool"):
            driver.publish(name, driver.pool_path() / ".hpp-csi" / "dev", cap=block_cap())
        assert pool_listing(driver) == listing

    def test_ordinary_targets_still_work(self, driver: Driver, volume: str, target: Path) -> None:
        for _ in range(2):
            driver.publish(volume, target)  # idempotent: the published target is a mount of the pool now
        assert (target / "data").read_text() == "the tenant's data"
        driver.unpublish(volume, target)

    def test_race_parent_flips_into_pool(self, driver: Driver, volume: str, target: Path, victim: Path) -> None:
        """A thread flips the target's folder between a real folder and a symlink into another volume (then to
        the victim); whatever publish answers, nothing is ever mounted inside the pool or on the victim."""
        other = driver.create(unique(), MiB).volume_id
        folder = target.parent / "flip"
        real, link = target.parent / "real", target.parent / "link"
        real.mkdir()
        folder.symlink_to(real)
        before = pool_listing(driver)
        answers: dict[str, int] = {}

        def flip() -> None:
            os.symlink(driver.volume_path(other), link)
            os.rename(link, folder)

        def unflip() -> None:
            os.symlink(real, link)
            os.rename(link, folder)

        with flipping(flip, unflip) as flips:
            for _ in range(150):
                try:
                    driver.publish(volume, folder / "mnt")
                    answers["OK"] = answers.get("OK", 0) + 1
                    assert not mounts_under(driver.pool_path())
                    mounted = real / "mnt" if is_mounted(real / "mnt") else folder / "mnt"
                    driver.unpublish(volume, mounted)
                except grpc.RpcError as exc:
                    answers[exc.code().name] = answers.get(exc.code().name, 0) + 1
                    assert exc.code() in (INVALID, FAILED, grpc.StatusCode.NOT_FOUND), exc.details()
        unmount_under(real)
        assert flips[0] > 10, "the race did not happen"
        assert "INVALID_ARGUMENT" in answers, answers
        assert not mounts_under(driver.pool_path())
        after = pool_listing(driver)
        assert after <= before | {f"{other}/mnt"}  # at most an empty folder made between check and refusal
        made = driver.volume_path(other) / "mnt"
        if made.exists():
            made.rmdir()  # fails when it is not an empty folder


# --- NodeGetVolumeStats never follows -----------------------------------------------------------------------
class TestStats:
    def test_volume_dir_replaced_by_symlink(self, driver: Driver, volume: str, target: Path, victim: Path) -> None:
        driver.publish(volume, target)
        driver.unpublish(volume, target)
        target.mkdir()
        path = driver.volume_path(volume)
        shutil.rmtree(path)
        path.symlink_to(victim)
        with rpc_error(FAILED, f"{path} is a symlink, not the directory the driver made"):
            driver.stats(volume, target)
        path.unlink()
        os.mkfifo(path)
        with rpc_error(FAILED, "is a FIFO"):
            driver.stats(volume, target)
        path.unlink()
        reply = driver.stats(volume, target)  # missing: an abnormal condition, as before
        assert reply.volume_condition.abnormal and "missing" in reply.volume_condition.message
        path.mkdir()

    def test_race_subfolder_flips_to_victim(self, driver: Driver, volume: str, target: Path, victim: Path) -> None:
        """While stats walks the volume, a subfolder keeps turning into a symlink to the victim tree: the counted
        inodes never include the victim's (40+ files)."""
        driver.publish(volume, target)
        sub = target / "sub"
        sub.mkdir()
        (sub / "one").write_text("1")
        own = len(list(target.rglob("*"))) + 1

        def flip() -> None:
            os.rename(sub, target / ".hold-sub")
            os.symlink(victim, target / ".tmp-sub")
            os.rename(target / ".tmp-sub", sub)

        def unflip() -> None:
            os.unlink(sub)
            os.rename(target / ".hold-sub", sub)

        seen = set()
        with flipping(flip, unflip) as flips:
            for _ in range(200):
                inodes = [u for u in driver.stats(volume, target).usage if u.unit == csi.VolumeUsage.Unit.INODES]
                seen.add(inodes[0].used)
        assert flips[0] > 10
        assert max(seen) <= own + 2, (seen, own)  # +2: the hidden names the flipper uses
        driver.unpublish(volume, target)

"""Block volumes under threat 1-3 of issue 9: the image is opened beneath the pool by descriptor and the loop
device gets that descriptor, so a symlink, FIFO, device or hard link in its place is refused (publish, expand,
stats) and a file outside the pool is never attached or grown; a publish that fails after attaching detaches."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from drivertools import Driver, MiB, block_cap, is_mounted, mount, rpc_error, umount, unique, unmount_under

from hpp_csi.spec import csi_pb2 as csi

from .nodekit import fingerprint, flipping, loops_on, mounts_under, swap_back, swap_in

pytestmark = pytest.mark.timeout(60)
FAILED = grpc.StatusCode.FAILED_PRECONDITION
OK_OR_REFUSED = {"OK", "FAILED_PRECONDITION", "NOT_FOUND"}

if os.geteuid() != 0:
    pytest.fail("the block security tests need root (loop devices, bind mounts)", pytrace=False)


@pytest.fixture(autouse=True)
def untouched(driver: Driver, victim: Path) -> Iterator[None]:
    """Every test: the victim is bit-identical, backs no loop device, and no mount is left behind."""
    before, mounts = fingerprint(victim), mounts_under(driver.root)
    yield
    assert fingerprint(victim) == before
    assert loops_on(victim / "disk.img") == []
    assert mounts_under(driver.root) == mounts


@pytest.fixture
def block(driver: Driver) -> Iterator[str]:
    name = driver.create(unique("blk"), 4 * MiB, block=True).volume_id
    yield name
    image = driver.volume_path(name)
    assert loops_on(image) == [] if image.is_file() and not image.is_symlink() else True


def expand(driver: Driver, volume_id: str, size: int) -> csi.ControllerExpandVolumeResponse:
    reply: csi.ControllerExpandVolumeResponse = driver.controller.ControllerExpandVolume(
        csi.ControllerExpandVolumeRequest(volume_id=volume_id, capacity_range=csi.CapacityRange(required_bytes=size)))
    return reply


def answer(call: Callable[[], object]) -> str:
    try:
        call()
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


def plant(kind: str, victim: Path) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        if kind == "symlink":
            path.symlink_to(victim / "disk.img")
        elif kind == "FIFO":
            os.mkfifo(path)
        elif kind == "device":
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
        elif kind == "hard link":
            os.link(victim / "disk.img", path)
    return make


class TestImageReplaced:
    @pytest.mark.parametrize("kind,words", [("symlink", "symlink"), ("FIFO", "FIFO"),
                                            ("device", "character device"), ("hard link", "hard links")])
    def test_refused_everywhere(self, driver: Driver, block: str, target: Path, victim: Path, kind: str,
                                words: str) -> None:
        image = driver.volume_path(block)
        aside = image.with_name(f".saved-{block}")
        os.rename(image, aside)
        try:
            plant(kind, victim)(image)
            with rpc_error(FAILED, words):
                driver.publish(block, target, cap=block_cap())
            assert not is_mounted(target) and not os.path.lexists(target)
            with rpc_error(FAILED, words):
                expand(driver, block, 16 * MiB)
            target.touch()
            with rpc_error(FAILED, words):
                driver.stats(block, target)
            with rpc_error(FAILED, "restore the volume's image"):
                driver.publish(block, target, cap=block_cap())
        finally:
            image.unlink()
            os.rename(aside, image)
        assert (victim / "disk.img").stat().st_size == 4 * MiB
        target.unlink()
        driver.publish(block, target, cap=block_cap())  # restored: works again, at the size it had
        assert os.stat(image).st_size == 4 * MiB
        driver.unpublish(block, target)

    def test_expand_grows_the_pool_file(self, driver: Driver, block: str) -> None:
        assert expand(driver, block, 8 * MiB).capacity_bytes == 8 * MiB
        assert driver.volume_path(block).stat().st_size == 8 * MiB


class TestNoLoopLeak:
    def test_symlink_target(self, driver: Driver, block: str, target: Path, victim: Path) -> None:
        target.symlink_to(victim / "disk.img")
        with rpc_error(FAILED, "symlink"):
            driver.publish(block, target, cap=block_cap())
        assert loops_on(driver.volume_path(block)) == [] and target.is_symlink()

    def test_failure_after_attach_detaches(self, driver: Driver, block: str, target: Path) -> None:
        """The target's folder is read-only: creating the target file fails after the device is attached."""
        folder = target.parent / "ro"
        folder.mkdir()
        mount(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)])
        try:
            with rpc_error(FAILED, "Read-only file system"):
                driver.publish(block, folder / "dev", cap=block_cap())
            assert loops_on(driver.volume_path(block)) == []
        finally:
            umount(folder)

    def test_failure_after_attach_keeps_a_used_device(self, driver: Driver, block: str, target: Path) -> None:
        """A failed second publish releases only a device no target uses: the first target keeps working."""
        driver.publish(block, target, cap=block_cap(csi.VolumeCapability.AccessMode.SINGLE_NODE_MULTI_WRITER))
        [device] = loops_on(driver.volume_path(block))
        folder = target.parent / "ro"
        folder.mkdir()
        mount(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)])
        try:
            with rpc_error(FAILED, "Read-only file system"):
                driver.publish(block, folder / "dev", cap=block_cap(
                    csi.VolumeCapability.AccessMode.SINGLE_NODE_MULTI_WRITER))
        finally:
            umount(folder)
        assert loops_on(driver.volume_path(block)) == [device] and is_mounted(target)
        driver.unpublish(block, target)
        assert loops_on(driver.volume_path(block)) == []


class TestRaces:
    def test_target_flips_to_symlink(self, driver: Driver, block: str, target: Path, victim: Path) -> None:
        """A thread flips the target between an empty file and a symlink to the victim while the driver
        publishes and unpublishes: the victim is never mounted on and every failed publish detaches."""
        image = driver.volume_path(block)
        link = target.with_name("link")

        def flip() -> None:
            os.symlink(victim / "disk.img", link)
            try:
                os.rename(link, target)
            except OSError as exc:  # EBUSY: the target is mounted at this moment
                assert exc.errno == errno.EBUSY
                os.unlink(link)

        def unflip() -> None:
            try:
                os.unlink(target)
            except OSError as exc:
                assert exc.errno in (errno.EBUSY, errno.ENOENT)

        codes: dict[str, int] = {}
        with flipping(flip, unflip) as flips:
            for _ in range(120):
                code = answer(lambda: driver.publish(block, target, cap=block_cap()))
                codes[code] = codes.get(code, 0) + 1
                if code == "OK":
                    assert is_mounted(target)
                    # a symlink swapped in between unmount and removal is refused, not deleted: also clean
                    assert answer(lambda: driver.unpublish(block, target)) in ("OK", "FAILED_PRECONDITION")
                assert not is_mounted(victim / "disk.img")
                assert len(loops_on(image)) <= 1
        assert flips[0] > 10 and set(codes) <= OK_OR_REFUSED | {"ALREADY_EXISTS"}, codes
        assert "FAILED_PRECONDITION" in codes, codes
        unmount_under(target.parent)
        driver.unpublish(block, target)
        assert loops_on(image) == [] and not os.path.lexists(target)

    def test_image_flips_while_publishing_expanding_and_stats(self, driver: Driver, block: str, target: Path,
                                                              victim: Path) -> None:
        """The image keeps turning into a symlink to a file outside the pool: that file is never attached,
        grown or mounted; every call answers OK or a clean refusal, never INTERNAL."""
        image = driver.volume_path(block)
        codes: dict[str, int] = {}
        size = 4 * MiB
        with flipping(swap_in(image, plant("symlink", victim)), swap_back(image)) as flips:
            for _ in range(60):
                size += MiB
                for call in (lambda: driver.publish(block, target, cap=block_cap()),
                             lambda size=size: expand(driver, block, size),
                             lambda: driver.stats(block, target) if os.path.lexists(target) else None,
                             lambda: driver.unpublish(block, target)):
                    code = answer(call)
                    codes[code] = codes.get(code, 0) + 1
                assert loops_on(victim / "disk.img") == []
        assert flips[0] > 10 and set(codes) <= OK_OR_REFUSED, codes
        assert "FAILED_PRECONDITION" in codes and "OK" in codes, codes
        unmount_under(target.parent)
        driver.unpublish(block, target)
        assert not image.is_symlink() and image.stat().st_size <= size
        assert loops_on(image) == []

"""Fixtures: one driver on an XFS (reflink) loop pool and one guest per module; a VolumeKit per test that undoes
what the test made. Teardown checks that nothing leaked: no QEMU process, loop device or mount."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from drivertools import loops_under, mount_points_under
from xfs_pools.poolkit import PoolDriver

from .machine import Machine
from .volumes import VolumeKit


@pytest.fixture(scope="module")
def driver() -> Iterator[PoolDriver]:
    """A driver serving pool `legacy`: XFS (reflink) on a sparse loop file. Once the guests are gone, no target may
    still be mounted and no volume image still attached to a loop device: the tests undid all they made."""
    proc = PoolDriver()
    try:
        yield proc.start()
        left = mount_points_under(proc.targets) + loops_under(proc.pool_dir)
    finally:
        proc.shutdown()
    assert not left, f"left behind by the VM tests: {left}"
    assert not proc.root.exists()


def booted(driver: PoolDriver) -> Iterator[Machine]:
    """A booted guest, shut down (QEMU gone) before the driver that serves its disks."""
    machine = Machine()
    try:
        yield machine.boot()
    finally:
        machine.shutdown()
    assert machine.proc is None or machine.proc.poll() is not None, "qemu still running"


@pytest.fixture(scope="module")
def guest(driver: PoolDriver) -> Iterator[Machine]:
    yield from booted(driver)


@pytest.fixture(scope="module")
def second_guest(driver: PoolDriver) -> Iterator[Machine]:
    """Another boot: what a restored disk holds must not depend on the guest that wrote it."""
    yield from booted(driver)


@pytest.fixture
def kit(driver: PoolDriver, guest: Machine) -> Iterator[VolumeKit]:
    made = VolumeKit(driver, guest)
    try:
        yield made
    finally:
        made.cleanup()

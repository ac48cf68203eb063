"""Fixtures: a real driver per module, fresh drivers on demand, target folders; all cleaned up on failure too."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator

import pytest
from csikit import FAST_POOL_SIZE
from drivertools import Driver, drivers, make_root, mount, remove_root, running, unmount_under

if os.geteuid() != 0:  # bind mounts and tmpfs need root
    pytest.skip("the CSI conformance tests need root", allow_module_level=True)


@pytest.fixture(scope="module")
def driver() -> Iterator[Driver]:
    """Pools `legacy` (a folder on the disk) and `fast` (a 64 MiB tmpfs, so capacity figures are exact)."""
    root = make_root()
    try:
        fast = root / "fast"
        fast.mkdir()
        mount(["-t", "tmpfs", "-o", f"size={FAST_POOL_SIZE}", "tmpfs", str(fast)])
        pools = [{"name": "legacy", "path": str(root / "pool")}, {"name": "fast", "path": str(fast)}]
        proc = Driver(root, pools=pools)
    except BaseException:
        remove_root(root)
        raise
    with running(proc):
        yield proc


@pytest.fixture
def spawn() -> Iterator[Callable[..., Driver]]:
    """Make drivers with a fresh folder each (not started); all are stopped and removed afterwards."""
    with drivers(Driver) as make:
        yield make


@pytest.fixture
def fresh(spawn: Callable[..., Driver]) -> Driver:
    """A started driver of its own, with one pool `legacy`."""
    return spawn().start()


@pytest.fixture
def target(driver: Driver) -> Iterator[str]:
    """A target path whose parent exists (as csi-sanity sets it up); unmounted and removed afterwards."""
    path = driver.new_target()
    yield str(path)
    unmount_under(path.parent)
    shutil.rmtree(path.parent, ignore_errors=True)

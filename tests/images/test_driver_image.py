"""The driver image as a node plugin runs it: CSI over a socket in a bind-mounted folder, pools and targets
bind-mounted with rshared propagation, the host's /dev. A representative part of the CSI conformance tests runs
unchanged against the container (their assertions read the host's mount table, so every publish they check
also proves the mount reached the host), then a few checks of what only a container can get wrong."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from csikit import FAST_POOL_SIZE
from dockerkit import ContainerDriver, docker, require_image, share
from drivertools import (
    MiB,
    block_cap,
    drivers,
    is_mounted,
    make_root,
    mount,
    mounts_at,
    remove_root,
    unique,
    unmount_under,
)
from drivertools import running as running_driver

# The borrowed CSI tests: collected here, they get this module's `driver`, `spawn` and `target`.
from test_block import TestPublish as TestBlockPublish
from test_block import test_block_publication_survives_restart
from test_controller import TestCreateVolume
from test_identity import test_plugin_capabilities, test_plugin_info, test_plugin_info_from_flags, test_probe_ready
from test_node import TestEphemeral, TestNodePublish, TestNodeUnpublish, volume

__all__ = [  # what pytest collects from the CSI suites; `volume` is their fixture
    "TestBlockPublish", "TestCreateVolume", "TestEphemeral", "TestNodePublish", "TestNodeUnpublish",
    "test_block_publication_survives_restart", "test_plugin_capabilities", "test_plugin_info",
    "test_plugin_info_from_flags", "test_probe_ready", "volume",
]

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def driver_image() -> str:
    return require_image("driver")


@pytest.fixture(scope="module")
def driver(driver_image: str) -> Iterator[ContainerDriver]:
    """As tests/csi's shared driver: pools `legacy` (a folder) and `fast` (a 64 MiB tmpfs), in a container."""
    root = make_root("hppimg-")
    try:
        share(root)
        fast = root / "fast"
        fast.mkdir()
        mount(["-t", "tmpfs", "-o", f"size={FAST_POOL_SIZE}", "tmpfs", str(fast)])
        pools = [{"name": "legacy", "path": str(root / "pool")}, {"name": "fast", "path": str(fast)}]
        proc = ContainerDriver(root, pools=pools, image=driver_image)
    except BaseException:
        remove_root(root)
        raise
    with running_driver(proc):
        yield proc


@pytest.fixture
def spawn(driver_image: str) -> Iterator[Callable[..., ContainerDriver]]:
    """Driver containers with a root each (not started); all stopped, removed and undone afterwards."""
    with drivers(ContainerDriver) as make:
        yield lambda **kwargs: make(image=driver_image, **kwargs)


@pytest.fixture
def target(driver: ContainerDriver) -> Iterator[str]:
    path = driver.new_target()
    yield str(path)
    unmount_under(path.parent)
    shutil.rmtree(path.parent, ignore_errors=True)


def container_mount_points(driver: ContainerDriver) -> set[str]:
    """Mount points inside the driver's container, read there."""
    table = docker("exec", driver.name, "cat", "/proc/self/mountinfo").stdout
    return {line.split(" ")[4] for line in table.splitlines()}


def test_publish_reaches_the_host_and_back(driver: ContainerDriver, target: str) -> None:
    """The bind mount made in the container is on the host (rshared), data crosses it both ways, unpublish and
    delete undo it on both sides."""
    name = driver.create(unique(), 8 * MiB).volume_id
    driver.publish(name, target)
    assert target in container_mount_points(driver)
    [entry] = mounts_at(target)  # the host's own mount table
    assert entry.root.endswith("/" + name)
    Path(target, "from-host").write_text("host")
    assert docker("exec", driver.name, "cat", os.path.join(target, "from-host")).stdout == "host"
    docker("exec", driver.name, "sh", "-c", f"echo -n container > {driver.volume_path(name)}/from-container")
    assert Path(target, "from-container").read_text() == "container"
    driver.unpublish(name, target)
    assert not is_mounted(target) and not os.path.lexists(target)
    assert target not in container_mount_points(driver)
    driver.delete(name)
    assert not driver.volume_path(name).exists()


def test_block_volume_is_a_loop_device_on_the_host(driver: ContainerDriver, target: str) -> None:
    """Loop devices come from the host's /dev: the node the driver binds onto the target works on the host."""
    name = driver.create(unique("blk"), 4 * MiB, block=True).volume_id
    driver.publish(name, target, cap=block_cap())
    data = os.urandom(MiB)
    with open(target, "r+b") as dev:
        dev.write(data)
        dev.flush()
        os.fsync(dev.fileno())
    driver.unpublish(name, target)
    with open(driver.volume_path(name), "rb") as image:
        assert image.read(MiB) == data
    driver.delete(name)


def test_runs_as_root_with_the_images_own_tools(driver: ContainerDriver) -> None:
    """The node plugin is root in its container and finds the programs it forks (wipefs, mkfs.xfs, xfs_growfs)."""
    script = "id -u; for tool in wipefs mkfs.xfs xfs_growfs; do command -v $tool; done"
    found = docker("exec", driver.name, "sh", "-c", script).stdout.split()
    assert found[0] == "0" and len(found) == 4, found


def test_refused_configuration_exits_with_its_reason(spawn: Callable[..., ContainerDriver]) -> None:
    proc = spawn(pools=[{"name": "legacy", "path": "relative/path"}])
    status, log = proc.run_to_exit()
    assert status == 2 and "hpp-csi:" in log, log


def test_container_removed_and_root_clean_after_shutdown(driver_image: str) -> None:
    root = make_root("hppimg-")
    proc = ContainerDriver(root, image=driver_image).start()
    target = proc.new_target()
    name = proc.create(unique(), MiB).volume_id
    proc.publish(name, target)
    proc.shutdown()
    assert docker("inspect", proc.name, check=False).returncode != 0
    assert not root.exists() and not is_mounted(target)

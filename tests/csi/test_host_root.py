"""The "pool shares the OS partition" check against the host's root (--host-root), as it runs in the chart's pod:
the host's / mounted at /host, each pool a bind mount of a host folder. A tmpfs stands for the host's root disk."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from csikit import free_port
from drivertools import Driver, make_root, mount, remove_root
from test_observability import sample, scrape

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def node() -> Iterator[Path]:
    """root/host: a fake host root (tmpfs) with /var/hpvolumes on it and /mnt/disk on a tmpfs of its own;
    root/pool-os and root/pool-disk: those two folders bind-mounted, as kubelet mounts a hostPath pool."""
    root = make_root()
    try:
        host = root / "host"
        host.mkdir()
        mount(["-t", "tmpfs", "-o", "size=8m", "hostroot", str(host)])
        (host / "var/hpvolumes").mkdir(parents=True)
        (host / "mnt/disk").mkdir(parents=True)
        mount(["-t", "tmpfs", "-o", "size=8m", "disk", str(host / "mnt/disk")])
        for name, source in (("pool-os", host / "var/hpvolumes"), ("pool-disk", host / "mnt/disk")):
            (root / name).mkdir()
            mount(["--bind", str(source), str(root / name)])
        yield root
    finally:
        remove_root(root)


def shared_metric(spawn: Callable[..., Driver], node: Path, *extra: str) -> dict[str, float]:
    pools = [{"name": "os", "path": str(node / "pool-os")}, {"name": "disk", "path": str(node / "pool-disk")}]
    proc = spawn(pools=pools, extra=["--metrics-address", f"127.0.0.1:{free_port()}", *extra]).start()
    text = scrape(proc)
    proc.terminate()
    return {pool: sample(text, "kubevirt_hpp_pool_path_shared_with_os", pool=pool) for pool in ("os", "disk")}


def test_host_root_sees_the_pool_on_the_os_disk(spawn: Callable[..., Driver], node: Path) -> None:
    assert shared_metric(spawn, node, "--host-root", str(node / "host")) == {"os": 1.0, "disk": 0.0}


def test_without_host_root_the_check_compares_with_our_own_root(spawn: Callable[..., Driver], node: Path) -> None:
    """The defect the flag fixes: seen from a root that is not the host's, no pool ever shares it."""
    assert shared_metric(spawn, node) == {"os": 0.0, "disk": 0.0}


def test_the_warning_names_the_pool_and_the_host_root(spawn: Callable[..., Driver], node: Path) -> None:
    proc = spawn(pools=[{"name": "os", "path": str(node / "pool-os")}],
                 extra=["--metrics-address", f"127.0.0.1:{free_port()}", "--host-root", str(node / "host")]).start()
    proc.terminate()
    assert f"'os' at {node / 'pool-os'} is on the same filesystem as the host's / (seen at {node / 'host'})" in (
        proc.log())


def test_missing_host_root_is_refused(spawn: Callable[..., Driver], node: Path) -> None:
    proc = spawn(extra=["--host-root", str(node / "no-such-dir")])
    status, log = proc.run_to_exit()
    assert status == 2
    assert f"--host-root {node / 'no-such-dir'} is not a directory" in log
    assert not proc.socket.exists()

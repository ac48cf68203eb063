"""Threats 1 and 2 of issue 9 on the storage side: snapshots and clones never read through what a tenant (or
anyone) put in place of a volume's data, copy symlinks inside a volume as symlinks, and survive a thread that
swaps a path while they copy; volume directories get the narrowest mode KubeVirt's pods can write.

Every test keeps a victim tree outside the pool that must stay bit-identical, with its access times: reading
it would move them (relatime updates an atime older than the mtime, and the victim's are)."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from drivertools import Driver, MiB, block_cap, create_request, from_snapshot, from_volume, rpc_error, unique

from hpp_csi.spec import csi_pb2 as csi

from .nodekit import fingerprint, flipping, make_victim, swap_back, swap_in

pytestmark = pytest.mark.timeout(60)
FAILED = grpc.StatusCode.FAILED_PRECONDITION
SECRET = b"do not touch\n"

if os.geteuid() != 0:
    pytest.fail("the storage security tests need root (chown, mknod, loop devices)", pytrace=False)


def atimes(tree: Path) -> dict[str, int]:
    return {os.path.join(folder, name): os.lstat(os.path.join(folder, name)).st_atime_ns
            for folder, dirs, files in os.walk(tree) for name in [".", *dirs, *files]}


@pytest.fixture
def victim(driver: Driver) -> Iterator[Path]:
    """A tree outside the pool; checked bit-identical (and unread) after the test, then removed."""
    root = driver.root / f"outside-{unique('v')}"
    root.mkdir()
    tree = make_victim(root)
    for folder, _dirs, files in os.walk(tree):  # atime below mtime: any read from now on moves it
        for name in [".", *files]:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            os.utime(path, ns=(st.st_mtime_ns - 10**9, st.st_mtime_ns), follow_symlinks=False)
    before, read = fingerprint(tree), atimes(tree)
    yield tree
    assert fingerprint(tree) == before, "the victim tree outside the pool changed"
    assert atimes(tree) == read, "something read the victim tree outside the pool"
    subprocess.run(["rm", "-rf", str(root)], check=True)


def assert_no_leftovers(driver: Driver) -> None:
    meta = driver.pool_path() / ".hpp-csi"
    assert list((meta / "staging").iterdir()) == []
    assert [p.name for p in (meta / "snapshots-v2").iterdir() if p.name.startswith(".")] == []
    assert list((meta / "trash").iterdir()) == []


def snapshot(driver: Driver, name: str, source: str) -> csi.Snapshot:
    return driver.snapshot(name, source)


def clone_of(driver: Driver, name: str, source: str, block: bool = False) -> csi.Volume:
    caps = [block_cap()] if block else None
    reply: csi.CreateVolumeResponse = driver.controller.CreateVolume(
        create_request(name, 4 * MiB if block else 0, caps=caps, volume_content_source=from_volume(source))
    )
    return reply.volume


def condition(driver: Driver, volume_id: str) -> csi.VolumeCondition:
    reply: csi.ControllerGetVolumeResponse = driver.controller.ControllerGetVolume(
        csi.ControllerGetVolumeRequest(volume_id=volume_id)
    )
    return reply.status.volume_condition


# --- what the record says is not what is there -------------------------------------------------------------
def test_volume_directory_replaced_by_symlink(driver: Driver, victim: Path) -> None:
    name = driver.create(unique(), MiB).volume_id
    path = driver.volume_path(name)
    (path / "mine").write_text("tenant data")
    aside = path.with_name(f".aside-{name}")
    os.rename(path, aside)
    os.symlink(victim, path)
    try:
        found = rf"volume '{name}'.*{path} is a symlink to '{victim}', not a directory"
        with rpc_error(FAILED, found):
            snapshot(driver, unique("snap"), name)
        with rpc_error(FAILED, found):
            clone_of(driver, unique("clone"), name)
        cond = condition(driver, name)
        assert cond.abnormal and "is a symlink" in cond.message and str(victim) in cond.message
    finally:
        os.unlink(path)
        os.rename(aside, path)
    assert not condition(driver, name).abnormal
    assert_no_leftovers(driver)
    driver.delete(name)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "char-device", "directory", "missing"])
def test_block_image_not_a_file(driver: Driver, victim: Path, kind: str) -> None:
    name = driver.create(unique(), 4 * MiB, block=True).volume_id
    image = driver.volume_path(name)
    aside = image.with_name(f".aside-{name}")
    os.rename(image, aside)
    expected = {
        "symlink": f"a symlink to '{victim / 'disk.img'}'", "fifo": "a FIFO", "char-device": "a character device",
        "directory": "a directory", "missing": "missing",
    }[kind]
    if kind == "symlink":
        os.symlink(victim / "disk.img", image)
    elif kind == "fifo":
        os.mkfifo(image)
    elif kind == "char-device":
        os.mknod(image, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: reading it would never end
    elif kind == "directory":
        image.mkdir()
    try:
        with rpc_error(FAILED, rf"volume '{name}'.*{image} is {expected}"):
            snapshot(driver, unique("snap"), name)
        with rpc_error(FAILED, rf"volume '{name}'.*{image} is {expected}"):
            clone_of(driver, unique("clone"), name, block=True)
        cond = condition(driver, name)
        assert cond.abnormal and expected in cond.message
    finally:
        if kind == "directory":
            image.rmdir()
        elif kind != "missing":
            os.unlink(image)
        os.rename(aside, image)
    assert_no_leftovers(driver)
    driver.delete(name)


def test_snapshot_data_replaced_refuses_restore(driver: Driver, victim: Path) -> None:
    """A snapshot's data swapped for a symlink (defence in depth: it is the driver's folder) is not restored."""
    source = driver.create(unique(), MiB).volume_id
    snap = snapshot(driver, unique("snap"), source).snapshot_id
    data = driver.pool_path() / ".hpp-csi" / "snapshots-v2" / snap / "data"
    os.rename(data, data.with_name("held"))
    os.symlink(victim, data)
    try:
        with rpc_error(FAILED, rf"snapshot '{snap}'.*is a symlink"):
            driver.controller.CreateVolume(create_request(unique(), volume_content_source=from_snapshot(snap)))
    finally:
        os.unlink(data)
        os.rename(data.with_name("held"), data)
    assert_no_leftovers(driver)
    driver.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap))
    driver.delete(source)


# --- inside a volume ---------------------------------------------------------------------------------------
def test_symlinks_inside_a_volume_are_copied_as_symlinks(driver: Driver, victim: Path) -> None:
    name = driver.create(unique(), MiB).volume_id
    path = driver.volume_path(name)
    os.symlink(victim, path / "absolute")
    os.symlink("../../../" * 4 + str(victim).lstrip("/"), path / "climbing")
    os.symlink(victim / "secret", path / "file-link")
    (path / "sub").mkdir()
    os.symlink(victim / "nested", path / "sub" / "dir-link")
    os.mkfifo(path / "pipe")
    snap = snapshot(driver, unique("snap"), name).snapshot_id
    restored = driver.controller.CreateVolume(
        create_request(unique(), volume_content_source=from_snapshot(snap))).volume.volume_id
    clone = clone_of(driver, unique("clone"), name).volume_id
    data = driver.pool_path() / ".hpp-csi" / "snapshots-v2" / snap / "data"
    for copy in (data, driver.volume_path(restored), driver.volume_path(clone)):
        for link in ("absolute", "climbing", "file-link", "sub/dir-link"):
            assert os.readlink(copy / link) == os.readlink(path / link)
        assert stat.S_ISFIFO(os.lstat(copy / "pipe").st_mode)
        assert sorted(os.listdir(copy)) == ["absolute", "climbing", "file-link", "pipe", "sub"]
    driver.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap))
    for volume in (restored, clone, name):
        driver.delete(volume)
    assert_no_leftovers(driver)


# --- races -------------------------------------------------------------------------------------------------
def contents(tree: Path) -> set[bytes]:
    """The bytes of every regular file under `tree`, never following a symlink."""
    found = set()
    for folder, _dirs, files in os.walk(tree):
        for name in files:
            entry = Path(folder) / name
            if stat.S_ISREG(entry.lstat().st_mode):
                found.add(entry.read_bytes())
    return found


def race(driver: Driver, source: str, flip: Callable[[], None], unflip: Callable[[], None],
         seconds: float = 1.2) -> tuple[list[Path], int]:
    """CreateSnapshot and clone-from-volume in turn while `flip`/`unflip` run in a thread; (copies, refused)."""
    copies: list[Path] = []
    refused = 0
    with flipping(flip, unflip) as flips:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for make in ("snapshot", "clone"):
                try:
                    if make == "snapshot":
                        made = snapshot(driver, unique("snap"), source).snapshot_id
                        copies.append(driver.pool_path() / ".hpp-csi" / "snapshots-v2" / made / "data")
                    else:
                        copies.append(driver.volume_path(clone_of(driver, unique("clone"), source).volume_id))
                except grpc.RpcError as exc:
                    assert exc.code() == FAILED, f"{exc.code().name}: {exc.details()}"  # never INTERNAL
                    refused += 1
    assert flips[0] > 10, "the flipping thread barely ran"
    return copies, refused


def remove_copies(driver: Driver, copies: list[Path]) -> None:
    for copy in copies:
        if copy.name == "data":
            driver.controller.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=copy.parent.name))
        else:
            driver.delete(copy.name)


def test_race_volume_directory_swapped_for_a_symlink(driver: Driver, victim: Path) -> None:
    source = driver.create(unique(), MiB).volume_id
    path = driver.volume_path(source)
    (path / "mine").write_bytes(b"tenant data")
    flip = swap_in(path, lambda tmp: os.symlink(victim, tmp))
    copies, refused = race(driver, source, flip, swap_back(path))
    assert refused, "no call met the swapped directory: the race did not race"
    for copy in copies:
        assert contents(copy) <= {b"tenant data"}, f"{copy} holds data from outside the volume"
        assert os.listdir(copy) in ([], ["mine"])
    remove_copies(driver, copies)
    driver.delete(source)
    assert_no_leftovers(driver)


def test_race_subdirectory_swapped_for_a_symlink(driver: Driver, victim: Path) -> None:
    """Inside a volume a swap is the tenant's own business: each copy holds the folder or the symlink, never
    what the symlink points to, and no call fails."""
    source = driver.create(unique(), MiB).volume_id
    sub = driver.volume_path(source) / "sub"
    sub.mkdir()
    for i in range(20):
        (sub / f"f{i}").write_bytes(b"tenant %d" % i)
    mine = {b"tenant %d" % i for i in range(20)}
    flip = swap_in(sub, lambda tmp: os.symlink(victim, tmp))
    copies, refused = race(driver, source, flip, swap_back(sub))
    assert refused == 0
    assert len(copies) >= 4
    for copy in copies:
        assert contents(copy) <= mine, f"{copy} holds data from outside the volume"
        if (copy / "sub").is_symlink():
            assert os.readlink(copy / "sub") == str(victim)
    remove_copies(driver, copies)
    driver.delete(source)
    assert_no_leftovers(driver)


# --- mode --------------------------------------------------------------------------------------------------
def as_user(uid: int, gid: int, groups: list[int], *command: str) -> subprocess.CompletedProcess[str]:
    extra = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", *extra, *command],
                          capture_output=True, text=True, timeout=10, check=False)


def test_volume_directory_mode(driver: Driver) -> None:
    """root:107 2770: qemu (107) writes without an fsGroup, a pod in the fsGroup kubelet applies writes, other
    users of the node can neither list nor write; a clone gets the same."""
    name = driver.create(unique(), MiB).volume_id
    path = driver.volume_path(name)
    (path / "f").write_text("x")
    clone = clone_of(driver, unique("clone"), name).volume_id
    for volume in (name, clone):
        st = driver.volume_path(volume).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o2770, 0, 107)
    assert stat.S_IMODE(driver.pool_path().stat().st_mode) == 0o755  # the pool is traversable: volumes guard
    driver.root.chmod(0o711)  # mkdtemp's 0700 would hide everything from the other users
    try:
        assert as_user(107, 107, [], "touch", str(path / "by-qemu")).returncode == 0
        assert (path / "by-qemu").stat().st_gid == 107  # setgid: new files stay in the volume's group
        stranger = as_user(1000, 1000, [], "ls", str(path))
        assert stranger.returncode != 0 and "Permission denied" in stranger.stderr
        assert as_user(1000, 1000, [], "touch", str(path / "by-stranger")).returncode != 0
        # What kubelet does for fsGroup 2000 under fsGroupPolicy File: the group, then g+rwx and setgid.
        os.chown(path, -1, 2000)
        os.chmod(path, 0o2770)
        assert as_user(4242, 4242, [2000], "touch", str(path / "by-fsgroup")).returncode == 0
        assert as_user(107, 107, [], "touch", str(path / "by-qemu-2")).returncode != 0  # only the fsGroup now
    finally:
        driver.root.chmod(0o700)
    assert not (path / "by-stranger").exists()
    for volume in (clone, name):
        driver.delete(volume)

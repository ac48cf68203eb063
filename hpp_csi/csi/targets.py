"""Where a publish target may be: never inside a storage pool, nor in a mount of one, nor around one.

Folders are compared by device and inode of what is opened, never by path strings, so symlinks and bind mounts
cannot make a pool look like somewhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hpp_csi import errors
from hpp_csi.linux import mounts
from hpp_csi.linux.safe_open import open_dir, opened
from hpp_csi.storage.block_publish import Identity
from hpp_csi.storage.pools import StoragePool


@dataclass(frozen=True)
class Folder:
    """A folder as the kernel knows it: device and inode, and the mount it was reached through."""

    identity: Identity
    mount_id: int


@dataclass(frozen=True)
class PoolPlace:
    """Where a pool's directory is: its identity, and its path inside its filesystem (how mountinfo names the
    root of a bind mount of anything in it)."""

    pool: StoragePool
    identity: Identity
    major: int
    minor: int
    inner: str


def ancestry(dir_fd: int) -> list[Folder]:
    """The folder open at `dir_fd` and every folder above it up to /, found by opening `..` from descriptors:
    what the folders are, not what their names say (symlinks cannot fool it)."""
    chain: list[Folder] = []
    fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        while True:
            st = os.fstat(fd)
            chain.append(Folder((st.st_dev, st.st_ino), mounts.mount_id_of(fd)))
            parent = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            up = os.fstat(parent)
            os.close(fd)
            fd = parent
            if (up.st_dev, up.st_ino) == chain[-1].identity:
                return chain
    finally:
        os.close(fd)


def _within(root: str, folder: str) -> bool:
    return root == folder or root.startswith(folder.rstrip("/") + "/")


def _opened_pools(pools: list[StoragePool]) -> list[tuple[StoragePool, Identity, int, str]]:
    """(pool, identity, mount id, real path) of each pool directory that exists, opened without a symlink."""
    found = []
    for pool in pools:
        try:
            with opened(open_dir(pool.volumes_dir)) as fd:
                st = os.fstat(fd)
                real = os.readlink(f"/proc/self/fd/{fd}")
                found.append((pool, (st.st_dev, st.st_ino), mounts.mount_id_of(fd), real))
        except OSError:
            continue  # a pool that is not there cannot hold a target
    return found


def _place(opened_pools: list[tuple[StoragePool, Identity, int, str]],
           table: dict[int, mounts.MountEntry]) -> list[PoolPlace]:
    places = []
    for pool, identity, mount_id, real in opened_pools:
        entry = table.get(mount_id)
        if entry is None:
            continue
        rel = os.path.relpath(real, entry.mount_point)
        inner = os.path.normpath(os.path.join(entry.root, rel)) if rel != "." else entry.root
        places.append(PoolPlace(pool, identity, entry.major, entry.minor, inner))
    return places


class TargetCheck:
    """Whether a publish target is outside every pool: INVALID_ARGUMENT when a folder is in a pool or in a mount
    of anything in one (a published volume, the pool bind-mounted elsewhere), or, for the target itself, holds
    a pool.

    Folders are compared by device and inode, and by the mounts they were reached through, so neither symlinks
    nor bind mounts can fool it; it costs the folders above the target, not the mounts on the node. Folders
    proven outside are remembered for this publish: checking the target after creating it below a checked
    folder, on the same mount, reads no mountinfo again.
    """

    def __init__(self, target: str, pools: list[StoragePool]) -> None:
        self.target = target
        self.pools = pools
        self._cleared: dict[Identity, int] = {}

    def folder(self, folder_fd: int, is_target: bool = False) -> None:
        chain = ancestry(folder_fd)
        opened_pools = _opened_pools(self.pools)
        roots = {identity: pool for pool, identity, _, _ in opened_pools}
        for folder in chain:
            if folder.identity in roots:
                pool = roots[folder.identity]
                raise self._refuse(f"is inside storage pool {pool.name!r} ({pool.volumes_dir})")
        if not self._below_cleared(chain):
            self._check_mounts(chain, opened_pools)
        self._cleared.update({folder.identity: folder.mount_id for folder in chain})
        if is_target:
            self._refuse_holding_a_pool(folder_fd, opened_pools)

    def _below_cleared(self, chain: list[Folder]) -> bool:
        """Whether the chain reaches a folder cleared before, with only folders of that folder's mount below."""
        for index, folder in enumerate(chain):
            if self._cleared.get(folder.identity) == folder.mount_id:
                return all(below.mount_id == folder.mount_id for below in chain[:index])
        return False

    def _check_mounts(self, chain: list[Folder], opened_pools: list[tuple[StoragePool, Identity, int, str]]) -> None:
        # Only a folder on a pool's filesystem reached through another mount than the pool's own can be in a view
        # of the pool (a bind mount): within the pool's own mount, walking `..` would have met the pool itself.
        pool_mounts = {(identity[0], mount_id) for _, identity, mount_id, _ in opened_pools}
        pool_devices = {device for device, _ in pool_mounts}
        if not any(folder.identity[0] in pool_devices and (folder.identity[0], folder.mount_id) not in pool_mounts
                   for folder in chain):
            return
        table = mounts.mounts_by_id({folder.mount_id for folder in chain} | {m for _, _, m, _ in opened_pools})
        through = [table[folder.mount_id] for folder in chain if folder.mount_id in table]
        for place in _place(opened_pools, table):
            for entry in through:
                if (entry.major, entry.minor) == (place.major, place.minor) and _within(entry.root, place.inner):
                    raise self._refuse(
                        f"is inside {entry.mount_point}, a mount of storage pool {place.pool.name!r}'s {entry.root}"
                    )

    def _refuse_holding_a_pool(self, folder_fd: int,
                               opened_pools: list[tuple[StoragePool, Identity, int, str]]) -> None:
        st = os.fstat(folder_fd)
        for pool, _, _, _ in opened_pools:
            try:
                with opened(open_dir(pool.volumes_dir)) as fd:
                    holds = any(folder.identity == (st.st_dev, st.st_ino) for folder in ancestry(fd))
            except OSError:
                continue
            if holds:
                raise self._refuse(f"contains storage pool {pool.name!r} ({pool.volumes_dir})")

    def _refuse(self, where: str) -> errors.CsiError:
        return errors.invalid_argument(
            f"target_path {self.target} {where}; a target must be outside every storage pool"
        )


def open_folder(path: str) -> int:
    """An O_PATH handle on a folder kubelet names (symlinks followed: its root dir is often one)."""
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def nearest_folder(path: str) -> str:
    """`path` or its closest ancestor that is a folder (symlinks followed: kubelet's may be)."""
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path

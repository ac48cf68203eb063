"""Where a publish target may be: never inside a storage pool, nor in a mount of one, nor around one.

Folders are compared by device and inode of what is opened, never by path strings, so symlinks and bind mounts
cannot make a pool look like somewhere else.
"""

from __future__ import annotations

import os

from hpp_csi import errors
from hpp_csi.linux import mounts
from hpp_csi.linux.safe_open import open_dir, opened
from hpp_csi.storage.block_publish import Identity
from hpp_csi.storage.pools import StoragePool


def ancestry(dir_fd: int) -> list[Identity]:
    """(st_dev, st_ino) of the folder open at `dir_fd` and of every folder above it up to /, found by opening
    `..` from descriptors: what the folders are, not what their names say (symlinks cannot fool it)."""
    chain: list[Identity] = []
    fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        while True:
            st = os.fstat(fd)
            chain.append((st.st_dev, st.st_ino))
            parent = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            up = os.fstat(parent)
            os.close(fd)
            fd = parent
            if (up.st_dev, up.st_ino) == chain[-1]:
                return chain
    finally:
        os.close(fd)


def _within(root: str, folder: str) -> bool:
    return root == folder or root.startswith(folder.rstrip("/") + "/")


def pool_views(pools: list[StoragePool]) -> dict[Identity, str]:
    """Folders that show a pool's content: each pool's directory and every mount of a folder inside a pool
    (a published volume, or the pool bind-mounted elsewhere), by identity, each with a description."""
    views: dict[Identity, str] = {}
    table = mounts.mount_table()
    for pool in pools:
        try:
            with opened(open_dir(pool.volumes_dir)) as fd:
                st = os.fstat(fd)
        except OSError:
            continue  # a pool that is not there cannot hold a target
        views[(st.st_dev, st.st_ino)] = f"storage pool {pool.name!r} ({pool.volumes_dir})"
        major, minor, inner = mounts.fs_path(pool.volumes_dir, table)
        for entry in table:
            if (entry.major, entry.minor) != (major, minor) or not _within(entry.root, inner):
                continue
            try:
                st = os.stat(entry.mount_point, follow_symlinks=False)
            except OSError:
                continue
            views.setdefault((st.st_dev, st.st_ino),
                             f"{entry.mount_point}, a mount of storage pool {pool.name!r}'s {entry.root}")
    return views


def refuse_target_in_pool(folder_fd: int, target: str, pools: list[StoragePool], is_target: bool) -> None:
    """INVALID_ARGUMENT when the folder open at `folder_fd` is in a pool or in a mount of one; when it is the
    target itself, also when it holds a pool. Compared by device and inode, so symlinks cannot fool it."""
    views = pool_views(pools)
    for ident in ancestry(folder_fd):
        if ident in views:
            raise errors.invalid_argument(
                f"target_path {target} is inside {views[ident]}; a target must be outside every storage pool"
            )
    if not is_target:
        return
    st = os.fstat(folder_fd)
    for pool in pools:
        try:
            with opened(open_dir(pool.volumes_dir)) as fd:
                holds = (st.st_dev, st.st_ino) in ancestry(fd)
        except OSError:
            continue
        if holds:
            raise errors.invalid_argument(
                f"target_path {target} contains storage pool {pool.name!r} ({pool.volumes_dir}); a target must be "
                "outside every storage pool"
            )


def open_folder(path: str) -> int:
    """An O_PATH handle on a folder kubelet names (symlinks followed: its root dir is often one)."""
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def nearest_folder(path: str) -> str:
    """`path` or its closest ancestor that is a folder (symlinks followed: kubelet's may be)."""
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path

"""How much a volume directory holds, counted without ever following what its tenant planted."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Usage:
    used_bytes: int
    inodes: int


MAX_WALK_DEPTH = 256  # folders deeper than this (a tenant can nest without end) are not counted


def _scan(dir_fd: int) -> tuple[int, int, list[str]]:
    """(bytes, inodes, names of subfolders) of one folder's entries, none followed."""
    used, inodes, folders = 0, 0, []
    try:
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                used += st.st_blocks * 512
                inodes += 1
                if stat.S_ISDIR(st.st_mode):
                    folders.append(entry.name)
    except OSError:
        pass  # removed or made unreadable while walking: count what was seen
    return used, inodes, folders


def tree_usage(dir_fd: int) -> Usage:
    """Allocated bytes and inodes under the folder open at `dir_fd`, walked by descriptors: each subfolder is
    opened relative to its parent with O_NOFOLLOW, so a symlink a pod plants (or swaps in) is never followed."""
    root = os.fstat(dir_fd)
    used, inodes = root.st_blocks * 512, 1
    fds = [os.dup(dir_fd)]
    pending: list[list[str]] = []
    try:
        more_bytes, more_inodes, folders = _scan(fds[0])
        used, inodes, pending = used + more_bytes, inodes + more_inodes, [folders]
        while fds:
            if not pending[-1] or len(fds) >= MAX_WALK_DEPTH:
                os.close(fds.pop())
                pending.pop()
                continue
            name = pending[-1].pop()
            try:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fds[-1])
            except OSError:
                continue  # replaced by something else since it was listed
            fds.append(child)
            more_bytes, more_inodes, folders = _scan(child)
            used, inodes = used + more_bytes, inodes + more_inodes
            pending.append(folders)
    finally:
        for fd in fds:
            os.close(fd)
    return Usage(used, inodes)

"""What the node-side security tests share: a victim tree outside every pool and its exact fingerprint, the
kernel's view of mounts and loop devices under a root, and a thread that flips a path while the driver works."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from drivertools import MiB, loop_backing_files, mount_points_under

Fingerprint = dict[str, tuple[int, int, int, str]]


def make_victim(root: Path) -> Path:
    """Files a tenant would love to reach: a tree with data, a disk image, a nested folder, outside the pools."""
    victim = root / "victim"
    (victim / "nested" / "deeper").mkdir(parents=True)
    (victim / "secret").write_bytes(b"do not touch\n")
    for i in range(40):
        (victim / "nested" / f"file-{i}").write_bytes(os.urandom(512))
    (victim / "nested" / "deeper" / "big").write_bytes(os.urandom(MiB))
    with open(victim / "disk.img", "wb") as f:
        f.write(os.urandom(64 * 1024))
        f.truncate(4 * MiB)
    return victim


def fingerprint(tree: Path) -> Fingerprint:
    """Every entry under `tree` (itself included): mode, size, mtime and a digest of the bytes or link text."""
    found: Fingerprint = {}
    for folder, dirs, files in os.walk(tree):
        for name in [".", *dirs, *files]:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                digest = os.readlink(path)
            else:
                digest = ""
            found[os.path.relpath(path, tree)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return found


def mounts_under(root: Path) -> set[str]:
    return set(mount_points_under(root))


def loops_on(path: Path) -> list[str]:
    """Loop devices whose backing file is the inode at `path`, from sysfs. The backing file's name is not
    followed: a symlink a test swapped in there for a moment is not the file the device holds."""
    st = os.stat(path)
    found = []
    for device, backing in loop_backing_files().items():
        with contextlib.suppress(OSError):
            other = os.stat(backing.removesuffix(" (deleted)"), follow_symlinks=False)
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                found.append(device)
    return sorted(found)


@contextlib.contextmanager
def flipping(flip: Callable[[], None], unflip: Callable[[], None], pause: float = 0.0005) -> Iterator[list[int]]:
    """Run flip/unflip alternately in a thread for the block's duration; yields [flips done]; always ends in
    the unflipped state, and re-raises what the thread hit."""
    stop = threading.Event()
    count = [0]
    failure: list[BaseException] = []

    def run() -> None:
        try:
            while not stop.is_set():
                flip()
                time.sleep(pause)
                unflip()
                count[0] += 1
                time.sleep(pause)
        except BaseException as exc:  # handed to the test thread
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield count
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive(), "the flipping thread did not stop"
    if failure:
        raise failure[0]


def swap_in(path: Path, replacement: Callable[[Path], None]) -> Callable[[], None]:
    """A flip: `path` moved aside to a hidden name and `replacement(tmp)` renamed over it atomically."""
    hold, tmp = path.with_name(f".hold-{path.name}"), path.with_name(f".tmp-{path.name}")

    def flip() -> None:
        os.rename(path, hold)
        replacement(tmp)
        os.rename(tmp, path)

    return flip


def swap_back(path: Path) -> Callable[[], None]:
    """The matching unflip: the original renamed back over whatever is at `path`."""
    hold = path.with_name(f".hold-{path.name}")

    def unflip() -> None:
        if os.path.isdir(hold) and not os.path.islink(hold):
            os.unlink(path)  # a directory cannot be renamed over a symlink: a moment with nothing there
        os.rename(hold, path)

    return unflip

"""Cloning volumes: whole-file reflinks (FICLONE) where extents can be shared, sparse copies elsewhere.

Snapshots and clones of a volume must be independent copies that are cheap when the filesystem can share
extents (XFS with reflink=1, btrfs) and still correct when it cannot (ext4, tmpfs, across filesystems).
The source is the tenant's: its root is opened relative to its parent (the pool, a snapshot folder) with
O_NOFOLLOW, the tree walk works on directory file descriptors, and files are opened as O_PATH and checked
before being read, so a symlink, FIFO or device planted in a live source volume, or swapped in during the copy,
can never lead the copy outside it or block it. Symlinks inside the tree are copied as symlinks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from hpp_csi.linux.safe_open import UnsafePath, open_dir, opened

FICLONE = 0x40049409
# FICLONE fails with these when the filesystem (or the pair of filesystems) cannot share extents.
_NO_REFLINK = frozenset({errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS})
# copy_file_range fails with these where it cannot work (old kernels across filesystems, some fs types).
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})
_CHUNK = 8 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_XATTR_OPTIONAL = ("security.", "trusted.")


class CloneMethod(StrEnum):
    REFLINK = "reflink"
    SPARSE_COPY = "sparse-copy"


class CloneError(OSError):
    """A clone could not be made; the message names the source and destination."""


@dataclass
class CloneReport:
    """What a tree clone did, so callers can log it and tests can check the method."""

    reflinked: int = 0
    copied: int = 0
    bytes: int = 0
    directories: int = 0
    symlinks: int = 0
    special: int = 0
    hardlinks: int = 0
    skipped_xattrs: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        """'reflink', 'sparse-copy', 'mixed', or 'none' (no regular file data)."""
        if self.reflinked and self.copied:
            return "mixed"
        if self.reflinked:
            return CloneMethod.REFLINK.value
        return CloneMethod.SPARSE_COPY.value if self.copied else "none"


def ficlone(src_fd: int, dst_fd: int) -> bool:
    """Share all of src's extents with dst; False when the filesystem cannot, other errors raise."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as exc:
        if exc.errno in _NO_REFLINK:
            return False
        raise
    return True


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Copy [offset, offset+length) at the same offset, in-kernel where possible."""
    end = offset + length
    use_kernel = True
    while offset < end:
        count = min(_CHUNK, end - offset)
        if use_kernel:
            try:
                done = os.copy_file_range(src_fd, dst_fd, count, offset, offset)
            except OSError as exc:
                if exc.errno not in _NO_COPY_RANGE:
                    raise
                use_kernel = False
                continue
        else:
            data = os.pread(src_fd, count, offset)
            done = os.pwrite(dst_fd, data, offset) if data else 0
        if done == 0:  # the source shrank under us: keep what was there
            return
        offset += done


def sparse_copy(src_fd: int, dst_fd: int) -> None:
    """Copy only src's data extents (SEEK_DATA/SEEK_HOLE); holes stay holes, the size is kept."""
    size = os.fstat(src_fd).st_size
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src_fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        stop = os.lseek(src_fd, start, os.SEEK_HOLE)
        _copy_range(src_fd, dst_fd, start, min(stop, size) - start)
        offset = stop
    os.ftruncate(dst_fd, size)


def _clone_data(src_fd: int, dst_fd: int) -> CloneMethod:
    if ficlone(src_fd, dst_fd):
        return CloneMethod.REFLINK
    sparse_copy(src_fd, dst_fd)
    return CloneMethod.SPARSE_COPY


def _copy_xattrs(src: int | str, dst: int | str, skipped: list[str], where: str) -> None:
    """Copy every extended attribute; security.*/trusted.* ones the kernel refuses are noted, not fatal."""
    follow = not isinstance(src, str)
    try:
        names = os.listxattr(src, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    for name in names:
        try:
            value = os.getxattr(src, name, follow_symlinks=follow)
            os.setxattr(dst, name, value, follow_symlinks=follow)
        except OSError as exc:
            optional = name.startswith(_XATTR_OPTIONAL) or isinstance(src, str)
            if not (optional and exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES)):
                code = exc.errno or errno.EIO
                raise CloneError(code, f"copy xattr {name} of {where}: {os.strerror(code)}") from exc
            skipped.append(f"{where}: {name}")


def _apply_metadata(st: os.stat_result, src_fd: int, dst_fd: int, skipped: list[str], where: str) -> None:
    # Order matters: chown clears setuid bits and file capabilities, so xattrs and mode come after it.
    os.fchown(dst_fd, st.st_uid, st.st_gid)
    _copy_xattrs(src_fd, dst_fd, skipped, where)
    os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
    os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def open_source_file(dir_fd: int, name: str) -> int:
    """Open `name` in `dir_fd` for reading only if it is a regular file: never follows a symlink, never opens a
    FIFO or device (it is looked at through O_PATH first, then reopened: the same inode, no race)."""
    path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    with opened(path_fd):
        st = os.fstat(path_fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(errno.ELOOP if stat.S_ISLNK(st.st_mode) else errno.EINVAL,
                             f"not a regular file (mode {stat.filemode(st.st_mode)})", name)
        return os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC)


def open_source_dir(src: str | os.PathLike[str]) -> int:
    """A directory fd of `src`, opened relative to its parent without following a symlink there."""
    path = Path(src)
    with opened(open_dir(path.parent)) as parent:
        return open_dir(path.name, dir_fd=parent)


def clone_file(src: str | os.PathLike[str], dst: str | os.PathLike[str],
               skipped_xattrs: list[str] | None = None) -> CloneMethod:
    """Clone one regular file (e.g. a block volume's sparse image) to a new `dst`, metadata included.

    `src` is opened relative to its parent folder: a symlink, FIFO or device there raises UnsafePath.
    """
    path = Path(src)
    with opened(open_dir(path.parent)) as parent:
        src_fd = open_source_file(parent, path.name)
    try:
        st = os.fstat(src_fd)
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            method = _clone_data(src_fd, dst_fd)
            skipped = skipped_xattrs if skipped_xattrs is not None else []
            _apply_metadata(st, src_fd, dst_fd, skipped, os.fspath(src))
        except BaseException:
            os.close(dst_fd)
            os.unlink(dst)
            raise
        os.close(dst_fd)
        return method
    finally:
        os.close(src_fd)


class _TreeCloner:
    """Walks the source through directory fds (openat-style), recreating each entry under the destination."""

    def __init__(self, report: CloneReport, dst_root: int) -> None:
        self.report = report
        self.dst_root = dst_root
        self.first_copy: dict[tuple[int, int], str] = {}  # (dev, ino) of a hard-linked source -> path in dst

    def directory(self, src_fd: int, dst_fd: int, rel: str) -> None:
        for entry in sorted(os.listdir(src_fd)):
            path = os.path.join(rel, entry)
            # The tenant may swap an entry between our lstat and our open: the open refuses what it did not
            # expect (ELOOP, ENOTDIR, EINVAL), and the entry is then copied as what it has become.
            for attempt in range(3):
                try:
                    st = os.stat(entry, dir_fd=src_fd, follow_symlinks=False)
                    self.entry(src_fd, dst_fd, entry, st, path)
                    break
                except FileNotFoundError:
                    _remove_partial(dst_fd, entry)
                    break  # gone since the listing: not part of the copy
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EINVAL) or attempt == 2:
                        raise
                    _remove_partial(dst_fd, entry)

    def entry(self, src_fd: int, dst_fd: int, entry: str, st: os.stat_result, path: str) -> None:
        if stat.S_ISDIR(st.st_mode):
            self.subdirectory(src_fd, dst_fd, entry, st, path)
        elif stat.S_ISREG(st.st_mode):
            self.regular(src_fd, dst_fd, entry, st, path)
        elif stat.S_ISLNK(st.st_mode):
            self.symlink(src_fd, dst_fd, entry, st, path)
        elif stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            os.mknod(entry, st.st_mode, st.st_rdev, dir_fd=dst_fd)
            self.finish_path(src_fd, dst_fd, entry, st, path)
            self.report.special += 1
        # sockets are bound by a live process; a copy of one is meaningless, so none is made

    def subdirectory(self, src_dir: int, dst_dir: int, name: str, st: os.stat_result, rel: str) -> None:
        os.mkdir(name, 0o700, dir_fd=dst_dir)
        src_fd = os.open(name, _DIR_FLAGS, dir_fd=src_dir)
        try:
            dst_fd = os.open(name, _DIR_FLAGS, dir_fd=dst_dir)
            try:
                self.directory(src_fd, dst_fd, rel)
                # st was taken before the listing, which may have moved the source's atime
                _apply_metadata(st, src_fd, dst_fd, self.report.skipped_xattrs, rel)
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)
        self.report.directories += 1

    def regular(self, src_dir: int, dst_dir: int, name: str, st: os.stat_result, rel: str) -> None:
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.first_copy:
            # the destination tree is ours and fresh, so naming the first copy by path is safe there
            os.link(self.first_copy[key], name, src_dir_fd=self.dst_root, dst_dir_fd=dst_dir,
                    follow_symlinks=False)
            self.report.hardlinks += 1
            return
        src_fd = open_source_file(src_dir, name)
        try:
            live = os.fstat(src_fd)  # before reading, which can move atime
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            dst_fd = os.open(name, flags, 0o600, dir_fd=dst_dir)
            try:
                method = _clone_data(src_fd, dst_fd)
                _apply_metadata(live, src_fd, dst_fd, self.report.skipped_xattrs, rel)
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)
        if method is CloneMethod.REFLINK:
            self.report.reflinked += 1
        else:
            self.report.copied += 1
        self.report.bytes += live.st_size
        if st.st_nlink > 1:
            self.first_copy[key] = rel

    def symlink(self, src_dir: int, dst_dir: int, name: str, st: os.stat_result, rel: str) -> None:
        os.symlink(os.readlink(name, dir_fd=src_dir), name, dir_fd=dst_dir)
        self.finish_path(src_dir, dst_dir, name, st, rel)
        self.report.symlinks += 1

    def finish_path(self, src_dir: int, dst_dir: int, name: str, st: os.stat_result, rel: str) -> None:
        """Metadata of an entry that cannot be opened (symlink, device, fifo), never following it."""
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_dir, follow_symlinks=False)
        # /proc/self/fd/N is the directory itself: only `name` is resolved, and l*xattr does not follow it.
        _copy_xattrs(f"/proc/self/fd/{src_dir}/{name}", f"/proc/self/fd/{dst_dir}/{name}",
                     self.report.skipped_xattrs, rel)
        if not stat.S_ISLNK(st.st_mode):  # Linux has no lchmod; a symlink's mode is always 0777
            os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dst_dir, follow_symlinks=False)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_dir, follow_symlinks=False)


def clone_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> CloneReport:
    """Clone the tree under `src` into `dst` (created, or existing and empty), metadata included.

    An existing `dst` keeps its own filesystem attributes (a project ID set for its quota stays, and new
    files inherit it); its owner, mode, times and xattrs become src's.
    """
    report = CloneReport()
    src_fd = open_source_dir(src)
    try:
        root_st = os.fstat(src_fd)
        if not os.path.lexists(dst):
            os.mkdir(dst, 0o700)
        dst_fd = os.open(dst, _DIR_FLAGS)
        try:
            if os.listdir(dst_fd):
                raise CloneError(errno.ENOTEMPTY, f"clone {src} into {dst}: destination is not empty")
            _TreeCloner(report, dst_fd).directory(src_fd, dst_fd, "")
            _apply_metadata(root_st, src_fd, dst_fd, report.skipped_xattrs, ".")
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    return report


def _remove_partial(dst_fd: int, name: str) -> None:
    """Drop what a failed attempt left under `name` in the (fresh, ours) destination directory."""
    try:
        st = os.stat(name, dir_fd=dst_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        child = os.open(name, _DIR_FLAGS, dir_fd=dst_fd)
        try:
            for inner in os.listdir(child):
                _remove_partial(child, inner)
        finally:
            os.close(child)
        os.rmdir(name, dir_fd=dst_fd)
    else:
        os.unlink(name, dir_fd=dst_fd)

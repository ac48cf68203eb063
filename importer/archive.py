"""Tar extraction into a tenant's directory that never follows a link and can be undone.

Python's tarfile filters resolve member paths with realpath and then extract by path string, which let
CVE-2025-4517-style archives (symlink chains, paths longer than PATH_MAX) write outside on older interpreters. Here
every member is created relative to a directory descriptor: each parent component is opened with
open_beneath (openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), so a symlink on the way, whether the archive made it
or the tenant planted it, is refused instead of followed. Everything created is recorded so a refusal, a checksum
mismatch or a signal removes exactly what this import wrote and nothing the tenant had before.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import stat
import tarfile
from typing import IO

from hpp_csi.linux.safe_open import UnsafePath, open_beneath
from importer.errors import ImageTooLarge, InvalidImage
from importer.pipeline import CHUNK, Reader

log = logging.getLogger(__name__)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY
# What Python's data filter also drops: set-id and sticky bits, write access for group and others.
FILE_MODE_MASK = 0o755
_KINDS = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}


class UnsafeMember(InvalidImage):
    """A tar member that would leave the destination, follow a link, or create a special file."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"unsafe tar member {name!r}: {why}")


def member_parts(name: str) -> list[str]:
    """The path components of a member name, refusing absolute names and `..` (plain function, tested directly)."""
    if not name or "\0" in name:
        raise UnsafeMember(name, "empty name or NUL byte")
    if name.startswith("/"):
        raise UnsafeMember(name, "absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeMember(name, "path contains '..'")
    return parts


def link_target_inside(member_parts_: list[str], linkname: str) -> bool:
    """Whether a symlink at member_parts_ pointing to linkname stays inside the destination, read lexically."""
    if not linkname or linkname.startswith("/") or "\0" in linkname:
        return False
    joined = posixpath.normpath(posixpath.join(*member_parts_[:-1], linkname) if len(member_parts_) > 1
                                else linkname)
    return joined != ".." and not joined.startswith("../")


class Extraction:
    """One archive extracted beneath dest_fd; undo() removes what it created, newest first."""

    def __init__(self, dest_fd: int, limit: int) -> None:
        self._dest_fd = dest_fd
        self._limit = limit
        self._total = 0
        self._created: list[tuple[tuple[str, ...], bool]] = []  # (path, is_dir) in creation order
        self._ours: set[tuple[str, ...]] = set()
        self._files: set[tuple[str, ...]] = set()  # regular files this import wrote: the only hard link sources

    def run(self, reader: Reader) -> None:
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    self._member(tar, member)
        except tarfile.TarError as err:
            raise InvalidImage(f"invalid tar archive: {err}") from err

    def undo(self) -> None:
        """Remove every entry this extraction created (never anything that was there before)."""
        for path, is_dir in reversed(self._created):
            try:
                parent = self._open_parent(path, create=False)
            except OSError as err:
                log.warning("cannot remove %s: %s", "/".join(path), err)
                continue
            try:
                if is_dir:
                    os.rmdir(path[-1], dir_fd=parent)
                else:
                    os.unlink(path[-1], dir_fd=parent)
            except FileNotFoundError:
                pass
            except OSError as err:
                log.warning("cannot remove %s: %s", "/".join(path), err)
            finally:
                self._close(parent)
        self._created.clear()

    # -- members ------------------------------------------------------------------------------------

    def _member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = tuple(member_parts(member.name))
        if member.type in _KINDS:
            raise UnsafeMember(member.name, f"is {_KINDS[member.type]}; special files are refused")
        if not parts:
            if member.isdir():
                return  # "." or "./": the destination itself
            raise UnsafeMember(member.name, "names the destination itself")
        if member.isfile():
            self._total += member.size
            if self._total > self._limit:
                raise ImageTooLarge(self._total, self._limit, at_least=True)
        try:
            parent = self._open_parent(parts, create=True, name=member.name)
        except UnsafePath as err:
            raise UnsafeMember(member.name, f"its parent path passes through a symlink or leaves the destination "
                                            f"({err.filename})") from None
        except OSError as err:
            raise _cannot_extract(member.name, err) from err
        try:
            self._create(tar, parent, parts, member)
        except OSError as err:  # ENAMETOOLONG, ENOSPC, EDQUOT...: still one line naming the member
            raise _cannot_extract(member.name, err) from err
        finally:
            self._close(parent)

    def _create(self, tar: tarfile.TarFile, parent: int, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        if member.isdir():
            self._directory(parent, parts, member)
        elif member.isfile():
            self._regular(tar, parent, parts, member)
        elif member.issym():
            self._symlink(parent, parts, member)
        elif member.islnk():
            self._hardlink(parent, parts, member)
        else:
            raise UnsafeMember(member.name, f"unsupported member type {member.type!r}")

    def _directory(self, parent: int, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        fd = self._enter(parent, parts, member.name, create=True)
        try:
            if parts in self._ours:  # never change the mode of a directory the tenant had
                os.fchmod(fd, (member.mode & FILE_MODE_MASK) | 0o700)
        finally:
            os.close(fd)

    def _regular(self, tar: tarfile.TarFile, parent: int, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        self._replace_own(parent, parts, member.name)
        try:
            fd = open_beneath(parent, parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except UnsafePath:
            raise UnsafeMember(member.name, "is a symlink in the destination") from None
        except FileExistsError:
            raise UnsafeMember(member.name, "already exists in the destination; refusing to replace it") from None
        self._record(parts, is_dir=False)
        self._files.add(parts)
        try:
            self._write_data(fd, tar.extractfile(member), member)
            os.fchmod(fd, (member.mode & FILE_MODE_MASK) | 0o600)
            with contextlib.suppress(OverflowError, ValueError, OSError):  # a nonsense mtime is not worth failing
                os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)

    def _write_data(self, fd: int, data: IO[bytes] | None, member: tarfile.TarInfo) -> None:
        """A regular member's bytes into its new file (a subclass may keep holes, or sync)."""
        if data is None:
            return
        while chunk := data.read(CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]

    def _symlink(self, parent: int, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        if not link_target_inside(list(parts), member.linkname):
            raise UnsafeMember(member.name, f"symlink to {member.linkname!r} points outside the destination")
        self._replace_own(parent, parts, member.name)
        try:
            os.symlink(member.linkname, parts[-1], dir_fd=parent)
        except FileExistsError:
            raise UnsafeMember(member.name, "already exists in the destination; refusing to replace it") from None
        self._record(parts, is_dir=False)

    def _hardlink(self, parent: int, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        try:
            source = tuple(member_parts(member.linkname))
        except UnsafeMember:
            raise UnsafeMember(member.name, f"hard link to {member.linkname!r} points outside the destination") \
                from None
        if source not in self._files:
            raise UnsafeMember(member.name, f"hard link to {member.linkname!r}, which is not a regular file of "
                                            "this archive")
        self._replace_own(parent, parts, member.name)
        try:
            source_parent = self._open_parent(source, create=False)
        except UnsafePath:
            raise UnsafeMember(member.name, f"hard link source {member.linkname!r} passes through a symlink") \
                from None
        try:
            # follow_symlinks=False: linkat without AT_SYMLINK_FOLLOW links a swapped-in symlink itself, never its
            # target; the check below then refuses it.
            os.link(source[-1], parts[-1], src_dir_fd=source_parent, dst_dir_fd=parent, follow_symlinks=False)
        except FileExistsError:
            raise UnsafeMember(member.name, "already exists in the destination; refusing to replace it") from None
        finally:
            self._close(source_parent)
        self._record(parts, is_dir=False)
        if not stat.S_ISREG(os.stat(parts[-1], dir_fd=parent, follow_symlinks=False).st_mode):
            raise UnsafeMember(member.name, f"hard link to {member.linkname!r}, which is no longer a regular file")
        self._files.add(parts)

    # -- directories --------------------------------------------------------------------------------

    def _open_parent(self, parts: tuple[str, ...], create: bool, name: str = "") -> int:
        """A descriptor of the directory holding parts[-1], walked one component at a time beneath dest_fd."""
        current = self._dest_fd
        try:
            for depth in range(1, len(parts)):
                nxt = self._enter(current, parts[:depth], name or "/".join(parts), create)
                self._close(current)
                current = nxt
            return current
        except BaseException:
            self._close(current)
            raise

    def _enter(self, parent: int, path: tuple[str, ...], name: str, create: bool) -> int:
        """Open (creating if asked) the directory path[-1] in parent; a symlink or another file is refused."""
        if create:
            try:
                os.mkdir(path[-1], 0o700, dir_fd=parent)
                self._record(path, is_dir=True)
            except FileExistsError:
                pass
        try:
            return open_beneath(parent, path[-1], DIR_FLAGS)
        except UnsafePath:
            raise UnsafeMember(name, f"{'/'.join(path)!r} is a symlink") from None
        except NotADirectoryError:
            raise UnsafeMember(name, f"{'/'.join(path)!r} is not a directory") from None

    def _replace_own(self, parent: int, parts: tuple[str, ...], name: str) -> None:
        """A later member of the same name wins, as tar does, but only over an entry this import created."""
        if parts not in self._ours:
            return
        try:
            os.unlink(parts[-1], dir_fd=parent)
        except IsADirectoryError:
            raise UnsafeMember(name, "replaces a directory of the same archive") from None
        except OSError as err:
            if err.errno == errno.EISDIR or err.errno == errno.EPERM:
                raise UnsafeMember(name, "replaces a directory of the same archive") from None
            raise
        self._files.discard(parts)
        self._ours.discard(parts)
        self._created = [(p, d) for p, d in self._created if p != parts]

    def _record(self, path: tuple[str, ...], is_dir: bool) -> None:
        self._created.append((path, is_dir))
        self._ours.add(path)

    def _close(self, fd: int) -> None:
        if fd != self._dest_fd:
            with contextlib.suppress(OSError):
                os.close(fd)


def _cannot_extract(name: str, err: OSError) -> InvalidImage:
    return InvalidImage(f"cannot extract tar member {name!r}: {err.strerror or err}")


def extract_tar(reader: Reader, dest_fd: int, limit: int) -> Extraction:
    """Extract a tar stream beneath dest_fd; on any failure what was extracted is removed and the error raised."""
    extraction = Extraction(dest_fd, limit)
    try:
        extraction.run(reader)
    except BaseException:
        extraction.undo()
        raise
    return extraction

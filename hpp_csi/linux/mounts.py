"""Mounting through mount(2)/umount2(2) and reading /proc/self/mountinfo: no `mount` process is forked."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
from dataclasses import dataclass
from pathlib import Path

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# Per-mount-point flags a bind mount can carry, as a user writes them in mount options.
BIND_FLAGS: dict[str, int] = {
    "ro": MS_RDONLY,
    "rw": 0,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "bind": 0,
    "defaults": 0,
}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
STATX_BASIC_STATS = 0x7FF
STATX_ATTR_MOUNT_ROOT = 0x2000
_STATX_SIZE = 256
_STATX_ATTRIBUTES = slice(8, 16)
_STATX_ATTRIBUTES_MASK = slice(56, 64)
_STATX_MASK = slice(0, 4)
_STATX_MNT_ID = slice(144, 152)
STATX_MNT_ID = 0x1000
AT_EMPTY_PATH = 0x1000


# The per-mount options mountinfo shows for the flags above, to tell whether a mount carries what was asked.
VISIBLE_OPTIONS: dict[int, str] = {
    MS_RDONLY: "ro",
    MS_NOSUID: "nosuid",
    MS_NODEV: "nodev",
    MS_NOEXEC: "noexec",
    MS_NOATIME: "noatime",
    MS_NODIRATIME: "nodiratime",
}


def visible_options(flags: int) -> frozenset[str]:
    return frozenset(name for bit, name in VISIBLE_OPTIONS.items() if flags & bit)


class UnknownMountFlag(ValueError):
    """A mount option that cannot apply to a bind mount."""


def bind_flags(options: list[str]) -> int:
    """Translate mount options (possibly comma-joined) into MS_* flags for a bind mount."""
    flags = 0
    for option in (part.strip() for item in options for part in item.split(",")):
        if not option:
            continue
        if option not in BIND_FLAGS:
            known = ", ".join(sorted(BIND_FLAGS))
            raise UnknownMountFlag(f"mount option {option!r} cannot apply to a bind mount (supported: {known})")
        flags |= BIND_FLAGS[option]
    return flags


def _encode(value: str | os.PathLike[str] | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | os.PathLike[str], target: str | os.PathLike[str], fstype: str | None = None,
          flags: int = 0, data: str | None = None) -> None:
    """mount(2); raises OSError with the paths in the message."""
    if _libc.mount(_encode(source), _encode(target), _encode(fstype), flags, _encode(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def bind_mount(source: str | os.PathLike[str], target: str | os.PathLike[str], flags: int = 0,
               remount_at: str | os.PathLike[str] | None = None) -> None:
    """Bind `source` on `target` carrying the per-mount flags in `flags` (ro, nosuid, ...) from the start.

    The flags are set on a detached copy before it is attached (open_tree, mount_setattr, move_mount), so
    every peer the new mount propagates to (the host's, when the driver runs in a container) gets them too; a
    remount after the bind would only change this namespace's copy. Kernels before 5.12 (ENOSYS) get the old
    bind then remount. When `target` is a /proc/self/fd link, pass the target's path as `remount_at`: the link
    still names the directory under the new mount, so a remount (or its undo) through it would miss the mount."""
    extra = flags & ~MS_BIND
    if extra:
        try:
            attach_with_flags(source, target, extra)
            return
        except MountApiMissing:
            pass
    bind_then_remount(source, target, extra, remount_at)


def bind_then_remount(source: str | os.PathLike[str], target: str | os.PathLike[str], flags: int = 0,
                      remount_at: str | os.PathLike[str] | None = None) -> None:
    """mount(2) MS_BIND, then MS_REMOUNT with the flags: they stay in this mount namespace (see bind_mount)."""
    mount(source, target, None, MS_BIND)
    extra = flags & ~MS_BIND
    if extra:
        mounted = remount_at if remount_at is not None else target
        try:
            mount("none", mounted, None, MS_BIND | MS_REMOUNT | extra)
        except OSError:
            umount(mounted)
            raise


# The new mount API (Linux 5.2; mount_setattr 5.12). Syscalls from 424 on have one number on every
# architecture but alpha; only the machines listed are known to us, the others use bind_then_remount.
_MOUNT_API_SYSCALLS: dict[str, tuple[int, int, int]] = {  # open_tree, move_mount, mount_setattr
    "x86_64": (428, 429, 442),
    "aarch64": (428, 429, 442),
    "arm64": (428, 429, 442),
}
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_SYMLINKS = 0x10
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR__ATIME = 0x70
MOUNT_ATTR_RELATIME = 0x0
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80

_MS_TO_ATTR = {MS_RDONLY: MOUNT_ATTR_RDONLY, MS_NOSUID: MOUNT_ATTR_NOSUID, MS_NODEV: MOUNT_ATTR_NODEV,
               MS_NOEXEC: MOUNT_ATTR_NOEXEC, MS_NODIRATIME: MOUNT_ATTR_NODIRATIME}
_MS_ATIME = {MS_STRICTATIME: MOUNT_ATTR_STRICTATIME, MS_NOATIME: MOUNT_ATTR_NOATIME,
             MS_RELATIME: MOUNT_ATTR_RELATIME}


class MountAttr(ctypes.Structure):
    """struct mount_attr (MOUNT_ATTR_SIZE_VER0)."""

    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class MountApiMissing(OSError):
    """This kernel or machine has no open_tree/move_mount/mount_setattr: use bind_then_remount."""


def mount_api_syscalls(machine: str | None = None) -> tuple[int, int, int] | None:
    """(open_tree, move_mount, mount_setattr) syscall numbers of `machine` (default: this one), None if unknown."""
    return _MOUNT_API_SYSCALLS.get(machine if machine is not None else platform.machine())


def mount_attr(flags: int) -> MountAttr:
    """The mount_attr that sets the per-mount MS_* `flags` (an atime mode replaces the one the source has)."""
    attr = MountAttr()
    for bit, value in _MS_TO_ATTR.items():
        if flags & bit:
            attr.attr_set |= value
    # One atime mode only; when several are asked, the first here wins (mount(2) lets strictatime win too).
    atime = [value for bit, value in _MS_ATIME.items() if flags & bit]
    if atime:
        attr.attr_set |= atime[0]
        attr.attr_clr |= MOUNT_ATTR__ATIME
    return attr


_libc.syscall.restype = ctypes.c_long


def _syscall(number: int, *args: object) -> int:
    result = _libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            raise MountApiMissing(err, "the kernel lacks the new mount API")
        raise OSError(err, os.strerror(err))
    return int(result)


def attach_with_flags(source: str | os.PathLike[str], target: str | os.PathLike[str], flags: int) -> None:
    """Clone `source` as a detached mount, set `flags` on it, then attach it at `target` (symlinks followed at
    both ends, as mount(2) does). On any failure nothing is mounted: the detached copy dies with its descriptor."""
    numbers = mount_api_syscalls()
    if numbers is None:
        raise MountApiMissing(errno.ENOSYS, f"no mount API syscall numbers known for {platform.machine()}")
    open_tree, move_mount, mount_setattr = numbers
    attr = mount_attr(flags)
    tree = -1
    try:
        tree = _syscall(open_tree, ctypes.c_int(AT_FDCWD), _encode(source),
                        ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC))
        _syscall(mount_setattr, ctypes.c_int(tree), b"", ctypes.c_uint(AT_EMPTY_PATH), ctypes.byref(attr),
                 ctypes.c_size_t(ctypes.sizeof(attr)))
        _syscall(move_mount, ctypes.c_int(tree), b"", ctypes.c_int(AT_FDCWD), _encode(target),
                 ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_SYMLINKS))
    except MountApiMissing:
        raise
    except OSError as exc:
        raise OSError(exc.errno, f"mount {source} on {target}: {exc.strerror}") from None
    finally:
        if tree >= 0:  # the detached copy goes with its descriptor: nothing stays mounted on a failure
            os.close(tree)


def umount(target: str | os.PathLike[str], lazy: bool = False) -> None:
    """umount2(2) without following a symlink at the target."""
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    if _libc.umount2(_encode(target), flags) != 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL and not is_mount_point(target):
            return
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mount_point: str
    options: frozenset[str]
    fstype: str
    source: str
    super_options: frozenset[str]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


_ESCAPED = {" ": "\\040", "\t": "\\011", "\n": "\\012", "\\": "\\134"}


def escape(field: str) -> str:
    """A path as mountinfo writes it (the inverse of _unescape)."""
    if not any(c in field for c in _ESCAPED):
        return field
    return "".join(_ESCAPED.get(c, c) for c in field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse mountinfo text (see proc(5)); optional fields end at the lone '-'."""
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 10:
            continue
        sep = fields.index("-", 6)
        major, minor = fields[2].split(":")
        entries.append(
            MountEntry(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                major=int(major),
                minor=int(minor),
                root=_unescape(fields[3]),
                mount_point=_unescape(fields[4]),
                options=frozenset(fields[5].split(",")),
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
                super_options=frozenset(fields[sep + 3].split(",")),
            )
        )
    return entries


MOUNTINFO = Path("/proc/self/mountinfo")
_MOUNTINFO = str(MOUNTINFO)


def read_mountinfo() -> str:
    """This process's mount table as text, in as few system calls as the kernel allows: open, reads of up to
    1 MiB until one returns nothing, close (read_text() adds a stat, an ioctl and two seeks, and DeleteVolume
    reads the table on every call)."""
    fd = os.open(_MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "surrogateescape")


def mount_table() -> list[MountEntry]:
    """The current mounts of this process's namespace."""
    return parse_mountinfo(read_mountinfo())


def mount_sources(text: str | None = None) -> dict[tuple[int, int, str], list[str]]:
    """(major, minor, root) -> mount points, parsing only the three fields needed: a node with hundreds of
    mounts answers 'where is this directory bind-mounted?' without building a full table."""
    index: dict[tuple[int, int, str], list[str]] = {}
    for line in (text if text is not None else read_mountinfo()).splitlines():
        fields = line.split(" ", 5)
        if len(fields) < 5:
            continue
        major, _, minor = fields[2].partition(":")
        key = (int(major), int(minor), _unescape(fields[3]))
        index.setdefault(key, []).append(_unescape(fields[4]))
    return index


def mount_id_of(fd: int) -> int:
    """The mount an open file (O_PATH too) lives on, as mountinfo numbers it: the kernel's answer for the
    descriptor, not for a path that may have changed. statx(STATX_MNT_ID) where the kernel has it (5.8+),
    else /proc/self/fdinfo."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if _libc.statx(fd, b"", AT_EMPTY_PATH, STATX_MNT_ID, buf) == 0:
        raw = buf.raw
        if int.from_bytes(raw[_STATX_MASK], "little") & STATX_MNT_ID:
            return int.from_bytes(raw[_STATX_MNT_ID], "little")
    with open(f"/proc/self/fdinfo/{fd}") as info:
        for line in info:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(f"no mnt_id in /proc/self/fdinfo/{fd}")


def mounts_by_id(ids: set[int], text: str | None = None) -> dict[int, MountEntry]:
    """The mountinfo entries of these mount ids, parsing only their lines (a node may have thousands)."""
    wanted = {f"{mount_id} " for mount_id in ids}
    lines = (text if text is not None else read_mountinfo()).splitlines()
    picked = "\n".join(line for line in lines if line[: line.find(" ") + 1] in wanted)
    return {entry.mount_id: entry for entry in parse_mountinfo(picked)}


def mounts_at(target: str | os.PathLike[str], table: list[MountEntry] | None = None) -> list[MountEntry]:
    """Mounts stacked on `target`, oldest first."""
    path = os.path.normpath(os.fspath(target))
    return [m for m in (table if table is not None else mount_table()) if m.mount_point == path]


def _mount_root_flag(target: str | os.PathLike[str]) -> bool | None:
    """statx(2)'s STATX_ATTR_MOUNT_ROOT: two syscalls instead of reading the whole mount table; None when the
    kernel cannot tell (before 5.8)."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if _libc.statx(AT_FDCWD, _encode(target), AT_SYMLINK_NOFOLLOW, STATX_BASIC_STATS, buf) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOENT, errno.ENOTDIR):
            return False
        return None
    raw = buf.raw
    if not int.from_bytes(raw[_STATX_ATTRIBUTES_MASK], "little") & STATX_ATTR_MOUNT_ROOT:
        return None
    return bool(int.from_bytes(raw[_STATX_ATTRIBUTES], "little") & STATX_ATTR_MOUNT_ROOT)


def is_mount_point(target: str | os.PathLike[str], table: list[MountEntry] | None = None) -> bool:
    """Whether something is mounted on `target` (the kernel's answer, never a remembered one)."""
    if table is None:
        flag = _mount_root_flag(target)
        if flag is not None:
            return flag
    return bool(mounts_at(target, table))


def mount_containing(path: str | os.PathLike[str], table: list[MountEntry] | None = None) -> MountEntry:
    """The mount whose mount point is the longest prefix of `path` (the filesystem holding it)."""
    real = os.path.realpath(path)
    best: MountEntry | None = None
    for entry in table if table is not None else mount_table():
        mp = entry.mount_point
        inside = real == mp or real.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) >= len(best.mount_point)):
            best = entry
    if best is None:
        raise FileNotFoundError(f"no mount holds {path}")
    return best


def fs_path(path: str | os.PathLike[str], table: list[MountEntry] | None = None) -> tuple[int, int, str]:
    """(major, minor, path inside its filesystem): how mountinfo names `path` as the root of a bind mount."""
    entry = mount_containing(path, table)
    real = os.path.realpath(path)
    rel = os.path.relpath(real, entry.mount_point)
    inner = os.path.normpath(os.path.join(entry.root, rel)) if rel != "." else entry.root
    return entry.major, entry.minor, inner

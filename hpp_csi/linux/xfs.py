"""XFS pools: safe formatting, mounting with project quotas, per-volume quota limits, reflink detection, growth.

A volume is a directory whose XFS project ID (with PROJINHERIT, so everything created inside inherits it)
carries a hard block limit: writes past it fail with ENOSPC and `df` inside it shows the volume's size.
Project IDs live in the directories' own attributes, so they are rediscovered from the filesystem after a
restart, never from memory. Quotas are set through quotactl(2), not by forking xfs_quota.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hpp_csi.linux import mounts
from hpp_csi.linux.reflink import ficlone

FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_PROJINHERIT = 0x200

# quotactl(2) for XFS-style quotas (<linux/dqblk_xfs.h>), project type.
Q_XGETQUOTA = 0x5803
Q_XSETQLIM = 0x5804
PRJQUOTA = 2
FS_DQUOT_VERSION = 1
FS_PROJ_QUOTA = 2
FS_DQ_BSOFT = 1 << 2
FS_DQ_BHARD = 1 << 3
BASIC_BLOCK = 512  # quota block counts are in 512-byte units whatever the filesystem block size
SYS_QUOTACTL_FD = 443  # same number on every architecture (Linux >= 5.14)

# First ID handed to volumes; lower ones are left to administrators' own /etc/projects entries.
FIRST_PROJECT_ID = 1000
MAX_PROJECT_ID = 2**32 - 2  # (2**32 - 1 is the kernel's "invalid")
QUOTA_UNAVAILABLE = "quota support not available in this kernel"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.quotactl.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long


class FsXattr(ctypes.Structure):
    """struct fsxattr (FS_IOC_FSGETXATTR / FS_IOC_FSSETXATTR)."""

    _fields_ = [
        ("fsx_xflags", ctypes.c_uint32),
        ("fsx_extsize", ctypes.c_uint32),
        ("fsx_nextents", ctypes.c_uint32),
        ("fsx_projid", ctypes.c_uint32),
        ("fsx_cowextsize", ctypes.c_uint32),
        ("fsx_pad", ctypes.c_ubyte * 8),
    ]


class FsDiskQuota(ctypes.Structure):
    """struct fs_disk_quota (Q_XGETQUOTA / Q_XSETQLIM)."""

    _fields_ = [
        ("d_version", ctypes.c_int8),
        ("d_flags", ctypes.c_int8),
        ("d_fieldmask", ctypes.c_uint16),
        ("d_id", ctypes.c_uint32),
        ("d_blk_hardlimit", ctypes.c_uint64),
        ("d_blk_softlimit", ctypes.c_uint64),
        ("d_ino_hardlimit", ctypes.c_uint64),
        ("d_ino_softlimit", ctypes.c_uint64),
        ("d_bcount", ctypes.c_uint64),
        ("d_icount", ctypes.c_uint64),
        ("d_itimer", ctypes.c_int32),
        ("d_btimer", ctypes.c_int32),
        ("d_iwarns", ctypes.c_uint16),
        ("d_bwarns", ctypes.c_uint16),
        ("d_itimer_hi", ctypes.c_int8),
        ("d_btimer_hi", ctypes.c_int8),
        ("d_rtbtimer_hi", ctypes.c_int8),
        ("d_padding2", ctypes.c_int8),
        ("d_rtb_hardlimit", ctypes.c_uint64),
        ("d_rtb_softlimit", ctypes.c_uint64),
        ("d_rtbcount", ctypes.c_uint64),
        ("d_rtbtimer", ctypes.c_int32),
        ("d_rtbwarns", ctypes.c_uint16),
        ("d_padding3", ctypes.c_int16),
        ("d_padding4", ctypes.c_char * 8),
    ]


class DeviceNotBlank(RuntimeError):
    """Formatting was refused: the device holds a filesystem or partition table (pass force to overwrite)."""

    def __init__(self, device: str, found: list[Signature]) -> None:
        listed = ", ".join(f"{s.type} ({s.usage}) at offset {s.offset:#x}" for s in found)
        super().__init__(f"refusing to format {device}: it already holds {listed}; wipe it or pass force")
        self.device = device
        self.signatures = found


class QuotaUnavailable(RuntimeError):
    """Project quotas cannot be used here; the message says why (kernel, mount options)."""


class CommandFailed(RuntimeError):
    """An xfsprogs/util-linux command failed; the message carries its command line and stderr."""


@dataclass(frozen=True)
class Signature:
    """A filesystem, RAID or partition-table signature found on a device."""

    type: str
    offset: int
    usage: str


@dataclass(frozen=True)
class MountResult:
    device: str
    mount_point: str
    quotas_enforced: bool
    reason: str  # why quotas are not enforced; empty when they are


@dataclass(frozen=True)
class ProjectQuota:
    """A project's usage and hard limit in bytes (limit None: no limit set)."""

    project_id: int
    used_bytes: int
    hard_limit_bytes: int | None
    inodes: int


def _run(command: list[str]) -> str:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise CommandFailed(f"{command[0]} not found: install xfsprogs/util-linux") from exc
    if proc.returncode != 0:
        raise CommandFailed(f"{' '.join(command)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


# ---- formatting -------------------------------------------------------------------------------------------


def parse_wipefs(output: str) -> list[Signature]:
    """Signatures from `wipefs --json --output TYPE,OFFSET,USAGE` (empty output: none)."""
    if not output.strip():
        return []
    return [
        Signature(type=item["type"], offset=int(item["offset"], 16), usage=item.get("usage") or "")
        for item in json.loads(output).get("signatures", [])
    ]


def signatures(device: str | os.PathLike[str]) -> list[Signature]:
    """Every signature libblkid recognises on `device`, partition tables included (read only)."""
    return parse_wipefs(_run(["wipefs", "--json", "--output", "TYPE,OFFSET,USAGE", os.fspath(device)]))


def mkfs_command(device: str, label: str | None = None, force: bool = False) -> list[str]:
    """mkfs.xfs with reflink (snapshots, clones) on a v5 superblock (project and group quotas together)."""
    command = ["mkfs.xfs", "-q", "-m", "crc=1,reflink=1"]
    if label:
        command += ["-L", label]
    if force:
        command.append("-f")
    return [*command, device]


def make_filesystem(device: str | os.PathLike[str], label: str | None = None, force: bool = False) -> None:
    """Format `device` as XFS, refusing (DeviceNotBlank) when it holds anything recognisable unless `force`."""
    path = os.fspath(device)
    if not force:
        found = signatures(path)
        if found:
            raise DeviceNotBlank(path, found)
    _run(mkfs_command(path, label, force))


# ---- mounting ---------------------------------------------------------------------------------------------


def kernel_supports_xfs_quota() -> bool:
    """XFS creates /proc/fs/xfs/xqmstat only when built with CONFIG_XFS_QUOTA (it must be loaded to say)."""
    return Path("/proc/fs/xfs/xqmstat").exists()


def quotas_enforced(mount_point: str | os.PathLike[str]) -> bool:
    """Whether the XFS mounted at `mount_point` enforces project quotas (from its superblock options)."""
    entries = mounts.mounts_at(mount_point)
    return bool(entries) and bool({"prjquota", "pquota"} & entries[-1].super_options)


def mount_xfs(device: str | os.PathLike[str], mount_point: str | os.PathLike[str], quota: bool = True,
              require_quota: bool = False, options: str = "") -> MountResult:
    """Mount XFS with project quotas; without them (quotas_enforced=False, reason given) where the kernel
    lacks quota support, unless `require_quota`, which raises QuotaUnavailable instead."""
    dev, target = os.fspath(device), os.fspath(mount_point)
    extra = [o for o in options.split(",") if o]
    if quota:
        try:
            mounts.mount(dev, target, "xfs", 0, ",".join([*extra, "prjquota"]))
            return MountResult(dev, target, True, "")
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        mounts.mount(dev, target, "xfs", 0, ",".join(extra) or None)
        # EINVAL with prjquota but a clean mount without: the kernel refused the option, not the device.
        reason = QUOTA_UNAVAILABLE if not kernel_supports_xfs_quota() else "the kernel refused prjquota"
        if require_quota:
            mounts.umount(target)
            raise QuotaUnavailable(f"mount {dev} on {target} with prjquota: {reason}")
        return MountResult(dev, target, False, reason)
    mounts.mount(dev, target, "xfs", 0, ",".join(extra) or None)
    return MountResult(dev, target, False, "quotas not requested")


def supports_reflink(directory: str | os.PathLike[str]) -> bool:
    """Try FICLONE between two scratch files in `directory`: the only reliable test of extent sharing."""
    with tempfile.TemporaryFile(dir=directory) as src, tempfile.TemporaryFile(dir=directory) as dst:
        src.write(b"\x5a" * 4096)
        src.flush()
        return ficlone(src.fileno(), dst.fileno())


def filesystem_size(path: str | os.PathLike[str]) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def grow_filesystem(mount_point: str | os.PathLike[str]) -> int:
    """Grow the XFS at `mount_point` to fill its (grown) device; returns the new size in bytes."""
    _run(["xfs_growfs", "-d", os.fspath(mount_point)])
    return filesystem_size(mount_point)


# ---- project IDs ------------------------------------------------------------------------------------------


def _get_fsxattr(fd: int) -> FsXattr:
    attr = FsXattr()
    fcntl.ioctl(fd, FS_IOC_FSGETXATTR, attr)
    return attr


def _open_nofollow(path: str | os.PathLike[str], dir_fd: int | None = None) -> int:
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)


def project_id(path: str | os.PathLike[str]) -> int:
    """The XFS project ID of a file or directory (0: none)."""
    fd = _open_nofollow(path)
    try:
        return int(_get_fsxattr(fd).fsx_projid)
    finally:
        os.close(fd)


def _set_project_fd(fd: int, project: int, inherit: bool, where: str) -> None:
    attr = _get_fsxattr(fd)
    attr.fsx_projid = project
    if inherit:
        attr.fsx_xflags |= FS_XFLAG_PROJINHERIT
    try:
        fcntl.ioctl(fd, FS_IOC_FSSETXATTR, attr)
    except OSError as exc:
        code = exc.errno or errno.EIO
        raise OSError(code, f"set project {project} on {where}: {os.strerror(code)}") from exc


def set_project(directory: str | os.PathLike[str], project: int) -> None:
    """Give `directory`, and whatever it already holds, project ID `project`; PROJINHERIT passes it on."""
    if not 0 < project <= MAX_PROJECT_ID:
        raise ValueError(f"project ID {project} out of range 1..{MAX_PROJECT_ID}")
    top = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _set_project_fd(top, project, True, os.fspath(directory))
        # Walk by fd so a symlink inside the volume cannot redirect us to files outside it.
        for dirpath, dirnames, filenames, dirfd in os.fwalk(".", follow_symlinks=False, dir_fd=top):
            for name in dirnames + filenames:
                try:
                    fd = _open_nofollow(name, dir_fd=dirfd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENXIO):  # symlink / socket: no attributes to set
                        continue
                    raise
                try:
                    _set_project_fd(fd, project, name in dirnames, os.path.join(os.fspath(directory), dirpath, name))
                finally:
                    os.close(fd)
    finally:
        os.close(top)


def used_project_ids(parent: str | os.PathLike[str]) -> set[int]:
    """Project IDs carried by the entries directly under `parent` (the volumes of a pool)."""
    used: set[int] = set()
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in os.listdir(parent_fd):
            try:
                fd = _open_nofollow(name, dir_fd=parent_fd)
            except OSError:
                continue  # symlinks, sockets, entries removed meanwhile: they carry no volume
            try:
                used.add(int(_get_fsxattr(fd).fsx_projid))
            finally:
                os.close(fd)
    finally:
        os.close(parent_fd)
    used.discard(0)
    return used


def choose_project_id(used: set[int], first: int = FIRST_PROJECT_ID) -> int:
    """The lowest ID >= `first` not in `used`: the same answer for the same pool contents."""
    candidate = first
    while candidate in used:
        candidate += 1
    if candidate > MAX_PROJECT_ID:
        raise QuotaUnavailable(f"no free project ID left from {first}")
    return candidate


def free_project_id(parent: str | os.PathLike[str], first: int = FIRST_PROJECT_ID) -> int:
    """A project ID no volume under `parent` uses (callers serialise allocation per pool)."""
    return choose_project_id(used_project_ids(parent), first)


# ---- project quotas ---------------------------------------------------------------------------------------


def _quotactl(path: str | os.PathLike[str], command: int, project: int, quota: FsDiskQuota) -> None:
    """quotactl_fd(2) on a file of the filesystem; quotactl(2) on its device where the former is missing."""
    cmd = (command << 8) | PRJQUOTA
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        result = _libc.syscall(SYS_QUOTACTL_FD, fd, ctypes.c_uint(cmd), project, ctypes.byref(quota))
        code = ctypes.get_errno() if result != 0 else 0
    finally:
        os.close(fd)
    if code == errno.ENOSYS:
        device = mounts.mount_containing(path).source
        result = _libc.quotactl(cmd, os.fsencode(device), project, ctypes.byref(quota))
        code = ctypes.get_errno() if result != 0 else 0
    if code == 0:
        return
    if code == errno.ENOSYS:
        raise QuotaUnavailable(f"project quota on {path}: {QUOTA_UNAVAILABLE}")
    if code == errno.ESRCH:
        raise QuotaUnavailable(f"project quotas are not enabled on the filesystem of {path} (mount with prjquota)")
    raise OSError(code, f"project quota {project} on {path}: {os.strerror(code)}")


def _set_block_limit(path: str | os.PathLike[str], project: int, blocks: int) -> None:
    quota = FsDiskQuota(d_version=FS_DQUOT_VERSION, d_flags=FS_PROJ_QUOTA, d_id=project,
                        d_fieldmask=FS_DQ_BSOFT | FS_DQ_BHARD, d_blk_hardlimit=blocks, d_blk_softlimit=0)
    _quotactl(path, Q_XSETQLIM, project, quota)


def set_project_limit(path: str | os.PathLike[str], project: int, hard_bytes: int) -> None:
    """Cap project `project` on the filesystem holding `path` at `hard_bytes` (rounded up to 512 bytes)."""
    if hard_bytes <= 0:
        raise ValueError(f"hard limit must be positive, got {hard_bytes} (use remove_project_limit)")
    _set_block_limit(path, project, -(-hard_bytes // BASIC_BLOCK))


def remove_project_limit(path: str | os.PathLike[str], project: int) -> None:
    """Lift project `project`'s limits (0 means unlimited to the kernel)."""
    _set_block_limit(path, project, 0)


def project_quota(path: str | os.PathLike[str], project: int) -> ProjectQuota:
    """Usage and hard limit of project `project` on the filesystem holding `path`."""
    quota = FsDiskQuota()
    try:
        _quotactl(path, Q_XGETQUOTA, project, quota)
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # no dquot yet: nothing charged, nothing limited
            return ProjectQuota(project, 0, None, 0)
        raise
    limit = int(quota.d_blk_hardlimit) * BASIC_BLOCK
    return ProjectQuota(project, int(quota.d_bcount) * BASIC_BLOCK, limit or None, int(quota.d_icount))

"""Boot a throwaway qemu guest (TCG) on a stock Debian kernel and run a shell script in it.

Why: this host's kernel lacks features we must test (XFS project quotas). The guest boots a tiny
initramfs (busybox-static + the modules it needs), mounts the host's `/` read-only over 9p, chroots
into it (so the guest runs the host's binaries and our source tree), and reports through the serial
console between markers. Usage:

    result = run_script("mkfs.xfs -V")      # VMResult(status, output, seconds, where, kernel)

The kernel is looked up, never named: the newest /boot/vmlinuz-* whose config has XFS quota and whose modules
are installed, or $HPP_VMKIT_KERNEL. `VMUnavailable` is raised (never a skip) when the guest cannot start, with
the reason.
"""

from __future__ import annotations

import functools
import gzip
import lzma
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BOOT_DIR = Path("/boot")
MODULES_DIR = Path("/lib/modules")
KERNEL_OVERRIDE = "HPP_VMKIT_KERNEL"  # a release (`uname -r` style) or a path to a vmlinuz-<release>
KERNEL_PACKAGE = "linux-image-amd64"  # Debian's metapackage for the stock kernel; scripts/install-system-deps.sh
BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"
# What the guest needs: virtio-pci + 9p to reach the host's files, xfs and loop for the tests.
# crc32c is a soft dependency of libcrc32c (a crypto lookup at runtime, absent from modules.dep).
WANTED_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "crc32c_generic", "xfs", "loop")
# What a guest that takes our volumes as disks adds (tests/vm): the virtio-scsi controller, SCSI disks, and ext4
# for the filesystems it makes on them.
DISK_MODULES = (*WANTED_MODULES, "virtio_scsi", "sd_mod", "ext4")
# The feature the quota tests exist for; a kernel without it is no use to them.
REQUIRED_CONFIG = "CONFIG_XFS_QUOTA=y"
# Debian has shipped modules plain (bookworm) and xz-compressed (trixie); busybox insmod wants them plain.
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
BEGIN, EXIT = "@@VMKIT-BEGIN@@", "@@VMKIT-EXIT="

INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /host /bin /sbin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m || echo "vmkit: insmod $m failed"; done
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /host; then
    echo "@@VMKIT-EXIT=254@@ (9p mount of host / failed)"; poweroff -f
fi
mkdir -p /keep
mount -o bind /host /keep
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mount -t tmpfs -o size=90% tmpfs /host/tmp
mount -t tmpfs tmpfs /host/run
# Host folders under /tmp or /run that the script needs (a checkout, its venv) show through the guest's tmpfs.
if [ -f /keep.list ]; then
    while read -r p; do
        [ -n "$p" ] && mkdir -p "/host$p" && mount -o bind "/keep$p" "/host$p"
    done < /keep.list
fi
cp /script.sh /host/tmp/vmkit-script.sh
echo "@@VMKIT-BEGIN@@"
chroot /host /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp TMPDIR=/tmp \
    /bin/sh /tmp/vmkit-script.sh 2>&1
echo "@@VMKIT-EXIT=$?@@"
sync
poweroff -f
"""


class VMUnavailable(RuntimeError):
    """No guest could be started (missing kernel, qemu, busybox, or the boot failed): the reason is the message."""


@dataclass(frozen=True)
class VMResult:
    status: int
    output: str
    seconds: float
    where: str
    kernel: str


@dataclass(frozen=True)
class Kernel:
    """A kernel the guest can boot: its image and the module tree the initramfs is built from."""

    release: str
    image: Path
    moddir: Path


def release_order(release: str) -> tuple[object, ...]:
    """Sort key that puts 6.1.0-100 after 6.1.0-99 (numbers compare as numbers, the rest as text)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", release))


def module_paths(moddir: Path) -> dict[str, str]:
    """Module name (dashes as underscores) -> path in modules.dep, relative to the module tree."""
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path = line.split(":", 1)[0]
        if path:
            by_name[module_name(path)] = path
    return by_name


def module_name(path: str) -> str:
    """`kernel/fs/9p/9p.ko.xz` -> `9p`; names compare with dashes as underscores, as modprobe does."""
    name = os.path.basename(path)
    for suffix in sorted(MODULE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def builtin_modules(moddir: Path) -> set[str]:
    """Names of what is compiled into the kernel: nothing to load for those."""
    listing = moddir / "modules.builtin"
    if not listing.exists():
        return set()
    return {module_name(line) for line in listing.read_text().split()}


def kernel_problem(release: str, boot: Path = BOOT_DIR, modules: Path = MODULES_DIR) -> str | None:
    """Why the guest cannot use this kernel, or None when it can."""
    if not (boot / f"vmlinuz-{release}").is_file():
        return f"{boot}/vmlinuz-{release} missing"
    config = boot / f"config-{release}"
    if not config.is_file():
        return f"{config} missing (cannot tell whether it has XFS quota)"
    if REQUIRED_CONFIG not in config.read_text(errors="replace").splitlines():
        return f"{config} lacks {REQUIRED_CONFIG}"
    moddir = modules / release
    if not (moddir / "modules.dep").is_file():
        return f"{moddir}/modules.dep missing (modules not installed)"
    have = set(module_paths(moddir)) | builtin_modules(moddir)
    absent = [name for name in WANTED_MODULES if name not in have]
    if absent:
        return f"{moddir} lacks the modules {', '.join(absent)}"
    return None


def find_kernel(boot: Path = BOOT_DIR, modules: Path = MODULES_DIR, override: str | None = None) -> Kernel:
    """The guest's kernel: `override` (default $HPP_VMKIT_KERNEL) if given, else the newest in `boot` that fits.

    Fits: /boot/config-<release> has CONFIG_XFS_QUOTA=y and the modules the initramfs loads are installed. No
    release is named here, so a kernel package update (6.1.0-56 -> 6.1.0-57) changes nothing.
    """
    override = os.environ.get(KERNEL_OVERRIDE) if override is None else override
    if override:
        release = override
        if "/" in override:  # a path to an image: its directory is the boot directory
            image = Path(override)
            boot, release = image.parent, image.name.removeprefix("vmlinuz-")
        problem = kernel_problem(release, boot, modules)
        if problem:
            raise VMUnavailable(f"{KERNEL_OVERRIDE}={override} cannot be used: {problem}")
        return Kernel(release, boot / f"vmlinuz-{release}", modules / release)
    images = sorted(boot.glob("vmlinuz-*"), key=lambda p: release_order(p.name), reverse=True)
    looked_at: list[str] = []
    for image in images:
        release = image.name.removeprefix("vmlinuz-")
        problem = kernel_problem(release, boot, modules)
        if problem is None:
            return Kernel(release, image, modules / release)
        looked_at.append(f"  {release}: {problem}")
    seen = "\n".join(looked_at) if looked_at else f"  no {boot}/vmlinuz-* at all"
    raise VMUnavailable(
        f"no kernel for the quota guest among {boot}/vmlinuz-*:\n{seen}\n"
        f"install Debian's stock kernel ({KERNEL_PACKAGE}: its config has {REQUIRED_CONFIG}), "
        f"or set {KERNEL_OVERRIDE} to a release or vmlinuz path that fits"
    )


@functools.cache
def guest_kernel() -> Kernel:
    """The kernel every boot in this test run uses (looked up once)."""
    return find_kernel()


def module_order(wanted: tuple[str, ...], modules_dep: str, builtin: frozenset[str] = frozenset()) -> list[str]:
    """Module paths (relative to /lib/modules/<release>) with dependencies before their users; built-ins skipped."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[path] = rest.split()
        by_name[module_name(path)] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key not in builtin:
            raise VMUnavailable(f"module {name} is neither in modules.dep nor built in")
    return order


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressed when Debian shipped it compressed."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dcq"], input=data, capture_output=True, check=True).stdout
    return data


def _cpio_entry(name: str, mode: int, data: bytes, ino: int) -> bytes:
    """One `newc` cpio record (the format the kernel unpacks as initramfs)."""
    encoded = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
    header = b"070701" + b"".join(f"{value:08x}".encode() for value in fields)
    record = header + encoded
    record += b"\0" * (-len(record) % 4)
    return record + data + b"\0" * (-len(data) % 4)


def cpio_archive(files: dict[str, tuple[int, bytes]]) -> bytes:
    """A newc archive of {path: (mode, content)}; directories (mode 0o40755) must precede their files."""
    out = [_cpio_entry(name, mode, data, ino) for ino, (name, (mode, data)) in enumerate(files.items(), 1)]
    out.append(_cpio_entry("TRAILER!!!", 0, b"", 0))
    return b"".join(out)


def build_initramfs(kernel: Kernel, busybox: Path = BUSYBOX, modules: tuple[str, ...] = WANTED_MODULES) -> bytes:
    """The base initramfs (init, busybox, `modules` decompressed), built afresh for every boot.

    No cache: it takes tens of milliseconds, and a cache would need a key that notices every module and busybox
    update.
    """
    if not busybox.exists():
        raise VMUnavailable(f"{busybox} missing: install busybox-static")
    dep = (kernel.moddir / "modules.dep").read_text()
    try:
        order = module_order(modules, dep, frozenset(builtin_modules(kernel.moddir)))
    except VMUnavailable as exc:
        raise VMUnavailable(f"{kernel.moddir}: {exc}") from None
    names = [module_name(path) + ".ko" for path in order]
    files: dict[str, tuple[int, bytes]] = {
        "bin": (0o40755, b""),
        "lib": (0o40755, b""),
        "lib/modules": (0o40755, b""),
        "init": (0o100755, INIT.encode()),
        "bin/busybox": (0o100755, busybox.read_bytes()),
        "modules.order": (0o100644, "".join(f"{name}\n" for name in names).encode()),
    }
    for name, path in zip(names, order, strict=True):
        files[f"lib/modules/{name}"] = (0o100644, read_module(kernel.moddir / path))
    return cpio_archive(files)


def parse_console(console: str) -> tuple[int, str]:
    """(exit status, script output) from the serial log; raises VMUnavailable when the script never ran."""
    text = console.replace("\r\n", "\n").replace("\r", "")
    if BEGIN not in text:
        raise VMUnavailable(f"guest never reached the script; console tail:\n{text[-3000:]}")
    body = text.split(BEGIN, 1)[1].lstrip("\n")
    if EXIT not in body:
        raise VMUnavailable(f"guest did not report an exit status (crash or timeout); console tail:\n{body[-3000:]}")
    output, rest = body.rsplit(EXIT, 1)
    return int(rest.split("@@", 1)[0]), output


def kept_paths() -> str:
    """The checkout and the Python environment, when they live where the guest mounts its own tmpfs (CI may
    clone under /tmp): one path a line, for the guest to bind over its tmpfs."""
    wanted = {str(Path(__file__).resolve().parents[1]), os.path.realpath(sys.prefix)}
    return "".join(f"{p}\n" for p in sorted(wanted) if p.startswith(("/tmp/", "/run/")))


def write_initrd(path: Path, script: str, modules: tuple[str, ...] = WANTED_MODULES) -> Kernel:
    """Write the initramfs that runs `script` to `path`; the kernel it is for is returned (it must boot that one)."""
    kernel = guest_kernel()
    if shutil.which(QEMU) is None:
        raise VMUnavailable(f"{QEMU} not found: install qemu-system-x86")
    base = build_initramfs(kernel, modules=modules)
    # The kernel unpacks concatenated archives in order: the per-run script rides on the base.
    extra = {"script.sh": (0o100755, script.encode()), "keep.list": (0o100644, kept_paths().encode())}
    path.write_bytes(base + cpio_archive(extra))
    return kernel


def guest_command(kernel: Kernel, initrd: Path, serial: str, memory_mib: int = 1024, share: str = "/") -> list[str]:
    """The qemu command line of a guest whose console is the chardev/backend `serial` (e.g. `file:<path>`)."""
    # multidevs=remap: the host's /proc and /sys both have inode 1 on different devices; without the
    # remap the guest sees one directory for both and mounts over one hide the other.
    return [
        QEMU, "-accel", "tcg", "-m", str(memory_mib), "-smp", "1", "-no-reboot",
        "-display", "none", "-monitor", "none", "-serial", serial,
        "-kernel", str(kernel.image), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init",
        "-fsdev", f"local,id=hostroot,path={share},security_model=passthrough,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
    ]  # fmt: skip


def run_script(script: str, timeout: float = 120.0, memory_mib: int = 1024, share: str = "/") -> VMResult:
    """Boot the guest, run `script` with /bin/sh chrooted into the host's `share` (read-only), power off."""
    with tempfile.TemporaryDirectory(prefix="vmkit-") as tmp:
        initrd = Path(tmp) / "initrd.cpio"
        kernel = write_initrd(initrd, script)
        console = Path(tmp) / "console.log"
        command = guest_command(kernel, initrd, f"file:{console}", memory_mib, share)
        started = time.monotonic()
        try:
            proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            log = console.read_text(errors="replace") if console.exists() else ""
            raise VMUnavailable(f"guest did not finish within {timeout:.0f}s; console tail:\n{log[-3000:]}") from exc
        seconds = time.monotonic() - started
        log = console.read_text(errors="replace") if console.exists() else ""
        if proc.returncode != 0 and BEGIN not in log:
            raise VMUnavailable(f"qemu exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        status, output = parse_console(log)
    where = f"ran in qemu TCG guest, kernel {kernel.release} (host {platform.release()}), {seconds:.1f}s"
    return VMResult(status, output, seconds, where, kernel.release)

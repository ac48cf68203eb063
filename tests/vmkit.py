"""Boot a throwaway qemu guest (TCG) on a stock Debian kernel and run a shell script in it.

Why: this host's kernel lacks features we must test (XFS project quotas). The guest boots a tiny
initramfs (busybox-static + the modules it needs), mounts the host's `/` read-only over 9p, chroots
into it (so the guest runs the host's binaries and our source tree), and reports through the serial
console between markers. Usage:

    result = run_script("mkfs.xfs -V")      # VMResult(status, output, seconds, where)

`VMUnavailable` is raised (never a skip) when the guest cannot start, with the reason.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

KERNEL_RELEASE = os.environ.get("HPP_VMKIT_KERNEL", "6.1.0-56-amd64")
CACHE_DIR = Path(os.environ.get("HPP_VMKIT_CACHE", "/tmp/hpp-vmkit-cache"))
BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"
# What the guest needs: virtio-pci + 9p to reach the host's files, xfs and loop for the tests.
# crc32c is a soft dependency of libcrc32c (a crypto lookup at runtime, absent from modules.dep).
WANTED_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "crc32c_generic", "xfs", "loop")
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


def module_order(wanted: tuple[str, ...], modules_dep: str) -> list[str]:
    """Module paths (relative to /lib/modules/<release>) with dependencies before their users."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[path] = rest.split()
        name = os.path.basename(path).split(".ko")[0]
        by_name[name] = by_name[name.replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        if name not in by_name:
            raise VMUnavailable(f"module {name} not found in modules.dep of {KERNEL_RELEASE}")
        visit(by_name[name])
    return order


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


def build_initramfs(cache_dir: Path = CACHE_DIR, release: str = KERNEL_RELEASE) -> Path:
    """The base initramfs (init, busybox, modules), built once and reused while its inputs are unchanged."""
    moddir = Path("/lib/modules") / release
    if not (moddir / "modules.dep").exists():
        raise VMUnavailable(f"{moddir}/modules.dep missing: install linux-image for {release}")
    if not BUSYBOX.exists():
        raise VMUnavailable(f"{BUSYBOX} missing: install busybox-static")
    order = module_order(WANTED_MODULES, (moddir / "modules.dep").read_text())
    key = hashlib.sha256("\n".join([INIT, release, *order, str(BUSYBOX.stat().st_mtime)]).encode()).hexdigest()
    target = cache_dir / f"initramfs-{release}-{key[:16]}.cpio"
    if target.exists():
        return target
    files: dict[str, tuple[int, bytes]] = {
        "bin": (0o40755, b""),
        "lib": (0o40755, b""),
        "lib/modules": (0o40755, b""),
        "init": (0o100755, INIT.encode()),
        "bin/busybox": (0o100755, BUSYBOX.read_bytes()),
        "modules.order": (0o100644, "\n".join(os.path.basename(p) for p in order).encode() + b"\n"),
    }
    for path in order:
        files[f"lib/modules/{os.path.basename(path)}"] = (0o100644, (moddir / path).read_bytes())
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(cpio_archive(files))
    tmp.replace(target)
    return target


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


def run_script(script: str, timeout: float = 120.0, memory_mib: int = 1024, share: str = "/") -> VMResult:
    """Boot the guest, run `script` with /bin/sh chrooted into the host's `share` (read-only), power off."""
    kernel = Path(f"/boot/vmlinuz-{KERNEL_RELEASE}")
    if not kernel.exists():
        raise VMUnavailable(f"{kernel} missing: install linux-image-amd64")
    if shutil.which(QEMU) is None:
        raise VMUnavailable(f"{QEMU} not found: install qemu-system-x86")
    base = build_initramfs()
    with tempfile.TemporaryDirectory(prefix="vmkit-") as tmp:
        initrd = Path(tmp) / "initrd.cpio"
        # The kernel unpacks concatenated archives in order: the per-run script rides on the cached base.
        extra = {"script.sh": (0o100755, script.encode()), "keep.list": (0o100644, kept_paths().encode())}
        initrd.write_bytes(base.read_bytes() + cpio_archive(extra))
        console = Path(tmp) / "console.log"
        command = [
            QEMU, "-accel", "tcg", "-m", str(memory_mib), "-smp", "1", "-no-reboot",
            "-display", "none", "-monitor", "none", "-serial", f"file:{console}",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init",
            "-fsdev", f"local,id=hostroot,path={share},security_model=passthrough,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        ]  # fmt: skip
        # multidevs=remap: the host's /proc and /sys both have inode 1 on different devices; without the
        # remap the guest sees one directory for both and mounts over one hide the other.
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
    where = f"ran in qemu TCG guest, kernel {KERNEL_RELEASE} (host {platform.release()}), {seconds:.1f}s"
    return VMResult(status, output, seconds, where)

"""A running guest with a virtio-scsi controller, driven only through QMP (`qemu.qmp`), with a shell on its console.

Why: our volumes end up as VM disks; this is the virt-launcher side in miniature. Disks are hot-plugged the way
libvirt does it: `blockdev-add` (a `file` or `host_device` protocol node under a `raw` format node) then
`device_add scsi-hd` on the controller's bus; unplugged with `device_del`, the `DEVICE_DELETED` event, then
`blockdev-del`. The guest is vmkit's (stock kernel, busybox initramfs, host `/` read-only over 9p).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vmkit
from qemu.qmp.legacy import QEMUMonitorProtocol

from .shell import AGENT, GuestError, GuestShell

QMP_TIMEOUT = 30.0
SCSI_BUS = "scsi0.0"


@dataclass(frozen=True)
class Disk:
    """A disk plugged into the guest: QMP names on the host, its SCSI target number in the guest."""

    name: str
    path: str
    scsi_id: int

    @property
    def node(self) -> str:
        return f"node-{self.name}"

    @property
    def format_node(self) -> str:
        return f"fmt-{self.name}"

    @property
    def device(self) -> str:
        return f"dev-{self.name}"


def blockdev_args(disk: Disk, block: bool) -> dict[str, Any]:
    """`blockdev-add` arguments: a raw format node over the file or block device (no image format probing)."""
    return {
        "driver": "raw",
        "node-name": disk.format_node,
        "file": {"driver": "host_device" if block else "file", "node-name": disk.node, "filename": disk.path,
                 "aio": "threads", "cache": {"direct": False}},
    }


def scsi_hd_args(disk: Disk) -> dict[str, Any]:
    return {"driver": "scsi-hd", "id": disk.device, "bus": SCSI_BUS, "drive": disk.format_node,
            "channel": 0, "scsi-id": disk.scsi_id, "lun": 0}


class Machine:
    """One QEMU process. `boot()` it, use `qmp`/`shell`, `shutdown()` it (always: it kills and cleans up)."""

    def __init__(self, memory_mib: int = 512) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="vmqmp-"))
        self.memory_mib = memory_mib
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._serial: socket.socket | None = None
        self._shell: GuestShell | None = None
        self._scsi_ids = iter(range(1, 256))
        self.attached: dict[str, Disk] = {}
        self.boot_seconds = 0.0

    @property
    def qmp(self) -> QEMUMonitorProtocol:
        assert self._qmp is not None, "guest not booted"
        return self._qmp

    @property
    def shell(self) -> GuestShell:
        assert self._shell is not None, "guest not booted"
        return self._shell

    def _log(self) -> str:
        log = self.workdir / "qemu.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def boot(self, timeout: float = 120.0) -> Machine:
        """Start QEMU, accept its QMP and console connections, wait for the shell; VMUnavailable if it cannot."""
        started = time.monotonic()
        initrd = self.workdir / "initrd.cpio"
        kernel = vmkit.write_initrd(initrd, AGENT, vmkit.DISK_MODULES)
        qmp_path, serial_path = self.workdir / "qmp.sock", self.workdir / "serial.sock"
        # We listen and QEMU connects: nothing the guest prints before we are ready is lost.
        self._qmp = QEMUMonitorProtocol(str(qmp_path), server=True)
        self._qmp.settimeout(QMP_TIMEOUT)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(serial_path))
        listener.listen(1)
        command = vmkit.guest_command(kernel, initrd, "chardev:console", self.memory_mib)
        command += [
            "-chardev", f"socket,id=console,path={serial_path}",
            "-chardev", f"socket,id=qmp,path={qmp_path}", "-mon", "chardev=qmp,mode=control",
            "-device", "virtio-scsi-pci,id=scsi0",
        ]  # fmt: skip
        with (self.workdir / "qemu.log").open("wb") as log:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            listener.settimeout(15)
            self._serial, _ = listener.accept()
            self._qmp.accept(timeout=15)
        except (OSError, TimeoutError) as exc:
            raise vmkit.VMUnavailable(f"qemu did not connect its console/QMP: {exc}; qemu log:\n{self._log()}") from exc
        finally:
            listener.close()
        self._shell = GuestShell(self._serial)
        try:
            self._shell.wait_ready(max(timeout - (time.monotonic() - started), 1))
        except GuestError as exc:
            raise vmkit.VMUnavailable(f"{exc}\nqemu log:\n{self._log()}") from exc
        self.boot_seconds = time.monotonic() - started
        return self

    # --- disks ------------------------------------------------------------------------------------------------
    def attach(self, name: str, path: str | Path, block: bool, timeout: float = 30.0) -> Disk:
        """Hot-plug `path` as a SCSI disk; returns once the guest has a /dev node for it."""
        disk = Disk(name, str(path), next(self._scsi_ids))
        self.qmp.cmd("blockdev-add", **blockdev_args(disk, block))
        try:
            self.qmp.cmd("device_add", **scsi_hd_args(disk))
        except Exception:
            self.qmp.cmd("blockdev-del", **{"node-name": disk.format_node})
            raise
        self.attached[name] = disk
        self.wait_for(lambda: self.guest_device(disk) is not None, timeout, f"guest to see disk {name}")
        return disk

    def detach(self, disk: Disk, timeout: float = 30.0) -> None:
        """Unplug: device_del, wait for DEVICE_DELETED, blockdev-del; then wait until the guest lost the disk."""
        self.qmp.cmd("device_del", id=disk.device)
        self.wait_event("DEVICE_DELETED", timeout, lambda data: data.get("device") == disk.device)
        self.qmp.cmd("blockdev-del", **{"node-name": disk.format_node})
        del self.attached[disk.name]
        self.wait_for(lambda: self.guest_device(disk) is None, timeout, f"guest to drop disk {disk.name}")

    def guest_device(self, disk: Disk) -> str | None:
        """`/dev/sdX` of the disk as the guest's sysfs names it by SCSI address, or None while it has none."""
        out = self.shell.check(f"ls /sys/bus/scsi/devices/*:0:{disk.scsi_id}:0/block/ 2>/dev/null || true")
        names = out.split()
        return f"/dev/{names[0]}" if names else None

    def device_of(self, disk: Disk) -> str:
        device = self.guest_device(disk)
        if device is None:
            raise GuestError(f"the guest has no device for disk {disk.name}")
        return device

    def resize(self, disk: Disk, size: int) -> None:
        self.qmp.cmd("block_resize", **{"node-name": disk.format_node, "size": size})

    def block_size(self, disk: Disk) -> int:
        """Size of the disk as QEMU's block layer sees it."""
        nodes: list[dict[str, Any]] = self.qmp.cmd("query-named-block-nodes")  # type: ignore[assignment]
        for info in nodes:
            if info["node-name"] == disk.format_node:
                return int(info["image"]["virtual-size"])
        raise KeyError(disk.format_node)

    # --- waiting ----------------------------------------------------------------------------------------------
    def wait_for(self, condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise GuestError(f"timed out after {timeout:.0f}s waiting for {what}; console tail:\n"
                                 f"{self.shell.tail()}")
            time.sleep(0.2)

    def wait_event(self, name: str, timeout: float, match: Any = lambda data: True) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(f"no QMP event {name} within {timeout:.0f}s")
            try:
                event = self.qmp.pull_event(wait=left)
            except TimeoutError:  # what asyncio.wait_for raises
                continue
            if event and event.get("event") == name and match(event.get("data", {})):
                return event

    # --- teardown ---------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Quit QEMU (killed if it lingers), close the sockets, remove the work folder. Safe to call twice."""
        if self.proc is not None and self.proc.poll() is None and self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.cmd("quit")
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(10)
        if self._serial is not None:
            self._serial.close()
            self._serial = None
        self.attached.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

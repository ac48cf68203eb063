"""The VM harness's pure parts: module ordering, the initramfs archive format, console parsing."""

from __future__ import annotations

import gzip
import lzma
import os
import platform
import subprocess
from pathlib import Path

import pytest
import vmkit

DEP = """kernel/fs/xfs/xfs.ko: kernel/lib/libcrc32c.ko
kernel/lib/libcrc32c.ko:
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko:
kernel/fs/netfs/netfs.ko:
"""


def test_module_order_puts_dependencies_first() -> None:
    order = vmkit.module_order(("9p", "xfs"), DEP)
    assert order.index("kernel/net/9p/9pnet.ko") < order.index("kernel/fs/9p/9p.ko")
    assert order.index("kernel/lib/libcrc32c.ko") < order.index("kernel/fs/xfs/xfs.ko")
    assert len(order) == len(set(order)) == 5
    with pytest.raises(vmkit.VMUnavailable, match="ext9"):
        vmkit.module_order(("ext9",), DEP)


def test_cpio_archive_is_readable_by_cpio() -> None:
    archive = vmkit.cpio_archive({"bin": (0o40755, b""), "bin/hello": (0o100755, b"#!/bin/sh\necho hi\n")})
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=archive, capture_output=True, check=True).stdout
    assert listing.decode().split() == ["bin", "bin/hello"]


def test_parse_console() -> None:
    console = "boot noise\r\n@@VMKIT-BEGIN@@\r\nline one\r\nline two\r\n@@VMKIT-EXIT=3@@\r\n[ power off ]"
    assert vmkit.parse_console(console) == (3, "line one\nline two\n")
    with pytest.raises(vmkit.VMUnavailable, match="never reached the script"):
        vmkit.parse_console("Kernel panic - not syncing")
    with pytest.raises(vmkit.VMUnavailable, match="did not report an exit status"):
        vmkit.parse_console("@@VMKIT-BEGIN@@\nhalf")


# -- finding the kernel: a fake /boot and /lib/modules, with releases other than the running one ----------------

FULL_DEP = """kernel/drivers/virtio/virtio_pci.ko:
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko
kernel/fs/netfs/netfs.ko:
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko
kernel/crypto/crc32c_generic.ko:
kernel/lib/libcrc32c.ko:
kernel/fs/xfs/xfs.ko: kernel/lib/libcrc32c.ko
kernel/drivers/block/loop.ko:
"""


def fake_kernel(boot: Path, modules: Path, release: str, *, config: str = "CONFIG_XFS_QUOTA=y\n",
                dep: str | None = FULL_DEP, compress: str = "", builtin: tuple[str, ...] = ()) -> None:
    """A kernel image, its config and a module tree whose module files hold their own path (to check copies)."""
    (boot / f"vmlinuz-{release}").write_bytes(b"not really a kernel")
    if config:
        (boot / f"config-{release}").write_text(f"CONFIG_XFS_FS=m\n{config}")
    if dep is None:
        return
    moddir = modules / release
    moddir.mkdir(parents=True)
    lines = []
    for line in dep.splitlines():
        path, rest = line.split(":", 1)
        if os.path.basename(path).split(".")[0] in builtin:
            continue
        lines.append(f"{path}{compress}:" + "".join(f" {d}{compress}" for d in rest.split()))
        data = f"ELF of {path}".encode()
        file = moddir / f"{path}{compress}"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes({"": data, ".xz": lzma.compress(data) if compress == ".xz" else b"",
                          ".gz": gzip.compress(data) if compress == ".gz" else b""}[compress])
    (moddir / "modules.dep").write_text("\n".join(lines) + "\n")
    (moddir / "modules.builtin").write_text("".join(f"kernel/x/{name}.ko\n" for name in builtin))


@pytest.fixture()
def tree(tmp_path: Path) -> tuple[Path, Path]:
    boot, modules = tmp_path / "boot", tmp_path / "lib-modules"
    boot.mkdir()
    modules.mkdir()
    return boot, modules


def test_the_newest_fitting_kernel_is_chosen_whatever_its_release(tree: tuple[Path, Path]) -> None:
    boot, modules = tree
    fake_kernel(boot, modules, "6.1.0-9-amd64")
    fake_kernel(boot, modules, "6.1.0-57-amd64")  # newest that fits: 57 > 9 as numbers, not as text
    fake_kernel(boot, modules, "6.1.0-58-amd64", config="# CONFIG_XFS_QUOTA is not set\n")
    fake_kernel(boot, modules, "6.1.0-59-amd64", dep=None)  # modules not installed
    fake_kernel(boot, modules, "6.1.0-60-amd64", dep=FULL_DEP.replace("kernel/fs/9p/9p.ko: ", "kernel/fs/9p/x: "))
    fake_kernel(boot, modules, "6.1.0-61-amd64", config="")  # no config to tell
    kernel = vmkit.find_kernel(boot, modules, override="")
    assert kernel == vmkit.Kernel("6.1.0-57-amd64", boot / "vmlinuz-6.1.0-57-amd64", modules / "6.1.0-57-amd64")
    assert kernel.release != platform.release()


def test_no_fitting_kernel_names_what_was_looked_at_and_what_to_install(tree: tuple[Path, Path]) -> None:
    boot, modules = tree
    with pytest.raises(vmkit.VMUnavailable, match=r"no .*/vmlinuz-\* at all(.|\n)*install Debian's stock kernel"):
        vmkit.find_kernel(boot, modules, override="")
    fake_kernel(boot, modules, "6.1.0-58-amd64", config="# CONFIG_XFS_QUOTA is not set\n")
    fake_kernel(boot, modules, "6.1.0-59-amd64", dep=None)
    fake_kernel(boot, modules, "6.1.0-60-amd64", dep=FULL_DEP.replace("kernel/fs/9p/9p.ko: ", "kernel/fs/9p/x: "))
    with pytest.raises(vmkit.VMUnavailable) as info:
        vmkit.find_kernel(boot, modules, override="")
    message = str(info.value)
    assert "6.1.0-58-amd64: " in message and "lacks CONFIG_XFS_QUOTA=y" in message
    assert "6.1.0-59-amd64: " in message and "modules.dep missing" in message
    assert "6.1.0-60-amd64: " in message and "lacks the modules 9p" in message
    assert "linux-image-amd64" in message and "HPP_VMKIT_KERNEL" in message


def test_the_override_is_used_as_given_and_checked(tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    boot, modules = tree
    fake_kernel(boot, modules, "6.1.0-9-amd64")
    fake_kernel(boot, modules, "6.1.0-57-amd64")
    fake_kernel(boot, modules, "6.1.0-58-amd64", config="# CONFIG_XFS_QUOTA is not set\n")
    assert vmkit.find_kernel(boot, modules, override="6.1.0-9-amd64").release == "6.1.0-9-amd64"
    monkeypatch.setenv("HPP_VMKIT_KERNEL", str(boot / "vmlinuz-6.1.0-9-amd64"))
    assert vmkit.find_kernel(boot, modules).image == boot / "vmlinuz-6.1.0-9-amd64"
    with pytest.raises(vmkit.VMUnavailable, match=r"HPP_VMKIT_KERNEL=6\.1\.0-58-amd64 cannot be used: .*lacks CONFIG"):
        vmkit.find_kernel(boot, modules, override="6.1.0-58-amd64")
    with pytest.raises(vmkit.VMUnavailable, match=r"vmlinuz-7\.0-amd64 missing"):
        vmkit.find_kernel(boot, modules, override="7.0-amd64")


@pytest.mark.parametrize("compress", ["", ".xz", ".gz"])
def test_the_initramfs_holds_plain_modules_in_load_order(tree: tuple[Path, Path], tmp_path: Path,
                                                         compress: str) -> None:
    """Compressed modules (Debian trixie ships .ko.xz) are unpacked; built-in ones are not looked for."""
    boot, modules = tree
    fake_kernel(boot, modules, "6.12.9-amd64", compress=compress, builtin=("crc32c_generic", "loop"))
    kernel = vmkit.find_kernel(boot, modules, override="")
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"busybox")
    archive = vmkit.build_initramfs(kernel, busybox)
    out = tmp_path / "unpacked"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], input=archive, cwd=out, check=True)
    order = (out / "modules.order").read_text().split()
    assert order == ["virtio_pci.ko", "9pnet.ko", "9pnet_virtio.ko", "netfs.ko", "9p.ko", "libcrc32c.ko", "xfs.ko"]
    assert (out / "lib/modules/xfs.ko").read_bytes() == b"ELF of kernel/fs/xfs/xfs.ko"
    assert (out / "bin/busybox").read_bytes() == b"busybox"


def test_the_machines_own_kernel_is_found() -> None:
    """The kernel scripts/install-system-deps.sh installed fits, whatever its release (the quota VM tests boot it)."""
    kernel = vmkit.find_kernel()
    assert kernel.image.is_file() and (kernel.moddir / "modules.dep").is_file()

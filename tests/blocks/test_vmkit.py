"""The VM harness's pure parts: module ordering, the initramfs archive format, console parsing."""

from __future__ import annotations

import subprocess

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

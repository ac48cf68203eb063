"""`hpp-csi ctl` end to end: a person on the node drives the real driver through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest
from drivertools import HPP_CSI, NODE_ID, Driver, MiB, is_mounted

pytestmark = pytest.mark.timeout(60)


def ctl(driver: Driver, *args: str, expect: int = 0) -> Any:
    result = subprocess.run([HPP_CSI, "ctl", "--endpoint", driver.endpoint, "--json", *args],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == expect, result.stderr
    return json.loads(result.stdout) if expect == 0 else result.stderr


def test_lifecycle(driver: Driver) -> None:
    target = str(driver.new_target())
    created = ctl(driver, "create", "ctl-vol", "--size", "2Mi", "--pool", "fast")
    assert created["volume_id"] == "ctl-vol" and int(created["capacity_bytes"]) == 2 * MiB
    assert created["volume_context"]["storagePool"] == "fast"

    [row] = [r for r in ctl(driver, "list") if r["volume_id"] == "ctl-vol"]
    assert row == {"volume_id": "ctl-vol", "capacity": 2 * MiB, "pool": "fast", "published": [], "abnormal": False,
                   "condition": row["condition"]}

    assert ctl(driver, "publish", "ctl-vol", target, "--flag", "noexec") == {
        "published": "ctl-vol", "target": target, "readonly": False}
    assert is_mounted(target)
    with open(os.path.join(target, "blob"), "wb") as f:
        f.write(b"\1" * MiB)
    [row] = [r for r in ctl(driver, "list") if r["volume_id"] == "ctl-vol"]
    assert row["published"] == [NODE_ID]

    stats = ctl(driver, "stats", "ctl-vol", target)
    assert stats["volume_id"] == "ctl-vol" and not stats["abnormal"]
    assert int(stats["bytes"]["total"]) == 2 * MiB and int(stats["bytes"]["used"]) >= MiB
    assert int(stats["inodes"]["used"]) >= 2

    assert ctl(driver, "unpublish", "ctl-vol", target) == {"unpublished": "ctl-vol", "target": target}
    assert not os.path.exists(target)
    assert ctl(driver, "delete", "ctl-vol") == {"deleted": "ctl-vol"}
    assert "ctl-vol" not in [r["volume_id"] for r in ctl(driver, "list")]


def test_info_and_capacity(driver: Driver) -> None:
    info = ctl(driver, "info")
    assert info["plugin"]["name"] == "kubevirt.io.hostpath-provisioner" and info["ready"] is True
    assert info["node"]["node_id"] == NODE_ID
    assert "CREATE_DELETE_VOLUME" in info["controller_capabilities"]
    capacity = ctl(driver, "capacity", "--pool", "fast")
    assert 0 < capacity["available_bytes"] <= 64 * MiB


def test_errors_are_reported(driver: Driver) -> None:
    stderr = ctl(driver, "create", "ctl-bad", "--pool", "nosuchpool", expect=1)
    assert "INVALID_ARGUMENT" in stderr and "nosuchpool" in stderr
    stderr = ctl(driver, "stats", "ctl-missing", "/nonexistent", expect=1)
    assert "NOT_FOUND" in stderr


def test_text_output(driver: Driver) -> None:
    driver.create("ctl-text", MiB)
    result = subprocess.run([HPP_CSI, "ctl", "--endpoint", driver.endpoint, "list"],
                            capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout.startswith("VOLUME") and "ctl-text" in result.stdout and "1.0 MiB" in result.stdout
    driver.delete("ctl-text")

"""Builds qemu-img command lines and parses its JSON; running them is the caller's business."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from importer.errors import InvalidImage

_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


@dataclass(frozen=True)
class ImageInfo:
    """What `qemu-img info` reports that the validation needs."""

    format: str
    virtual_size: int
    actual_size: int | None
    backing_file: str | None
    data_file: str | None
    encrypted: bool


def info_command(source: str, fmt: str) -> list[str]:
    # -f is always given: letting qemu probe would let a raw image that starts like qcow2 pick its own driver.
    return ["qemu-img", "info", "--output=json", "-f", fmt, source]


def check_command(source: str, fmt: str) -> list[str]:
    return ["qemu-img", "check", "--output=json", "-f", fmt, source]


# `qemu-img check` exit statuses (see its man page).
CHECK_OK, CHECK_FAILED, CHECK_CORRUPT, CHECK_LEAKS, CHECK_UNSUPPORTED = 0, 1, 2, 3, 63


def check_problem(returncode: int, stdout: str, stderr: str) -> str | None:
    """Why `qemu-img check` says the image must not be converted, or None (leaked clusters are harmless)."""
    if returncode in (CHECK_OK, CHECK_LEAKS, CHECK_UNSUPPORTED):
        return None
    if returncode == CHECK_CORRUPT:
        try:
            count = json.loads(stdout).get("corruptions", "some")
        except ValueError:
            count = "some"
        return f"{count} corruptions (truncated or damaged image)"
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else f"qemu-img check exited with {returncode}"


def parse_info(text: str) -> ImageInfo:
    try:
        data: dict[str, Any] = json.loads(text)
        fmt_specific = data.get("format-specific", {}).get("data", {})
        return ImageInfo(
            format=str(data["format"]),
            virtual_size=int(data["virtual-size"]),
            actual_size=int(data["actual-size"]) if "actual-size" in data else None,
            backing_file=data.get("backing-filename") or data.get("full-backing-filename"),
            data_file=fmt_specific.get("data-file") if isinstance(fmt_specific, dict) else None,
            encrypted=bool(data.get("encrypted", False)),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise InvalidImage(f"qemu-img info returned unreadable output: {err}") from err


def convert_command(
    source: str,
    source_format: str,
    dest: str,
    *,
    preallocation: str | None,
    dest_is_block: bool,
) -> list[str]:
    """qemu-img convert to raw, syncing at the end (its default cache mode, unsafe, never does)."""
    cmd = ["qemu-img", "convert", "-p", "-f", source_format, "-O", "raw", "-t", "writeback", "-W"]
    if dest_is_block:
        cmd.append("-n")  # the device exists; do not try to create it
    elif preallocation:
        cmd += ["-o", f"preallocation={preallocation}"]
    return [*cmd, source, dest]


def parse_progress(output: bytes) -> float | None:
    """The last percentage in a chunk of `qemu-img convert -p` output, e.g. b'    (42.00/100%)\\r'."""
    matches = _PROGRESS.findall(output)
    return float(matches[-1]) if matches else None

"""Validation of what callers name: volume IDs become directory names, targets become mount points."""

from __future__ import annotations

import os
import re

from hpp_csi.errors import invalid_argument

MAX_ID_BYTES = 128  # CSI's limit on names and IDs
RESERVED_NAMES = frozenset({"lost+found", "csi"})
# CSI bans control characters other than common whitespace; a file name also cannot hold '/' or NUL.
_BANNED = re.compile(r"[\x00-\x1f\x7f-\x9f/]")


def require(value: str, field: str) -> str:
    if not value:
        raise invalid_argument(f"{field} is required")
    return value


def volume_id(value: str, field: str = "volume_id") -> str:
    """Check an ID or name that will name an entry in a pool; return it unchanged."""
    if not value:
        raise invalid_argument(f"{field} is required")
    if len(value.encode()) > MAX_ID_BYTES:
        raise invalid_argument(f"{field} is longer than {MAX_ID_BYTES} bytes")
    if _BANNED.search(value):
        raise invalid_argument(f"{field} {value!r} contains '/' or a control character")
    if value.startswith("."):
        raise invalid_argument(f"{field} {value!r} starts with '.', which is reserved for the driver's own files")
    if value in RESERVED_NAMES:
        raise invalid_argument(f"{field} {value!r} is reserved")
    return value


def target_path(value: str, field: str = "target_path") -> str:
    """Check a path the node service will create and mount on: absolute, normalised, no '..'."""
    if not value:
        raise invalid_argument(f"{field} is required")
    if "\x00" in value:
        raise invalid_argument(f"{field} contains a NUL byte")
    if not os.path.isabs(value):
        raise invalid_argument(f"{field} {value!r} must be an absolute path")
    if ".." in value.split("/"):
        raise invalid_argument(f"{field} {value!r} must not contain '..'")
    if len(value.encode()) > 4096:
        raise invalid_argument(f"{field} is longer than 4096 bytes")
    normalised = os.path.normpath(value)
    if normalised == "/":
        raise invalid_argument(f"{field} must not be /")
    return normalised

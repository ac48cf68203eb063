"""Kubernetes resource quantities and byte-size helpers."""

from __future__ import annotations

import re

from hpp_csi.quantity import GiB, KiB, MiB, QuantityError, human, parse_bytes
from importer.errors import ConfigError

__all__ = ["GiB", "KiB", "MiB", "human", "parse_duration", "parse_quantity", "round_down"]

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")


def parse_quantity(text: str) -> int:
    """Bytes in a Kubernetes quantity, as an importer configuration error when it is not one."""
    try:
        return parse_bytes(text)
    except QuantityError as err:
        raise ConfigError(str(err)) from err


def round_down(value: int, alignment: int) -> int:
    """The largest multiple of alignment not above value."""
    return value - value % alignment


def parse_duration(text: str, name: str) -> float:
    """Seconds in `90`, `1.5`, `60s`, `2m`, `1h30m` or `500ms` (Go's duration units, which CDI's users know)."""
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        parts = _DURATION.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise ConfigError(f"invalid {name} {text!r}: expected seconds or a duration such as 60s, 2m, 1h30m") \
                from None
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
        seconds = sum(float(number) * scale[unit] for number, unit in parts)
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ConfigError(f"invalid {name} {text!r}: expected a finite, non-negative duration")
    return seconds

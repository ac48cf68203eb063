"""Kubernetes resource quantities and byte-size helpers."""

from __future__ import annotations

from hpp_csi.quantity import GiB, KiB, MiB, QuantityError, human, parse_bytes
from importer.errors import ConfigError

__all__ = ["GiB", "KiB", "MiB", "human", "parse_quantity", "round_down"]


def parse_quantity(text: str) -> int:
    """Bytes in a Kubernetes quantity, as an importer configuration error when it is not one."""
    try:
        return parse_bytes(text)
    except QuantityError as err:
        raise ConfigError(str(err)) from err


def round_down(value: int, alignment: int) -> int:
    """The largest multiple of alignment not above value."""
    return value - value % alignment

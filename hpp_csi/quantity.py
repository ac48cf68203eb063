"""Kubernetes resource quantities ("5Gi", "500M", "1e3") as whole bytes, and sizes for people to read.

One implementation for the driver (pool sizes, pvcTemplate storage, `ctl create --size`) and the importer
(IMPORTER_IMAGE_SIZE).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
            "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12),
            "P": Decimal(10**15), "E": Decimal(10**18)}
MAX_BYTES = 2**63 - 1  # Kubernetes' Quantity.Value() is an int64; larger numbers are refused, not rounded
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]?)$")


class QuantityError(ValueError):
    """Not a quantity; the message quotes the text and shows the expected form."""


def parse_bytes(text: str | int) -> int:
    """Bytes in a quantity ("10Gi", "1.5G", "64M", "1e9"), rounded up like Kubernetes' Quantity.Value()."""
    if isinstance(text, int):
        if not 0 <= text <= MAX_BYTES:
            raise QuantityError(f"invalid quantity {text}: must be between 0 and {MAX_BYTES}")
        return text
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise QuantityError(
            f"invalid quantity {text!r}: expected a number with an optional suffix such as Mi or Gi"
        )
    number, suffix = match.groups()
    try:
        value = Decimal(number)
        if suffix in _BINARY:
            value *= _BINARY[suffix]
        elif suffix[:1] in "eE" and len(suffix) > 1:  # "E" alone is exa, not an exponent
            value *= Decimal(10) ** int(suffix[1:])
        else:
            value *= _DECIMAL[suffix]
    # ArithmeticError: decimal overflow ("1e9999999"); ValueError: an exponent beyond int()'s digit limit.
    except (ArithmeticError, ValueError, KeyError) as err:
        raise QuantityError(f"invalid quantity {text!r}") from err
    if value < 0:
        raise QuantityError(f"invalid quantity {text!r}: must not be negative")
    if value > MAX_BYTES:
        raise QuantityError(f"invalid quantity {text!r}: larger than {MAX_BYTES} bytes")
    return math.ceil(value)


def human(size: int) -> str:
    """A short human form for progress lines, summaries and tables (messages keep exact byte counts)."""
    for unit, factor in (("TiB", 1024 * GiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"

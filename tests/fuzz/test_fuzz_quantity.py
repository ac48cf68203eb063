"""Kubernetes quantities (hpp_csi/quantity.py): pool sizes, pvcTemplate storage, IMPORTER_IMAGE_SIZE come from
users; any text gives bytes or a QuantityError, and numbers we write parse back to themselves."""

from __future__ import annotations

import math
from fractions import Fraction

from fuzzkit import fuzz
from hypothesis import example, given
from hypothesis import strategies as st

from hpp_csi.quantity import QuantityError, human, parse_bytes

BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
DECIMAL = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
FRACTIONAL = {"m": Fraction(1, 10**3), "u": Fraction(1, 10**6), "n": Fraction(1, 10**9)}
HUMAN_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
MAX_INT64 = 2**63 - 1

# Text that looks like a quantity often enough to reach past the regular expression.
quantity_like = st.from_regex(r"\A[ +-]?[0-9.]{0,30}([eE][+-]?[0-9]{1,12}|Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?\s?\Z")


def check(text: str) -> None:
    try:
        value = parse_bytes(text)
    except QuantityError:
        return
    assert isinstance(value, int) and 0 <= value <= MAX_INT64, (text, value)


@fuzz(400)
@given(st.one_of(st.text(max_size=40), quantity_like))
@example("1e9999999")  # decimal overflow
@example("1e5000")  # beyond Python's int-from-string digit limit
@example("9" * 5000)
@example("1e" + "9" * 5000)
def test_any_text_is_bytes_or_a_quantity_error(text: str) -> None:
    check(text)


FACTORS = BINARY | DECIMAL
# A suffix and a whole number small enough that the bytes fit in an int64.
suffixed = st.sampled_from(sorted(FACTORS)).flatmap(
    lambda s: st.tuples(st.integers(0, MAX_INT64 // FACTORS[s]), st.just(s)))


@fuzz(300)
@given(suffixed)
@example((0, "E"))  # "E" alone is exa, not an exponent
@example((8, "E"))
def test_whole_numbers_with_a_suffix_parse_exactly(case: tuple[int, str]) -> None:
    number, suffix = case
    assert parse_bytes(f"{number}{suffix}") == number * FACTORS[suffix]


@fuzz(200)
@given(st.integers(0, 10**12), st.sampled_from(sorted(FRACTIONAL)))
def test_fractional_suffixes_round_up_like_kubernetes(number: int, suffix: str) -> None:
    assert parse_bytes(f"{number}{suffix}") == math.ceil(number * FRACTIONAL[suffix])


@fuzz(200)
@given(st.integers(0, 10**15), st.integers(0, 3))
def test_exponents_and_decimals(mantissa: int, exponent: int) -> None:
    assert parse_bytes(f"{mantissa}e{exponent}") == mantissa * 10**exponent
    assert parse_bytes(f"{mantissa}.5") == mantissa + 1  # rounded up


@fuzz(300)
@given(st.integers(0, 2**50))
def test_human_sizes_parse_back_to_about_the_same_bytes(size: int) -> None:
    text = human(size)
    number, unit = text.split(" ")
    factor = HUMAN_UNITS[unit]
    quantity = number if unit == "B" else f"{number}{unit[:-1]}"  # "1.5 GiB" is the quantity "1.5Gi"
    parsed = parse_bytes(quantity)
    assert abs(parsed - size) <= factor // 20 + 1, (size, text, parsed)  # one decimal: within 0.05 of a unit


@fuzz(100)
@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_integers_pass_through_or_are_refused_out_of_range(value: int) -> None:
    if not 0 <= value <= MAX_INT64:
        try:
            parse_bytes(value)
        except QuantityError:
            return
        raise AssertionError(f"{value} was accepted")
    assert parse_bytes(value) == value

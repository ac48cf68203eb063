"""Hypothesis settings shared by the fuzz tests: bounded and deterministic in `make test`, larger in `make soak`.

HPP_FUZZ_SCALE multiplies every test's example count (`make soak` sets it); the default keeps each test to a
few seconds. derandomize makes CI runs repeatable; no example database is written into the tree.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings

SCALE = max(1, int(os.environ.get("HPP_FUZZ_SCALE", "1")))
F = TypeVar("F", bound=Callable[..., Any])


def fuzz(examples: int) -> Callable[[F], F]:
    """Settings for one property: `examples` inputs (times HPP_FUZZ_SCALE), no deadline, fixed seed."""
    applied: Callable[[F], F] = settings(
        max_examples=examples * SCALE,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    return applied

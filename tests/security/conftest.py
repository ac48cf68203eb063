"""One real driver per test module, and a victim tree outside its pool that every test must leave untouched."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from drivertools import Driver, running

from .nodekit import make_victim


@pytest.fixture(scope="module")
def driver() -> Iterator[Driver]:
    with running(Driver()) as proc:
        yield proc


@pytest.fixture(scope="module")
def victim(driver: Driver) -> Path:
    return make_victim(driver.root)

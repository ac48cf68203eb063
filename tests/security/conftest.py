"""One real driver per test module, and a victim tree outside its pool that every test must leave untouched."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from drivertools import Driver, running, unmount_under

from .nodekit import make_victim


@pytest.fixture(scope="module")
def driver() -> Iterator[Driver]:
    with running(Driver()) as proc:
        yield proc


@pytest.fixture(scope="module")
def victim(driver: Driver) -> Path:
    return make_victim(driver.root)


@pytest.fixture
def target(driver: Driver) -> Iterator[Path]:
    """A fresh publish target; whatever a test left mounted under it is unmounted, and it is removed."""
    path = driver.new_target()
    yield path
    unmount_under(path.parent)
    shutil.rmtree(path.parent, ignore_errors=True)

"""Fixtures: a real driver over a loop-file pool per module, fresh ones on demand, loop devices we attach
ourselves; every mount, loop device, process and file is undone at teardown, failed tests included."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from drivertools import drivers, loops_backing, running

from hpp_csi.linux import loop

from .poolkit import PoolDriver

# Where the VM test ran, shown at the end of the run even with -q.
VM_NOTES: list[str] = []


@pytest.fixture(scope="module")
def driver() -> Iterator[PoolDriver]:
    """A driver serving pool `legacy`: XFS on a sparse 4 GiB file, mounted at <root>/pool/csi."""
    with running(PoolDriver()) as proc:
        yield proc


@pytest.fixture
def spawn() -> Iterator[Callable[..., PoolDriver]]:
    """Drivers with a root of their own (not started); all stopped and undone afterwards."""
    with drivers(PoolDriver) as make:
        yield make


class LoopTracker:
    """Loop devices a test attaches itself; exactly those are detached afterwards."""

    def __init__(self) -> None:
        self.devices: list[tuple[str, Path]] = []

    def attach(self, backing: Path) -> str:
        device = loop.attach(backing).path
        self.devices.append((device, backing))
        return device

    def cleanup(self) -> None:
        for device, backing in reversed(self.devices):
            # Only while it still backs our file: once freed, the number may be someone else's device.
            if device in loops_backing(backing):
                with contextlib.suppress(OSError):
                    loop.detach(device)


@pytest.fixture
def loops() -> Iterator[LoopTracker]:
    tracker = LoopTracker()
    yield tracker
    tracker.cleanup()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for note in VM_NOTES:
        terminalreporter.write_line(note)

"""GroupCommit: concurrent changes share one flush, no caller returns before a flush that started after its
change completed, and a failed flush fails every caller it was to cover. Flushes are real fsyncs of a folder."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hpp_csi.storage.group_commit import FlushFailed, GroupCommit

WAIT = 10.0  # seconds any step may take before the test fails instead of hanging


class Folder:
    """A folder whose flush is a real fsync, counted, and that can be held (to line callers up) or failed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fsyncs = 0
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        self.fail_on: set[int] = set()  # numbers (from 1) of the flushes that fail with EIO
        self.calls = 0
        self.seen_at_start: list[set[str]] = []  # the folder's entries when each flush began

    def flush(self) -> None:
        self.calls += 1
        self.seen_at_start.append(set(os.listdir(self.path)))
        self.entered.set()
        assert self.hold.wait(WAIT), "the test never released the flush"
        if self.calls in self.fail_on:
            raise OSError(errno.EIO, "Input/output error")
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
            self.fsyncs += 1
        finally:
            os.close(fd)

    def change(self, name: str) -> None:
        """A change to the folder (a new entry), not yet durable."""
        os.close(os.open(self.path / name, os.O_WRONLY | os.O_CREAT, 0o600))

    def change_then_commit(self, commits: GroupCommit) -> Callable[[int], None]:
        def call(i: int) -> None:
            self.change(f"v{i}")
            commits.wait_durable()

        return call


def run_threads(count: int, target: Callable[[int], None]) -> list[BaseException | None]:
    outcomes: list[BaseException | None] = [None] * count

    def run(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads), "a caller never returned"
    return outcomes


def line_up(folder: Folder, commits: GroupCommit) -> threading.Thread:
    """Start one flush and hold it there (callers then queue behind it); returns the thread that started it."""
    folder.hold.clear()
    first = threading.Thread(target=commits.wait_durable)
    first.start()
    assert folder.entered.wait(WAIT)
    return first


def waiting(commits: GroupCommit) -> int:
    with commits._cond:
        return len(commits._cond._waiters)  # type: ignore[attr-defined]


def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_eight_concurrent_changes_cost_one_flush(tmp_path: Path) -> None:
    folder = Folder(tmp_path)
    commits = GroupCommit(folder.flush, "test folder")
    first = line_up(folder, commits)  # a flush already running started before the 8 changes: covers none
    callers = threading.Thread(target=lambda: run_threads(8, folder.change_then_commit(commits)))
    callers.start()
    until(lambda: waiting(commits) == 8)
    folder.hold.set()
    callers.join(WAIT)
    first.join(WAIT)
    assert not callers.is_alive() and not first.is_alive()
    assert folder.fsyncs == 2  # the running one, and one for all eight
    assert {f"v{i}" for i in range(8)} <= folder.seen_at_start[1]  # it began after every change was made
    assert commits.flushes == 2


def test_no_caller_returns_before_a_flush_that_started_after_its_change(tmp_path: Path) -> None:
    folder = Folder(tmp_path)
    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    flush_number = 0

    def flush() -> None:
        nonlocal flush_number
        with lock:
            flush_number += 1
            number = flush_number
            events.append(("start", number))
        folder.flush()
        time.sleep(0.002)  # a flush takes time: callers pile up behind it
        with lock:
            events.append(("end", number))

    commits = GroupCommit(flush, "test folder")

    def caller(i: int) -> None:
        for n in range(15):
            with lock:
                events.append(("change", i * 100 + n))
            commits.wait_durable()
            with lock:
                events.append(("return", i * 100 + n))

    assert run_threads(16, caller) == [None] * 16
    at = {event: index for index, event in enumerate(events)}
    starts = {n: i for (kind, n), i in at.items() if kind == "start"}
    ends = {n: i for (kind, n), i in at.items() if kind == "end"}
    for (kind, call), index in at.items():
        if kind != "change":
            continue
        returned = at[("return", call)]
        covering = [n for n in starts if starts[n] > index and n in ends and ends[n] < returned]
        assert covering, f"call {call} returned without a flush that began after its change"
    calls = 16 * 15
    assert len(starts) < calls / 2, f"{len(starts)} flushes for {calls} calls: not shared"


def test_a_failed_flush_fails_every_caller_it_covered_and_a_retry_succeeds(tmp_path: Path) -> None:
    folder = Folder(tmp_path)
    folder.fail_on = {2}  # the running flush succeeds; the next one, which covers the eight, fails
    commits = GroupCommit(folder.flush, "pool 'x' records")
    first = line_up(folder, commits)
    outcomes: list[BaseException | None] = []
    callers = threading.Thread(target=lambda: outcomes.extend(run_threads(8, folder.change_then_commit(commits))))
    callers.start()
    until(lambda: waiting(commits) == 8)
    folder.hold.set()
    first.join(WAIT)
    callers.join(WAIT)
    assert len(outcomes) == 8
    for outcome in outcomes:
        assert isinstance(outcome, FlushFailed), outcome
        assert "flushing pool 'x' records failed (Input/output error)" in str(outcome)
        assert "may not be on disk" in str(outcome)
        assert isinstance(outcome.__cause__, OSError) and outcome.__cause__.errno == errno.EIO
    assert folder.fsyncs == 1
    commits.wait_durable()  # the retry: a new flush, which succeeds
    assert folder.fsyncs == 2


def test_a_hung_flush_times_out_the_callers_behind_it(tmp_path: Path) -> None:
    folder = Folder(tmp_path)
    commits = GroupCommit(folder.flush, "stuck folder", timeout=0.2)
    first = line_up(folder, commits)
    started = time.monotonic()
    with pytest.raises(FlushFailed, match="flushing stuck folder took more than 0 s"):
        commits.wait_durable()
    assert 0.15 < time.monotonic() - started < 5
    folder.hold.set()
    first.join(WAIT)
    commits.wait_durable()  # the folder recovered: calls go through again

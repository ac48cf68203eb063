"""The CSI call pool: few threads for short calls, more only when calls wait, fewer again when idle."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import pytest

from hpp_csi.config import parse_datadir
from hpp_csi.csi.call_pool import CORE, CallPool
from hpp_csi.csi.identity import IdentityService
from hpp_csi.server import Driver, DriverOptions
from hpp_csi.spec import csi_pb2 as csi
from hpp_csi.spec import csi_pb2_grpc as csi_grpc


def wait_until(check: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_results_and_errors_reach_the_future() -> None:
    pool = CallPool(maximum=4, core=2)
    try:
        assert pool.submit(lambda a, b=0: a + b, 2, b=3).result(5) == 5
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 // 0).result(5)
    finally:
        pool.shutdown()


def test_short_calls_never_start_more_than_the_core() -> None:
    pool = CallPool(maximum=16, core=2, patience=5.0)
    try:
        results = [pool.submit(time.sleep, 0.002) for _ in range(200)]
        for future in results:
            future.result(10)
        assert pool.threads == 2
        assert pool._started == 2
    finally:
        pool.shutdown()


def test_a_call_stuck_behind_long_calls_starts_a_thread_then_the_extra_leaves() -> None:
    pool = CallPool(maximum=3, core=2, patience=0.05, linger=0.2)
    release = threading.Event()
    try:
        held = [pool.submit(release.wait, 30) for _ in range(2)]
        started = time.monotonic()
        assert pool.submit(lambda: "probe").result(5) == "probe"
        assert time.monotonic() - started < 2.0
        assert pool.threads == 3
        # The extra thread takes a third long call; at the maximum, the next call waits for a thread.
        held.append(pool.submit(release.wait, 30))
        late = pool.submit(lambda: "late")
        time.sleep(0.3)
        assert not late.done()
        release.set()
        assert late.result(5) == "late"
        assert all(future.result(5) for future in held)
        wait_until(lambda: pool.threads == 2)  # the extra thread lingered 0.2 s, then left
    finally:
        release.set()
        pool.shutdown()


def test_shutdown_refuses_new_calls_and_lets_threads_end() -> None:
    pool = CallPool(maximum=4, core=2)
    assert pool.submit(lambda: 1).result(5) == 1
    pool.shutdown(wait=True)
    assert pool.threads == 0
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(lambda: 1)


def test_cancelled_calls_are_skipped() -> None:
    pool = CallPool(maximum=1, core=1, patience=30)
    release = threading.Event()
    try:
        first = pool.submit(release.wait, 30)
        second = pool.submit(lambda: "never")
        assert second.cancel()
        release.set()
        assert first.result(5)
        third = pool.submit(lambda: "after")
        assert third.result(5) == "after"
        assert second.cancelled()
    finally:
        release.set()
        pool.shutdown()


def test_a_probe_is_answered_while_long_calls_hold_every_core_thread(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Through real gRPC on a unix socket, the driver in-process: GetPluginInfo is made slow on purpose (it stands
    for a long call: a full copy, a slow mount), 4 of them hold the 4 core threads, and a Probe still answers."""
    release = threading.Event()
    real = IdentityService.GetPluginInfo

    def slow(self: IdentityService, request: csi.GetPluginInfoRequest,
             context: grpc.ServicerContext) -> csi.GetPluginInfoResponse:
        release.wait(30)
        return real(self, request, context)

    monkeypatch.setattr(IdentityService, "GetPluginInfo", slow)
    pools = parse_datadir(json.dumps([{"name": "legacy", "path": str(tmp_path / "pool")}]))
    driver = Driver(DriverOptions(node_id="n", endpoint=f"unix://{tmp_path}/csi.sock", pools=pools))
    driver.start()
    channel = grpc.insecure_channel(f"unix://{tmp_path}/csi.sock")
    identity = csi_grpc.IdentityStub(channel)
    try:
        held = [identity.GetPluginInfo.future(csi.GetPluginInfoRequest(), timeout=30) for _ in range(CORE)]
        wait_until(lambda: driver.in_flight.count == CORE)
        started = time.monotonic()
        assert identity.Probe(csi.ProbeRequest(), timeout=5).ready.value
        assert time.monotonic() - started < 2.0
        assert driver._pool is not None and driver._pool.threads == CORE + 1
        release.set()
        assert all(future.result(10).name for future in held)
    finally:
        release.set()
        channel.close()
        driver.stop(5)

"""Health, reflection, Prometheus metrics and JSON logs of a running driver."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest
from csikit import free_port
from drivertools import Driver, MiB, make_root, mount, remove_root, rpc_error
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hpp_csi.spec import csi_pb2 as csi

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def observed() -> Iterator[Driver]:
    """A driver with metrics on, JSON logs, a pool on the OS disk and one on its own tmpfs."""
    root = make_root()
    try:
        (root / "own-fs").mkdir()
        mount(["-t", "tmpfs", "-o", "size=16m", "tmpfs", str(root / "own-fs")])
    except BaseException:
        remove_root(root)
        raise
    proc = Driver(
        root,
        pools=[{"name": "legacy", "path": str(root / "pool")}, {"name": "own", "path": str(root / "own-fs")}],
        global_args=["--log-format", "json", "-v", "5"],
        extra=["--metrics-address", f"127.0.0.1:{free_port()}"],
    )
    try:
        yield proc.start()
    finally:
        proc.shutdown()


def scrape(proc: Driver) -> str:
    address = proc.extra[proc.extra.index("--metrics-address") + 1]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text: str = reply.read().decode()
        return text


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample, whatever the order of its labels."""
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:]+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


def test_health_serving(observed: Driver) -> None:
    stub = health_pb2_grpc.HealthStub(observed.channel)
    for service in ("", "csi.v1.Identity", "csi.v1.Controller", "csi.v1.Node"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    with rpc_error(grpc.StatusCode.NOT_FOUND):
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)


def test_reflection_lists_csi_services(observed: Driver) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(observed.channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"csi.v1.Identity", "csi.v1.Controller", "csi.v1.Node", "grpc.health.v1.Health"} <= names


def test_pool_metrics(observed: Driver) -> None:
    text = scrape(observed)
    assert sample(text, "kubevirt_hpp_pool_path_shared_with_os", pool="legacy") == 1.0  # /tmp is on /
    assert sample(text, "kubevirt_hpp_pool_path_shared_with_os", pool="own") == 0.0
    assert sample(text, "hpp_csi_pool_capacity_bytes", pool="own") == 16 * MiB


def test_rpc_metrics_after_calls(observed: Driver) -> None:
    for _ in range(3):
        observed.identity.GetPluginInfo(csi.GetPluginInfoRequest())
    with rpc_error(grpc.StatusCode.INVALID_ARGUMENT):
        observed.controller.DeleteVolume(csi.DeleteVolumeRequest())
    text = scrape(observed)
    assert sample(text, "hpp_csi_rpc_total", method="GetPluginInfo", code="OK") >= 3
    assert sample(text, "hpp_csi_rpc_total", method="DeleteVolume", code="INVALID_ARGUMENT") >= 1
    assert sample(text, "hpp_csi_rpc_errors_total", method="DeleteVolume", code="INVALID_ARGUMENT") >= 1
    assert sample(text, "hpp_csi_rpc_duration_seconds_count", method="GetPluginInfo") >= 3
    assert sample(text, "hpp_csi_rpc_duration_seconds_bucket", method="GetPluginInfo", le="+Inf") >= 3


def test_volume_count_metric(observed: Driver) -> None:
    before = sample(scrape(observed), "hpp_csi_pool_volumes", pool="own")
    observed.create("counted", MiB, pool="own")
    assert sample(scrape(observed), "hpp_csi_pool_volumes", pool="own") == before + 1
    observed.delete("counted")


def test_json_logs(observed: Driver) -> None:
    observed.identity.Probe(csi.ProbeRequest())
    with rpc_error(grpc.StatusCode.NOT_FOUND):
        observed.controller.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id="missing-volume"))
    lines = [line for line in observed.log().splitlines() if line.strip()]
    assert lines
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "msg"} <= entry.keys() for entry in entries)
    assert any("serving" in entry["msg"] for entry in entries)
    assert any("missing-volume" in entry["msg"] and "NOT_FOUND" in entry["msg"] for entry in entries)


def test_metrics_off_by_default(fresh: Driver) -> None:
    assert "--metrics-address" not in fresh.command()
    assert "metrics on" not in fresh.log()


@pytest.mark.parametrize("busy", [True, False], ids=["port-in-use", "bad-address"])
def test_metrics_address_unusable(spawn: Callable[..., Driver], busy: bool) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}" if busy else "no-port-here"
        proc = spawn(extra=["--metrics-address", address])
        assert proc.spawn().wait(15) == 2
    assert address in proc.log()
    assert not proc.socket.exists()  # nothing half-started is left behind

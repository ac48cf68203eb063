"""Prometheus metrics: per-pool capacity read at scrape time, per-RPC counts, errors and latency; the TLS pair
they are served with."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from hpp_csi.storage.pools import check_path_not_shared
from hpp_csi.storage.volumes import VolumeManager

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class PoolCollector(Collector):
    """Reads pool capacity when Prometheus scrapes, so the figures are never stale."""

    def __init__(self, manager: VolumeManager, host_root: Path = Path("/")) -> None:
        self.manager = manager
        self.shared_with_os = {name: check_path_not_shared(pool, host_root) for name, pool in manager.pools.items()}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        shared = GaugeMetricFamily(
            "kubevirt_hpp_pool_path_shared_with_os",
            "1 when the storage pool is on the same filesystem as the operating system",
            labels=["pool"],
        )
        total = GaugeMetricFamily("hpp_csi_pool_capacity_bytes", "Size of the pool's filesystem", labels=["pool"])
        available = GaugeMetricFamily("hpp_csi_pool_available_bytes", "Bytes available for new data", labels=["pool"])
        used = GaugeMetricFamily("hpp_csi_pool_used_bytes", "Bytes used on the pool's filesystem", labels=["pool"])
        volumes = GaugeMetricFamily("hpp_csi_pool_volumes", "Volumes in the pool", labels=["pool"])
        bad = GaugeMetricFamily(
            "hpp_csi_bad_entries",
            "Entries in a pool the driver did not write as they are (left alone; see the driver's log), by kind",
            labels=["pool", "kind"],
        )
        for (pool_name, kind), count in sorted(self.manager.bad_entries.counts().items()):
            bad.add_metric([pool_name, kind], count)
        counts = self.manager.count_by_pool()
        for name, pool in self.manager.pools.items():
            shared.add_metric([name], 1.0 if self.shared_with_os[name] else 0.0)
            volumes.add_metric([name], counts.get(name, 0))
            try:
                capacity = pool.capacity()
            except OSError:
                continue
            total.add_metric([name], capacity.total_bytes)
            available.add_metric([name], capacity.available_bytes)
            used.add_metric([name], capacity.used_bytes)
        yield from (shared, total, available, used, volumes, bad)


class DriverMetrics:
    """The driver's own registry (no process-global state), with the RPC instruments."""

    def __init__(self, manager: VolumeManager, host_root: Path = Path("/")) -> None:
        self.registry = CollectorRegistry()
        self.pools = PoolCollector(manager, host_root)
        self.registry.register(self.pools)
        self.rpc_total = Counter(
            "hpp_csi_rpc_total", "CSI calls served, by method and gRPC status code", ["method", "code"],
            registry=self.registry,
        )
        self.rpc_errors = Counter(
            "hpp_csi_rpc_errors_total", "CSI calls that ended with an error, by method and code", ["method", "code"],
            registry=self.registry,
        )
        self.rpc_latency = Histogram(
            "hpp_csi_rpc_duration_seconds", "Time to serve a CSI call", ["method"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

        # The labelled children of each (method, code), looked up once: labels() takes a lock and builds keys on
        # every call, a share of the per-call cost worth saving on the hot path.
        self._children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}

    def observe(self, method: str, code: str, seconds: float) -> None:
        children = self._children.get((method, code))
        if children is None:
            errors = self.rpc_errors.labels(method, code) if code != "OK" else None
            children = (self.rpc_total.labels(method, code), errors, self.rpc_latency.labels(method))
            self._children[(method, code)] = children
        total, errors, latency = children
        total.inc()
        if errors is not None:
            errors.inc()
        latency.observe(seconds)


def self_signed_hosts(node_id: str, listen_host: str, environ: Mapping[str, str]) -> list[str]:
    """Names the metrics' self-signed certificate answers to: the node, the pod (its hostname, and POD_IP as HPP
    reads it), loopback, and the listen address when it is a specific one."""
    hosts = [node_id, socket.gethostname(), environ.get("POD_IP", ""), "localhost", "127.0.0.1", "::1"]
    if listen_host not in ("", "0.0.0.0", "::"):
        hosts.append(listen_host)
    return list(dict.fromkeys(h.strip() for h in hosts if h.strip()))


@contextmanager
def tls_files(cert_file: Path | None, key_file: Path | None,
              self_signed_for: Sequence[str] | None) -> Iterator[tuple[str, str] | None]:
    """The (certificate, key) paths to load while the server starts: the given files; else, when `self_signed_for`
    names hosts, a pair made now, whose key is on disk only until the block ends; else None (plain HTTP)."""
    if cert_file is not None and key_file is not None:
        yield str(cert_file), str(key_file)
        return
    if not self_signed_for:
        yield None
        return
    from hpp_csi import tls_pair  # only when asked: cryptography's x509 costs ~30 ms at every start

    pair = tls_pair.self_signed(self_signed_for, common_name=self_signed_for[0])
    log.info("metrics: self-signed TLS certificate made for %s, SHA-256 fingerprint %s",
             ", ".join(self_signed_for), pair.fingerprint)
    with tls_pair.transient_files(pair) as (cert, key):
        yield str(cert), str(key)

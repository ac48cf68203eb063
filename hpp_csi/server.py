"""Wires the driver: pools, CSI services, health, reflection, metrics and the unix socket."""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from hpp_csi.config import ConfigError, PoolConfig
from hpp_csi.csi.call_pool import CORE, CallPool
from hpp_csi.csi.controller import ControllerService
from hpp_csi.csi.identity import IdentityService
from hpp_csi.csi.node import NodeService
from hpp_csi.csi.rpc import CsiInterceptor, InFlight
from hpp_csi.metrics import DriverMetrics, self_signed_hosts, tls_files
from hpp_csi.spec import csi_pb2
from hpp_csi.spec import csi_pb2_grpc as csi_grpc
from hpp_csi.storage import block_publish
from hpp_csi.storage.pools import StoragePool
from hpp_csi.storage.snapshots import SnapshotManager
from hpp_csi.storage.volumes import VolumeManager

log = logging.getLogger(__name__)

DEFAULT_DRIVER_NAME = "kubevirt.io.hostpath-provisioner"
CSI_SERVICES = ("Identity", "Controller", "Node")


class EndpointError(RuntimeError):
    """The socket cannot be served: wrong form, or another driver is listening on it."""


@dataclass(frozen=True)
class DriverOptions:
    node_id: str
    endpoint: str
    pools: list[PoolConfig]
    driver_name: str = DEFAULT_DRIVER_NAME
    version: str = "dev"
    metrics_address: str | None = None
    workers: int = 16  # threads serving calls at most
    core_workers: int = CORE  # threads that take every call; more start only for calls that waited
    advertise_get_snapshot: bool = False
    host_root: Path = Path("/")  # where the host's / is seen (the pool-shares-the-OS check)
    metrics_cert_file: Path | None = None  # with metrics_key_file: metrics over HTTPS
    metrics_key_file: Path | None = None
    metrics_tls: bool = False  # metrics over HTTPS even without files: a self-signed pair made at start


def socket_path(endpoint: str) -> Path:
    """`unix:///path`, `unix:/path` or a bare absolute path -> the socket's path."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:"):]
    elif endpoint.startswith("/"):
        path = endpoint
    else:
        raise EndpointError(f"endpoint {endpoint!r} must be unix:///path/to/csi.sock")
    # HPP reads unix://tmp/csi.sock as /tmp/csi.sock; accept the same spelling.
    return Path("/" + path.lstrip("/"))


def claim_socket(path: Path) -> None:
    """Remove a stale socket left by a dead driver; refuse a live one or anything that is not a socket."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(path):
        return
    if not path.is_socket():
        raise EndpointError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        log.info("removing stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise EndpointError(f"another process is serving {path}; stop it first")


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise EndpointError(f"metrics address {address!r} must be host:port or :port")
    return host or "0.0.0.0", int(port)


class Driver:
    """A running driver; `start()` then `stop()`."""

    def __init__(self, options: DriverOptions) -> None:
        self.options = options
        self.pools = [StoragePool(config) for config in options.pools]
        self.manager = VolumeManager(self.pools)
        self.snapshots = SnapshotManager(self.manager)
        self.metrics: DriverMetrics | None = None
        self.in_flight = InFlight()
        self.health = health.HealthServicer()
        self.socket = socket_path(options.endpoint)
        self._server: grpc.Server | None = None
        self._pool: CallPool | None = None
        self._metrics_server: Any = None
        self.stopped = threading.Event()

    def check_options(self) -> None:
        """Refuse, before anything is touched, options that would only fail later."""
        o = self.options
        if not o.host_root.is_dir():
            raise ConfigError(f"--host-root {o.host_root} is not a directory: mount the host's / there (read-only)")
        if (o.metrics_cert_file is None) != (o.metrics_key_file is None):
            raise ConfigError("--metrics-cert-file and --metrics-key-file go together: give both or neither")
        if o.metrics_cert_file is not None and not o.metrics_address:
            raise ConfigError("--metrics-cert-file needs --metrics-address (metrics are off without it)")
        if o.metrics_tls and not o.metrics_address:
            raise ConfigError("--metrics-tls needs --metrics-address (metrics are off without it)")

    def start(self) -> None:
        self.check_options()
        for pool in self.pools:
            pool.prepare()
        self.manager.load()
        self.snapshots.load()
        block_publish.detach_orphans([pool.volumes_dir for pool in self.pools])
        metrics = self.metrics = DriverMetrics(self.manager, self.options.host_root)
        claim_socket(self.socket)
        self._pool = CallPool(self.options.workers, core=self.options.core_workers)
        # grpc.server is typed for a ThreadPoolExecutor but calls only submit(), which any Executor has.
        server = grpc.server(cast(futures.ThreadPoolExecutor, self._pool),
                             interceptors=[CsiInterceptor(metrics, self.in_flight)])
        o = self.options
        csi_grpc.add_IdentityServicer_to_server(IdentityService(o.driver_name, o.version, self.manager), server)
        controller = ControllerService(self.manager, self.snapshots, o.node_id, o.advertise_get_snapshot)
        csi_grpc.add_ControllerServicer_to_server(controller, server)
        csi_grpc.add_NodeServicer_to_server(NodeService(self.manager, o.node_id), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [csi_pb2.DESCRIPTOR.services_by_name[s].full_name for s in CSI_SERVICES]
        for name in ("", *names):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._server = server
        if o.metrics_address:
            tls = o.metrics_cert_file is not None or o.metrics_tls
            try:
                host, port = split_address(o.metrics_address)
                self_signed = self_signed_hosts(o.node_id, host, os.environ) if o.metrics_tls else None
                with tls_files(o.metrics_cert_file, o.metrics_key_file, self_signed) as files:
                    self._metrics_server = start_http_server(
                        port, host, registry=metrics.registry,
                        certfile=files[0] if files else None, keyfile=files[1] if files else None,
                        tls_min_version=ssl.TLSVersion.TLSv1_2 if tls else None,
                    )
            except (OSError, EndpointError) as exc:  # ssl.SSLError is an OSError: a bad certificate or key
                self.stop(0)  # no half-started driver: the socket goes too
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                given = o.metrics_cert_file is not None
                what = f" with certificate {o.metrics_cert_file} and key {o.metrics_key_file}" if given else ""
                raise EndpointError(f"cannot serve metrics on {o.metrics_address!r}{what}: {reason}") from exc
            log.info("metrics on %s://%s:%d/metrics", "https" if tls else "http", host, port)
        log.info("%s %s serving %s on node %s with %d volume(s) in pools %s", o.driver_name, o.version, self.socket,
                 o.node_id, self.manager.count(), ", ".join(p.name for p in self.pools))
        bad = self.manager.bad_entries.all()
        if bad:
            log.warning("%d bad entr%s left alone in the pools (listed above, counted in hpp_csi_bad_entries)",
                        len(bad), "y" if len(bad) == 1 else "ies")

    def stop(self, grace: float = 30.0) -> None:
        """Stop taking calls, let in-flight calls finish (up to `grace` seconds), remove the socket."""
        if self._server is None:
            return
        self.health.enter_graceful_shutdown()
        log.info("stopping: waiting for %d call(s) in flight", self.in_flight.count)
        self._server.stop(grace).wait()
        self._server = None
        if self._pool is not None:
            self._pool.shutdown(wait=False)  # its threads are idle now, or held by calls the grace did not end
        if self._metrics_server is not None:
            http_server, _thread = self._metrics_server
            http_server.shutdown()
            self._metrics_server = None
        self.socket.unlink(missing_ok=True)
        for pool in self.pools:
            pool.store.close()
        self.stopped.set()
        log.info("stopped")

"""`hpp-csi`: serve the driver, talk to it (ctl), print the version."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
from pathlib import Path

from hpp_csi import ctl, logs
from hpp_csi.config import CR_VOLUMES_SUBDIR, ConfigError, PoolConfig, load_cr, parse_datadir
from hpp_csi.csi.call_pool import CORE
from hpp_csi.linux.xfs import CommandFailed, DeviceNotBlank
from hpp_csi.server import DEFAULT_DRIVER_NAME, Driver, DriverOptions, EndpointError
from hpp_csi.storage.pool_device import PoolDeviceError, mount_pool, unmount_pool
from hpp_csi.storage.pools import PoolError

DEFAULT_ENDPOINT = "unix:///csi/csi.sock"


def own_version() -> str:
    from importlib.metadata import PackageNotFoundError  # only when asked: it costs 40 ms at every start
    from importlib.metadata import version as package_version

    try:
        return package_version("hpp-csi")
    except PackageNotFoundError:
        return "dev"


def logging_flags(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """-v and --log-format, accepted before and after the subcommand (the HPP container passes --v=N after)."""
    parser.add_argument("-v", "--v", dest="verbosity", type=int, help="log verbosity (klog levels)",
                        default=2 if defaults else argparse.SUPPRESS)
    parser.add_argument("--log-format", choices=("text", "json"), default="text" if defaults else argparse.SUPPRESS)


def add_serve(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = sub.add_parser("serve", help="run the CSI driver on a unix socket")
    logging_flags(serve, defaults=False)
    serve.add_argument("--drivername", default=DEFAULT_DRIVER_NAME, help="CSI driver name")
    serve.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="unix:///path/to/csi.sock")
    serve.add_argument("--nodeid", required=True, help="this node's name (the topology value)")
    serve.add_argument("--version", default=None, help="version reported by GetPluginInfo (default: the package's)")
    pools = serve.add_mutually_exclusive_group(required=True)
    pools.add_argument("--datadir", help='JSON array of pools: [{"name": "legacy", "path": "/var/hpvolumes"}]')
    pools.add_argument("--config", type=Path, help="a HostPathProvisioner CR (YAML or JSON) with spec.storagePools")
    serve.add_argument("--metrics-address", help="host:port for Prometheus metrics (off when not given)")
    serve.add_argument("--metrics-cert-file", type=Path, help="PEM certificate: serve metrics over HTTPS (as HPP)")
    serve.add_argument("--metrics-key-file", type=Path, help="PEM private key of --metrics-cert-file")
    serve.add_argument("--metrics-tls", action="store_true",
                       help="serve metrics over HTTPS; without --metrics-cert-file, with a self-signed pair made at "
                            "start (its SHA-256 fingerprint is logged; a restart makes a new one)")
    serve.add_argument("--host-root", type=Path, default=Path("/"),
                       help="where the host's / is mounted in a container (read-only), so the check that a pool "
                            "shares the OS partition compares with the host's root, not the container's")
    serve.add_argument("--workers", type=int, default=16,
                       help="threads serving calls at most")
    serve.add_argument("--core-workers", type=int, default=CORE,
                       help="threads that take every call; more (up to --workers) start only for calls that waited "
                            "50 ms for one. Few threads keep Python's lock uncontended (hpp_csi/csi/call_pool.py)")
    serve.add_argument("--advertise-get-snapshot", action="store_true",
                       help="advertise GET_SNAPSHOT (CSI 1.12 alpha; csi-sanity before v5.5.0 rejects it)")
    serve.add_argument("--grace", type=float, default=30.0, help="seconds in-flight calls get at SIGTERM")
    serve.set_defaults(func=run_serve)


def load_pools(opts: argparse.Namespace) -> list[PoolConfig]:
    return parse_datadir(opts.datadir) if opts.datadir is not None else load_cr(opts.config)


def run_serve(opts: argparse.Namespace) -> int:
    try:
        pools = load_pools(opts)
        driver = Driver(DriverOptions(
            node_id=opts.nodeid, endpoint=opts.endpoint, pools=pools, driver_name=opts.drivername,
            version=opts.version or own_version(), metrics_address=opts.metrics_address, workers=opts.workers,
            core_workers=opts.core_workers,
            advertise_get_snapshot=opts.advertise_get_snapshot, host_root=opts.host_root,
            metrics_cert_file=opts.metrics_cert_file, metrics_key_file=opts.metrics_key_file,
            metrics_tls=opts.metrics_tls,
        ))
        driver.start()
    except (ConfigError, PoolError, EndpointError, OSError) as exc:
        print(f"hpp-csi: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # A timed wait: a signal delivered to a gRPC thread while this one sleeps untimed could go unnoticed.
    while not stop.wait(0.5):
        pass
    driver.stop(opts.grace)
    return 0


def add_mount_pool(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    mp = sub.add_parser("mount-pool", help="format (if blank) and mount block-backed pools; the operator's mounter")
    logging_flags(mp, defaults=False)
    pools = mp.add_mutually_exclusive_group(required=True)
    pools.add_argument("--datadir", help="JSON array of pools, as for serve")
    pools.add_argument("--config", type=Path, help="a HostPathProvisioner CR")
    mp.add_argument("--pool", action="append", default=[], help="only this pool (repeatable)")
    mp.add_argument("--device", help="block device backing the pool (e.g. /dev/data from a pvcTemplate PVC)")
    mp.add_argument("--force", action="store_true", help="format even a device that holds data (destroys it)")
    action = mp.add_mutually_exclusive_group()
    action.add_argument("--unmount", action="store_true", help="unmount and detach instead")
    action.add_argument("--describe", action="store_true", help="say what each pool needs from the node")
    mp.set_defaults(func=run_mount_pool)


def describe_pool(pool: PoolConfig) -> str:
    if pool.device or pool.size:
        backing = f"device {pool.device}" if pool.device else f"a sparse {pool.size}-byte loop file {pool.path}.img"
        return f"{pool.name}: XFS on {backing}, mounted at {pool.volumes_dir}"
    if pool.pvc_template is not None:
        need = pool.pvc_template.describe()
        how = ("format its device XFS and mount it at " if pool.pvc_template.volume_mode == "Block"
               else "mount its filesystem at ")
        command = f"hpp-csi mount-pool --pool {pool.name} --device DEV"
        return f"{pool.name}: needs {need}; {how}{pool.volumes_dir} ({command})"
    return f"{pool.name}: directory {pool.volumes_dir} on the node's filesystem"


def run_mount_pool(opts: argparse.Namespace) -> int:
    try:
        pools = [p for p in load_pools(opts) if not opts.pool or p.name in opts.pool]
        if opts.device:
            if len(pools) != 1:
                raise ConfigError("--device needs exactly one pool (use --pool NAME)")
            pools = [dataclasses.replace(pools[0], device=opts.device,
                                         volumes_dir=pools[0].path / CR_VOLUMES_SUBDIR)]
        for pool in pools:
            if opts.describe:
                print(describe_pool(pool))
            elif opts.unmount:
                for line in unmount_pool(pool) or [f"{pool.name}: nothing mounted"]:
                    print(f"{pool.name}: {line}" if not line.startswith(pool.name) else line)
            elif pool.device or pool.size:
                done = mount_pool(pool, force=opts.force)
                quota = "sizes enforced" if done.quotas_enforced else f"sizes NOT enforced ({done.reason})"
                print(f"{pool.name}: {done.device} mounted at {done.mount_point}"
                      f"{' (formatted XFS)' if done.formatted else ''}; {quota}")
            else:
                print(f"{pool.name}: not block-backed; nothing to mount")
    except (ConfigError, PoolDeviceError, DeviceNotBlank, CommandFailed, OSError) as exc:
        print(f"hpp-csi mount-pool: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and flag (the chart's tests parse its arguments with it)."""
    parser = argparse.ArgumentParser(prog="hpp-csi", description="KubeVirt hostpath provisioner CSI driver")
    logging_flags(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve(sub)
    add_mount_pool(sub)
    ctl.add_parser(sub)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=lambda _opts: print(own_version()) or 0)
    return parser


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    logs.setup(opts.log_format, opts.verbosity)
    result: int = opts.func(opts)
    return result


if __name__ == "__main__":
    sys.exit(main())

"""`hpp-importer import`: flags, or CDI's importer-pod environment variables for drop-in use."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from importer.deadline import (
    DEFAULT_MIN_RATE,
    DEFAULT_MIN_RATE_WINDOW,
    DEFAULT_STALL_TIMEOUT,
    Deadlines,
    add_deadline_flags,
)
from importer.errors import ConfigError, ImporterError, ScratchSpaceRequired
from importer.fetch import DEFAULT_CONNECTIONS
from importer.net.headers import CDI_SECRET_HEADERS_DIR, parse_header, secret_headers
from importer.net.pools import Pools
from importer.net.proxy import ProxySettings
from importer.net.tls import TlsSettings
from importer.pipeline import Checksum
from importer.processor import ImportProcessor, ImportRequest, ImportResult
from importer.progress import TERMINATION_LOG, ImportMetrics, Progress, termination_message, write_termination_message
from importer.progress_bar import TransferProgress
from importer.qcow2_stream_buffer import DEFAULT_MEMORY_LIMIT
from importer.registry.options import RegistryOptions
from importer.serve import upload_config
from importer.serve.resume import DEFAULT_HOLD
from importer.sources import BlankSource, FileSource, HttpOptions, HttpSource, RegistrySource, Source
from importer.target import DEFAULT_FILESYSTEM_OVERHEAD, open_target
from importer.units import human, parse_duration, parse_quantity
from importer.upload_client import Uploader, UploadRequest, read_token

log = logging.getLogger("hpp-importer")

# CDI's importer pod layout.
CDI_DATA_DIR = Path("/data")
CDI_BLOCK_DEVICE = Path("/dev/cdi-block-volume")
CDI_SCRATCH_DIR = Path("/scratch")
EXTRA_HEADER_PREFIX = "IMPORTER_EXTRA_HEADER_"
SOURCES = ("http", "file", "registry", "none", "blank")
LATER_SOURCES = ("upload", "s3", "gcs", "imageio", "vddk")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpp-importer", description="Import VM disk images into volumes.")
    sub = parser.add_subparsers(dest="command")
    imp = sub.add_parser("import", help="import one image (flags override CDI's IMPORTER_* variables)")
    imp.add_argument("--source", help="http (also https), file, or none/blank [IMPORTER_SOURCE]")
    imp.add_argument("--endpoint", help="URL or file path of the image [IMPORTER_ENDPOINT]")
    imp.add_argument("--content-type", choices=("kubevirt", "archive"), help="[IMPORTER_CONTENTTYPE]")
    imp.add_argument("--dest", type=Path, help="directory (writes disk.img) or block device [/data]")
    imp.add_argument("--image-size", help="requested volume size, a Kubernetes quantity [IMPORTER_IMAGE_SIZE]")
    imp.add_argument("--filesystem-overhead", type=float, help="fraction kept free [FILESYSTEM_OVERHEAD, 0.055]")
    imp.add_argument("--storage-class", help="storage class of the volume, to pick a per-class overhead")
    imp.add_argument("--class-overhead", action="append", default=[], metavar="CLASS=FRACTION",
                     help="overhead for one storage class (repeatable); wins over the global value")
    imp.add_argument("--preallocation", action=argparse.BooleanOptionalAction, default=None,
                     help="allocate the whole disk [PREALLOCATION]")
    imp.add_argument("--insecure-tls", action="store_true", default=None, help="skip TLS verification [INSECURE_TLS]")
    imp.add_argument("--cert-dir", type=Path, help="extra CA certificates [IMPORTER_CERT_DIR]")
    imp.add_argument("--access-key-id", help="HTTP basic auth user [IMPORTER_ACCESS_KEY_ID]")
    imp.add_argument("--secret-key", help="HTTP basic auth password [IMPORTER_SECRET_KEY]")
    imp.add_argument("--extra-header", action="append", default=[], metavar="'NAME: VALUE'",
                     help="extra HTTP header, repeatable [IMPORTER_EXTRA_HEADER_<n>]")
    imp.add_argument("--extra-headers-dir", type=Path,
                     help=f"secret extra headers, one 'Name: value' file each [{CDI_SECRET_HEADERS_DIR}, where CDI "
                     "mounts them]")
    imp.add_argument("--http-proxy", help="proxy for http:// URLs [HTTP_PROXY, http_proxy]")
    imp.add_argument("--https-proxy", help="proxy for https:// URLs, reached with CONNECT [HTTPS_PROXY, https_proxy]")
    imp.add_argument("--no-proxy", help="hosts, .domains, IPs, CIDRs (optionally :port) or * reached directly "
                     "[NO_PROXY, no_proxy]")
    imp.add_argument("--proxy-cert-dir", type=Path, help="CA certificates of the proxy [IMPORTER_PROXY_CERT_DIR]")
    imp.add_argument("--checksum", help="expected digest of the bytes as served, e.g. sha256:<hex> [IMPORTER_CHECKSUM]")
    imp.add_argument("--scratch", type=Path, help="scratch directory for images that need one [/scratch]")
    imp.add_argument("--metrics-address", help="HOST:PORT to serve kubevirt_cdi_import_progress_total on")
    imp.add_argument("--owner-uid", help="ownerUID label of the progress metric [OWNER_UID]")
    imp.add_argument("--termination-log", type=Path, help="where the JSON result goes [/dev/termination-log]")
    add_deadline_flags(imp, "fail when the source")
    imp.add_argument("--retries", type=int, default=5, help="reconnections without progress before failing")
    imp.add_argument("--retry-delay", type=float, default=1.0, help="first backoff in seconds, doubled each time")
    imp.add_argument("--qcow2-reader", choices=("native", "qemu-img"), default="native",
                     help="who reads a qcow2 served with Range support: our parallel reader, or qemu-img via nbdkit")
    imp.add_argument("--qcow2-stream", action=argparse.BooleanOptionalAction, default=True,
                     help="read a qcow2 that arrives as a stream with our streaming reader (--no-qcow2-stream: "
                          "store it in scratch and convert it with qemu-img, as CDI does) [on]")
    imp.add_argument("--qcow2-stream-memory", default=None,
                     help="memory for qcow2 clusters that arrive before their table, before scratch [64Mi]")
    imp.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS,
                     help=f"parallel Range requests of our qcow2 and raw readers [{DEFAULT_CONNECTIONS}]")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    imp.add_argument("-v", "--verbose", action="store_true")
    _add_upload_parser(sub)
    upload_config.add_arguments(sub.add_parser(
        "upload-server", help="CDI's upload server: receive one upload over TLS (flags override CDI's variables)"))
    _add_daemon_parsers(sub)
    _add_clone_parsers(sub)
    return parser


def _add_clone_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from importer.clone import commands

    commands.add_arguments(sub.add_parser(
        "clone-source", help="stream a volume to another node's upload daemon (sparse, resumable, verified)"), False)
    commands.add_arguments(sub.add_parser(
        "move", help="clone-source with the target's token fetched by --token-command (one command per move)"), True)


def _add_upload_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = sub.add_parser("upload", help="send a disk image to an upload server (our daemon, upload-server, CDI's proxy)")
    up.add_argument("--url", required=True, help="https://HOST[:PORT] of the server; /v1beta1/upload... is appended")
    token = up.add_mutually_exclusive_group(required=True)
    token.add_argument("--token", help="the bearer token (other users can see it in ps: prefer --token-file)")
    token.add_argument("--token-file", type=Path, help="file holding the bearer token")
    up.add_argument("--image-path", type=Path, required=True, help="the image: raw, ISO, qcow2, ..., maybe compressed")
    trust = up.add_mutually_exclusive_group()
    trust.add_argument("--ca", type=Path, help="PEM CA certificate(s) to verify the server with [system store]")
    trust.add_argument("--insecure", action="store_true", help="do not verify the server's certificate")
    up.add_argument("--async", dest="asynchronous", action="store_true",
                    help="use upload-async: the server answers once the bytes are in and converts in the background")
    up.add_argument("--form", action="store_true", help="send a multipart form with field `file` (upload-form)")
    up.add_argument("--wait-ready", default="60s", help="retry a busy (503) or absent server this long [60s]")
    up.add_argument("--stall-timeout", default="60s", help="fail when the server takes no data for this long [60s]")
    up.add_argument("--connect-timeout", default="10s", help="TCP connect and TLS handshake [10s]")
    up.add_argument("--response-timeout", default="1h", help="wait for the answer after the last byte [1h]")
    up.add_argument("--progress-interval", default="10s",
                    help="time between progress lines when stderr is not a terminal [10s]")
    up.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    up.add_argument("--retries", type=int, default=5,
                    help="after a broken connection, resume (or restart) the upload this many times [5]")
    up.add_argument("--no-resume", action="store_true", help="send no resume headers: a broken upload just fails")


def run_upload(args: argparse.Namespace) -> int:
    """`hpp-importer upload`: one line on stdout when the server took the image, one error line otherwise."""
    try:
        request = UploadRequest(
            url=args.url, token=read_token(args.token, args.token_file), image=args.image_path, ca_file=args.ca,
            insecure=args.insecure, asynchronous=args.asynchronous, form=args.form,
            wait_ready=parse_duration(args.wait_ready, "--wait-ready"),
            stall_timeout=parse_duration(args.stall_timeout, "--stall-timeout"),
            connect_timeout=parse_duration(args.connect_timeout, "--connect-timeout"),
            response_timeout=parse_duration(args.response_timeout, "--response-timeout"),
            retries=max(0, args.retries), resume=not args.no_resume,
        )
        interval = parse_duration(args.progress_interval, "--progress-interval")
        progress = None if args.no_progress else TransferProgress(sys.stderr, interval)
        result = Uploader(request, progress, notice=lambda text: print(f"hpp-importer: {text}", file=sys.stderr)).run()
    except ImporterError as err:
        return _fail(None, str(err))
    except KeyboardInterrupt:
        return _fail(None, "upload interrupted") + 129  # 130, as a shell reports SIGINT
    print(result.summary(request.image))
    return 0


# -- the node upload daemon: `serve` and `upload-token` ---------------------------------------------------

def _add_daemon_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from importer.serve.tokens import DEFAULT_KEY_FILE

    serve = sub.add_parser("serve", help="the node upload daemon: uploads into any volume of this node, with a token")
    pools = serve.add_mutually_exclusive_group(required=True)
    pools.add_argument("--datadir", help='the driver\'s pools as JSON: [{"name": ..., "path": ...}]')
    pools.add_argument("--config", type=Path, help="the driver's HostPathProvisioner CR file (YAML)")
    serve.add_argument("--listen", required=True, help="HOST:PORT to serve uploads on (HTTPS)")
    serve.add_argument("--tls-cert", type=Path, help="server certificate, PEM [a self-signed one beside --key-file]")
    serve.add_argument("--tls-key", type=Path, help="server key, PEM")
    serve.add_argument("--key-file", type=Path, default=DEFAULT_KEY_FILE,
                       help=f"the node's token signing key, made at first start [{DEFAULT_KEY_FILE}]")
    serve.add_argument("--healthz-address", help="HOST:PORT of a plain-HTTP GET /healthz [none]")
    serve.add_argument("--filesystem-overhead", type=float, help="fraction of a file volume kept free "
                       f"[FILESYSTEM_OVERHEAD, {DEFAULT_FILESYSTEM_OVERHEAD}]")
    serve.add_argument("--scratch", type=Path, help="scratch directory for formats that need one "
                       "[the volume's pool's .hpp-csi/staging]")
    add_deadline_flags(serve, "drop a client that")
    serve.add_argument("--resume-hold", type=float, default=DEFAULT_HOLD,
                       help="seconds an interrupted resumable upload waits for its continuation [%(default)s]")
    serve.add_argument("-v", "--verbose", action="store_true")
    token = sub.add_parser("upload-token", help="print a token allowing one upload into VOLUME on this node")
    token.add_argument("volume", metavar="VOLUME", help="the volume's ID (its name in the pool)")
    token.add_argument("--ttl", default="5m", help="how long the token is valid: 300, 300s, 5m, 1h [5m]")
    token.add_argument("--key-file", type=Path, default=DEFAULT_KEY_FILE,
                       help=f"the node's token signing key, made when missing [{DEFAULT_KEY_FILE}]")
    token.add_argument("--node", help="the node's name, recorded in the token [this host's name]")


def run_upload_token(args: argparse.Namespace) -> int:
    """Print a token for one volume on stdout, nothing else (so `$(hpp-importer upload-token V)` just works)."""
    import socket

    from importer.serve import tokens
    from importer.serve.volumes import valid_volume_name

    try:
        if not valid_volume_name(args.volume):
            raise ConfigError(f"invalid volume name {args.volume!r}")
        key = tokens.load_or_create_key(args.key_file)
        ttl = parse_duration(args.ttl, "--ttl")
        token = tokens.issue(key, args.volume, ttl, args.node if args.node is not None else socket.gethostname())
    except (ImporterError, tokens.TokenError) as err:
        return _fail(None, str(err))
    except OSError as err:
        return _fail(None, f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else ""))
    print(token)
    return 0


def run_serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Serve uploads until SIGTERM; exit 1 only when it cannot start."""
    from hpp_csi.config import ConfigError as PoolConfigError
    from hpp_csi.config import load_cr, parse_datadir
    from hpp_csi.storage.pools import StoragePool
    from importer.serve import tokens
    from importer.serve.daemon import DaemonConfig, UploadDaemon
    from importer.serve.node_tls import default_hosts, fingerprint, self_signed_pair

    try:
        pool_configs = parse_datadir(args.datadir) if args.datadir else load_cr(args.config)
        listen = upload_config.parse_address(args.listen, "--listen")
        healthz = upload_config.parse_address(args.healthz_address, "--healthz-address") \
            if args.healthz_address else None
        overhead_text = env.get("FILESYSTEM_OVERHEAD") or str(DEFAULT_FILESYSTEM_OVERHEAD)
        if args.filesystem_overhead is not None:
            overhead_text = str(args.filesystem_overhead)
        if (args.tls_cert is None) != (args.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together (or neither: a self-signed pair is made)")
        key = tokens.load_or_create_key(args.key_file)
        cert, tls_key = args.tls_cert, args.tls_key
        if cert is None:
            cert, tls_key = self_signed_pair(args.key_file.parent, default_hosts(listen[0]))
        config = DaemonConfig(
            listen=listen, pools=[StoragePool(p) for p in pool_configs], tls_cert=cert, tls_key=tls_key,
            public_key=key.public_key(), healthz=healthz, filesystem_overhead=_fraction(overhead_text),
            scratch_dir=args.scratch, deadlines=deadlines_from(args, env), resume_hold=args.resume_hold,
        )
        daemon = UploadDaemon(config)
    except (ImporterError, PoolConfigError, tokens.TokenError) as err:
        return _fail(None, str(err))
    except OSError as err:  # a port in use, unreadable files
        return _fail(None, f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else ""))
    health = f", healthz on {healthz[0]}:{daemon.healthz_port}" if healthz else ""
    print(f"hpp-importer: upload daemon listening on {listen[0]}:{daemon.port}{health}; TLS certificate {cert} "
          f"SHA-256 fingerprint {fingerprint(cert)}", file=sys.stderr, flush=True)
    try:
        daemon.run()
    except ImporterError as err:  # SIGTERM: the uploads in progress were cancelled and their volumes cleaned
        print(f"hpp-importer: upload daemon stopped: {err}", file=sys.stderr)
    return 0


def _env_bool(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes")


def _is_number(text: str) -> bool:
    """ASCII digits only, as CDI's strconv.Atoi reads them ("²".isdigit() is true, but int() refuses it)."""
    return text.isascii() and text.isdigit()


def extra_headers_from_env(env: Mapping[str, str]) -> list[str]:
    """IMPORTER_EXTRA_HEADER_0, _1, ... in numeric order."""
    numbered = [(int(k[len(EXTRA_HEADER_PREFIX):]), v) for k, v in env.items()
                if k.startswith(EXTRA_HEADER_PREFIX) and _is_number(k[len(EXTRA_HEADER_PREFIX):])]
    return [value for _, value in sorted(numbered)]


def proxy_settings_from(args: argparse.Namespace, env: Mapping[str, str]) -> ProxySettings:
    """CDI's proxy environment; a flag replaces its variable (both cases)."""
    merged = dict(env)
    for flag, name in ((args.http_proxy, "HTTP_PROXY"), (args.https_proxy, "HTTPS_PROXY"), (args.no_proxy, "NO_PROXY")):
        if flag is not None:
            merged[name] = merged[name.lower()] = flag
    return ProxySettings.from_env(merged)


def tls_settings_from(args: argparse.Namespace, env: Mapping[str, str]) -> TlsSettings:
    """--insecure-tls, --cert-dir and --proxy-cert-dir, each falling back to CDI's variable."""
    cert_dir = args.cert_dir or (Path(env["IMPORTER_CERT_DIR"]) if env.get("IMPORTER_CERT_DIR") else None)
    proxy_dir = args.proxy_cert_dir or (Path(env["IMPORTER_PROXY_CERT_DIR"])
                                        if env.get("IMPORTER_PROXY_CERT_DIR") else None)
    return TlsSettings(bool(args.insecure_tls) or _env_bool(env, "INSECURE_TLS"), cert_dir, proxy_dir)


def headers_from(args: argparse.Namespace, env: Mapping[str, str]) -> list[tuple[str, str]]:
    """IMPORTER_EXTRA_HEADER_<n>, then --extra-header, then the secret header files (CDI's order)."""
    plain = [parse_header(h) for h in [*extra_headers_from_env(env), *args.extra_header]]
    return plain + secret_headers(args.extra_headers_dir or CDI_SECRET_HEADERS_DIR)


def resolve_overhead(global_value: float, per_class: Sequence[str], storage_class: str | None) -> float:
    """The storage class's own overhead if configured, else the global one (CDI's per-class overhead)."""
    for item in per_class:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"invalid --class-overhead {item!r}: expected CLASS=FRACTION")
        if name == storage_class:
            return _fraction(value)
    return global_value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise ConfigError(f"invalid filesystem overhead {text!r}: expected a fraction such as 0.055") from err
    if not 0 <= value < 1:
        raise ConfigError(f"filesystem overhead {value} must be at least 0 and below 1")
    return value


def _seconds(text: str, name: str, allow_zero: bool = True) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise ConfigError(f"invalid {name} {text!r}: expected a number of seconds") from err
    if value < 0 or (value == 0 and not allow_zero) or value != value or value == float("inf"):
        raise ConfigError(f"invalid {name} {text!r}: expected a {'non-negative' if allow_zero else 'positive'} "
                          "number of seconds")
    return value


def deadlines_from(args: argparse.Namespace, env: Mapping[str, str]) -> Deadlines:
    """--stall-timeout, --min-rate, --min-rate-window, each falling back to its IMPORTER_* variable."""
    stall = args.stall_timeout or env.get("IMPORTER_STALL_TIMEOUT") or str(DEFAULT_STALL_TIMEOUT)
    rate = args.min_rate or env.get("IMPORTER_MIN_RATE") or str(DEFAULT_MIN_RATE)
    window = args.min_rate_window or env.get("IMPORTER_MIN_RATE_WINDOW") or str(DEFAULT_MIN_RATE_WINDOW)
    return Deadlines(_seconds(stall, "stall timeout"), parse_quantity(rate.strip()),
                     _seconds(window, "minimum-rate window", allow_zero=False))


def build_source(args: argparse.Namespace, env: Mapping[str, str]) -> Source:
    kind = (args.source or env.get("IMPORTER_SOURCE") or "").strip().lower()
    endpoint = args.endpoint or env.get("IMPORTER_ENDPOINT", "")
    if not kind:
        kind = "file" if endpoint.startswith("file:") or endpoint.startswith("/") else "http"
    deadlines = deadlines_from(args, env)  # validated even where unused, so a typo is never silently ignored
    if kind in ("none", "blank"):
        return BlankSource()
    if kind in LATER_SOURCES:
        raise ConfigError(f"source {kind!r} is not supported yet (supported: {', '.join(SOURCES)})")
    if kind not in SOURCES:
        raise ConfigError(f"unknown source {kind!r} (supported: {', '.join(SOURCES)})")
    if not endpoint:
        raise ConfigError("no endpoint: pass --endpoint URL (IMPORTER_ENDPOINT)")
    if kind == "file" or endpoint.startswith("file:"):
        return FileSource(endpoint)
    tls = tls_settings_from(args, env)
    user = args.access_key_id if args.access_key_id is not None else env.get("IMPORTER_ACCESS_KEY_ID") or None
    password = args.secret_key if args.secret_key is not None else env.get("IMPORTER_SECRET_KEY") or None
    if kind == "registry":
        registry = RegistryOptions(
            username=user, password=password, insecure=tls.insecure, cert_dir=tls.cert_dir,
            stall_timeout=deadlines.stall_timeout, min_rate=deadlines.min_rate,
            min_rate_window=deadlines.min_rate_window, retries=args.retries, retry_delay=args.retry_delay,
        )
        pools = Pools(tls, proxy_settings_from(args, env), registry.io_timeout)  # CDI's import proxy, as for http
        return RegistrySource(endpoint, registry, pools)
    options = HttpOptions(
        insecure_tls=tls.insecure,
        cert_dir=tls.cert_dir,
        proxy_cert_dir=tls.proxy_cert_dir,
        proxy=proxy_settings_from(args, env),
        username=user,
        password=password,
        headers=headers_from(args, env),
        stall_timeout=deadlines.stall_timeout,
        min_rate=deadlines.min_rate,
        min_rate_window=deadlines.min_rate_window,
        retries=args.retries,
        retry_delay=args.retry_delay,
    )
    return HttpSource(endpoint, options)


def build_request(args: argparse.Namespace, env: Mapping[str, str], progress: Progress) -> ImportRequest:
    dest = args.dest or (CDI_BLOCK_DEVICE if CDI_BLOCK_DEVICE.exists() else CDI_DATA_DIR)
    scratch = args.scratch or (CDI_SCRATCH_DIR if CDI_SCRATCH_DIR.is_dir() else None)
    size_text = args.image_size or env.get("IMPORTER_IMAGE_SIZE")
    overhead_text = env.get("FILESYSTEM_OVERHEAD") or str(DEFAULT_FILESYSTEM_OVERHEAD)
    if args.filesystem_overhead is not None:
        overhead_text = str(args.filesystem_overhead)
    overhead = resolve_overhead(_fraction(overhead_text), args.class_overhead, args.storage_class)
    checksum_text = args.checksum or env.get("IMPORTER_CHECKSUM")
    preallocation = args.preallocation if args.preallocation is not None else _env_bool(env, "PREALLOCATION")
    content_type = (args.content_type or env.get("IMPORTER_CONTENTTYPE") or "kubevirt").lower()
    if content_type not in ("kubevirt", "archive"):
        raise ConfigError(f"unknown content type {content_type!r}: expected kubevirt or archive")
    source = build_source(args, env)
    try:
        target = open_target(dest)
    except BaseException:
        source.close()
        raise
    return ImportRequest(
        source=source,
        target=target,
        content_type=content_type,
        image_size=parse_quantity(size_text) if size_text else None,
        filesystem_overhead=overhead,
        preallocation=preallocation,
        scratch_dir=scratch,
        checksum=Checksum(checksum_text) if checksum_text else None,
        progress=progress,
        qcow2_reader=args.qcow2_reader,
        stream_qcow2=args.qcow2_stream,
        qcow2_stream_memory=(parse_quantity(args.qcow2_stream_memory) if args.qcow2_stream_memory
                             else DEFAULT_MEMORY_LIMIT),
        connections=args.connections,
    )


def summary(result: ImportResult, description: str) -> str:
    via = "+".join([*result.compressions, result.fmt])
    extra = f", preallocation {result.preallocation.value}" if result.preallocation_applied else ""
    extra += ", via scratch" if result.scratch_used else ""
    extra += f", {result.reader} reader" if result.reader else ""
    return (f"imported {description} ({via}, route {result.route.value}) into {result.dest}: "
            f"{human(result.virtual_size)} image, {human(result.usable_size)} disk{extra}")


def run_import(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    termination_log = args.termination_log or (TERMINATION_LOG if TERMINATION_LOG.exists() else None)
    try:
        metrics = None
        if args.metrics_address:
            metrics = ImportMetrics(args.owner_uid or env.get("OWNER_UID", ""))
            metrics.serve(args.metrics_address)
        progress = Progress(metrics, None if args.no_progress else sys.stderr)
        request = build_request(args, env, progress)
        try:
            result = ImportProcessor(request).run()
        finally:
            request.source.close()
    except ScratchSpaceRequired as err:
        return _fail(termination_log, str(err), scratch_space_required=True)
    except ImporterError as err:
        return _fail(termination_log, str(err))
    except OSError as err:  # I/O on the target or scratch: ENOSPC, EIO, EACCES
        where = f" ({err.filename})" if err.filename else ""
        return _fail(termination_log, f"{err.strerror or err}{where}")
    message = "Import Complete" + ("; Preallocation applied" if result.preallocation_applied else "")
    digest = request.source.image_digest  # what a registry import got, so boot-source pipelines can pin it
    if termination_log is not None:
        write_termination_message(termination_log, termination_message(
            message, preallocation_applied=result.preallocation_applied, digest=digest))
    print(summary(result, request.source.description + (f" ({digest})" if digest else "")))
    return 0


def run_upload_server(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Serve until one upload is complete (exit 0), the deadline passes while idle (exit 0), or it fails (1)."""
    from importer.serve.upload_server import Outcome, UploadServer

    termination_log = args.termination_log or (TERMINATION_LOG if TERMINATION_LOG.exists() else None)
    try:
        overhead_text = env.get("FILESYSTEM_OVERHEAD") or str(DEFAULT_FILESYSTEM_OVERHEAD)
        if args.filesystem_overhead is not None:
            overhead_text = str(args.filesystem_overhead)
        preallocation = args.preallocation if args.preallocation is not None else _env_bool(env, "PREALLOCATION")
        config = upload_config.config_from(args, env, deadlines_from(args, env), _fraction(overhead_text),
                                           preallocation)
        config.progress = Progress(None, None if args.no_progress else sys.stderr)
        server = UploadServer(config)
        print(f"hpp-importer: upload server listening on {config.listen[0]}:{server.port}, healthz on "
              f"{config.healthz[0]}:{server.healthz_port}", file=sys.stderr, flush=True)
        outcome = server.run()
    except ImporterError as err:
        return _fail(termination_log, str(err))
    except OSError as err:  # a port in use, unreadable certificates
        return _fail(termination_log, f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else ""))
    if outcome.outcome is Outcome.FAILED:
        return _fail(termination_log, outcome.error)
    if outcome.outcome is Outcome.DEADLINE:
        text = termination_message("Deadline Passed", deadline_passed=True)
        print("hpp-importer: deadline passed with no upload", file=sys.stderr)
    elif outcome.clone is not None:  # CDI's word for a clone target (importer.clone)
        text = termination_message("Clone Complete", preallocation_applied=outcome.clone.preallocation_applied)
        print(f"cloned a {human(outcome.clone.disk_size)} disk ({outcome.clone.kind})")
    else:
        assert outcome.result is not None
        text = termination_message("Upload Complete", preallocation_applied=outcome.result.preallocation_applied)
        print(summary(outcome.result, "upload"))
    if termination_log is not None:
        write_termination_message(termination_log, text)
    return 0


def _fail(termination_log: Path | None, message: str, scratch_space_required: bool | None = None) -> int:
    message = re.sub(r"\s+", " ", message).strip()
    if termination_log is not None:
        write_termination_message(
            termination_log, termination_message(message, scratch_space_required=scratch_space_required)
        )
    print(f"hpp-importer: error: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv and env.get("IMPORTER_SOURCE"):
        argv = ["import"]  # started as a CDI importer pod: configuration comes from the environment
    elif not argv and any(env.get(name) for name in upload_config.CDI_UPLOAD_ENV):
        argv = ["upload-server"]  # started as a CDI upload server pod
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "upload":
        return run_upload(args)
    if args.command == "upload-token":
        return run_upload_token(args)
    if args.command in ("clone-source", "move"):
        from importer.clone import commands

        return commands.run(args)
    if args.command not in ("import", "upload-server", "serve"):
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="hpp-importer: %(levelname)s: %(message)s")
    run = {"import": run_import, "upload-server": run_upload_server, "serve": run_serve}[args.command]
    # Kubelet stops a pod with SIGTERM: unwind like any failure so temporary and scratch files are removed.
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return run(args, env)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args, env)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: object) -> None:
    raise ImporterError(f"terminated by signal {signum}")


if __name__ == "__main__":
    sys.exit(main())

"""`hpp-importer upload-server` flags, and CDI's upload-server pod environment they override."""

from __future__ import annotations

import argparse
import datetime
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

from importer.deadline import Deadlines, add_deadline_flags
from importer.errors import ConfigError
from importer.serve.resume import DEFAULT_HOLD
from importer.serve.resume_state import RecordStore
from importer.serve.upload_server import UploadServerConfig
from importer.target import DISK_IMAGE_NAME, Target, open_target
from importer.units import parse_quantity

DEFAULT_LISTEN_ADDRESS = "0.0.0.0"
DEFAULT_LISTEN_PORT = 8443
DEFAULT_HEALTHZ = ("0.0.0.0", 8080)
CDI_DESTINATION = Path("/data") / DISK_IMAGE_NAME
CDI_BLOCK_DEVICE = Path("/dev/cdi-block-volume")
CDI_SCRATCH_DIR = Path("/scratch")
# Any of these in the environment, and no arguments: started as CDI's upload server pod.
CDI_UPLOAD_ENV = ("UPLOAD_IMAGE_SIZE", "TLS_CERT_FILE", "CLIENT_CERT_FILE")
RECORD_NAME = ".hpp-upload-resume.json"  # a resumable upload's record (importer/serve/resume_state.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", help="HOST:PORT to serve uploads on [LISTEN_ADDRESS:LISTEN_PORT, 0.0.0.0:8443]")
    parser.add_argument("--healthz-address", help="HOST:PORT of the plain-HTTP GET /healthz [:8080]")
    parser.add_argument("--dest", type=Path, help="DIR, DIR/disk.img or a block device [DESTINATION, "
                        f"{CDI_DESTINATION}, or {CDI_BLOCK_DEVICE} when it exists]")
    parser.add_argument("--image-size", help="requested volume size, a Kubernetes quantity [UPLOAD_IMAGE_SIZE]")
    parser.add_argument("--filesystem-overhead", type=float, help="fraction kept free [FILESYSTEM_OVERHEAD, 0.055]")
    parser.add_argument("--preallocation", action=argparse.BooleanOptionalAction, default=None,
                        help="allocate the whole disk [PREALLOCATION]")
    parser.add_argument("--deadline", help="RFC 3339 time after which an idle server exits [DEADLINE]")
    parser.add_argument("--tls-cert", type=Path, help="server certificate, PEM [TLS_CERT_FILE]")
    parser.add_argument("--tls-key", type=Path, help="server key, PEM [TLS_KEY_FILE]")
    parser.add_argument("--client-ca", type=Path, help="CA of allowed client certificates [CLIENT_CERT_FILE]")
    parser.add_argument("--client-name", help="the one client common name served [CLIENT_NAME]")
    parser.add_argument("--scratch", type=Path, help="scratch directory for images that need one [/scratch]")
    parser.add_argument("--termination-log", type=Path, help="where the JSON result goes [/dev/termination-log]")
    add_deadline_flags(parser, "drop a client that")
    parser.add_argument("--resume-hold", type=float, default=DEFAULT_HOLD,
                        help="seconds an interrupted resumable upload waits for its continuation [600]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    parser.add_argument("-v", "--verbose", action="store_true")


def parse_address(text: str, what: str) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT or :PORT (all addresses)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"invalid {what} {text!r}: expected HOST:PORT")
    return host.strip("[]") or DEFAULT_LISTEN_ADDRESS, int(port)


def listen_from(flag: str | None, env: Mapping[str, str]) -> tuple[str, int]:
    if flag:
        return parse_address(flag, "--listen")
    host = env.get("LISTEN_ADDRESS", DEFAULT_LISTEN_ADDRESS) or DEFAULT_LISTEN_ADDRESS
    port_text = env.get("LISTEN_PORT", "").strip()
    port = DEFAULT_LISTEN_PORT
    if port_text:
        if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
            raise ConfigError(f"invalid LISTEN_PORT {port_text!r}")
        port = int(port_text)
    return host, port


def parse_deadline(text: str) -> datetime.datetime:
    """An RFC 3339 time, as CDI's DEADLINE; a time without a zone is refused (RFC 3339 requires one)."""
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError as err:
        raise ConfigError(f"invalid deadline {text!r}: expected RFC 3339, e.g. 2026-01-02T15:04:05Z") from err
    if when.tzinfo is None:
        raise ConfigError(f"invalid deadline {text!r}: RFC 3339 needs a zone (Z or +HH:MM)")
    return when


def target_opener(dest: Path) -> Callable[[], Target]:
    """DESTINATION names a file (CDI's /data/disk.img), a directory or a block device; the name is fixed."""
    try:
        mode = dest.stat().st_mode
    except FileNotFoundError:
        mode = 0
    if stat.S_ISBLK(mode) or stat.S_ISDIR(mode):
        return lambda: open_target(dest)
    if dest.name != DISK_IMAGE_NAME:
        raise ConfigError(f"destination {dest}: the image is always written as {DISK_IMAGE_NAME}; pass a directory, "
                          f"DIR/{DISK_IMAGE_NAME} or a block device")
    return lambda: open_target(dest.parent)


def resume_store_for(dest: Path, scratch: Path | None) -> RecordStore | None:
    """Where the upload's resume record lives: the scratch folder (the server's own), else beside disk.img in the
    destination directory; a block device without scratch keeps none (an upload there resumes only in memory)."""
    if scratch is not None:
        return RecordStore(scratch, RECORD_NAME)
    directory = dest if dest.is_dir() else dest.parent if dest.name == DISK_IMAGE_NAME else None
    return RecordStore(directory, RECORD_NAME) if directory is not None else None


def config_from(args: argparse.Namespace, env: Mapping[str, str], deadlines: Deadlines, overhead: float,
                preallocation: bool) -> UploadServerConfig:
    """Flags first, then CDI's variables, then CDI's defaults."""
    dest_text = str(args.dest) if args.dest else env.get("DESTINATION", "")
    dest = Path(dest_text) if dest_text else (CDI_BLOCK_DEVICE if CDI_BLOCK_DEVICE.exists() else CDI_DESTINATION)
    cert = args.tls_cert or _env_path(env, "TLS_CERT_FILE")
    key = args.tls_key or _env_path(env, "TLS_KEY_FILE")
    if cert is None or key is None:
        raise ConfigError("the upload server needs a TLS certificate and key: --tls-cert/--tls-key "
                          "(TLS_CERT_FILE/TLS_KEY_FILE)")
    client_ca = args.client_ca or _env_path(env, "CLIENT_CERT_FILE")
    client_name = args.client_name if args.client_name is not None else env.get("CLIENT_NAME") or None
    if client_ca is not None and not client_name:
        raise ConfigError("a client CA (--client-ca/CLIENT_CERT_FILE) needs the client's common name: "
                          "--client-name (CLIENT_NAME)")
    size_text = args.image_size or env.get("UPLOAD_IMAGE_SIZE")
    deadline_text = args.deadline or env.get("DEADLINE")
    scratch = args.scratch or (CDI_SCRATCH_DIR if CDI_SCRATCH_DIR.is_dir() else None)
    healthz = parse_address(args.healthz_address, "--healthz-address") if args.healthz_address else DEFAULT_HEALTHZ
    return UploadServerConfig(
        listen=listen_from(args.listen, env),
        healthz=healthz,
        open_target=target_opener(dest),
        tls_cert=cert,
        tls_key=key,
        client_ca=client_ca,
        client_name=client_name if client_ca is not None else None,
        image_size=parse_quantity(size_text.strip()) if size_text else None,
        filesystem_overhead=overhead,
        preallocation=preallocation,
        scratch_dir=scratch,
        deadline=parse_deadline(deadline_text) if deadline_text else None,
        deadlines=deadlines,
        resume_hold=args.resume_hold,
        resume_store=resume_store_for(dest, scratch),
    )


def _env_path(env: Mapping[str, str], name: str) -> Path | None:
    value = env.get(name, "").strip()
    return Path(value) if value else None

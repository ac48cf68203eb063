"""The node daemon's TLS pair: given files, or a self-signed pair made once at first start and reused after."""

from __future__ import annotations

import socket
from pathlib import Path

from hpp_csi import tls_pair
from importer.errors import ConfigError

CERT_NAME = "upload-tls.crt"
KEY_NAME = "upload-tls.key"


def fingerprint(cert: Path) -> str:
    """SHA-256 of the certificate's DER form, as `openssl x509 -fingerprint -sha256` prints it."""
    try:
        return tls_pair.fingerprint(cert.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the TLS certificate {cert}: {err}") from err


def self_signed_pair(directory: Path, hosts: list[str]) -> tuple[Path, Path]:
    """(certificate, key) in `directory`: made (0600) when missing, reused as they are otherwise."""
    cert, key = directory / CERT_NAME, directory / KEY_NAME
    if cert.exists() and key.exists():
        return cert, key
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    pair = tls_pair.self_signed(hosts, hosts[0] if hosts else "hpp-importer")
    # The key first: a certificate on disk means its key is there too.
    tls_pair.write_private(key, pair.key_pem)
    tls_pair.write_private(cert, pair.cert_pem)
    return cert, key


def default_hosts(listen_host: str) -> list[str]:
    """Names the self-signed certificate answers to: the node's name, loopback, and the listen address."""
    hosts = [socket.gethostname(), "localhost", "127.0.0.1", "::1"]
    if listen_host and listen_host not in ("0.0.0.0", "::") and listen_host not in hosts:
        hosts.append(listen_host)
    return hosts

"""The node daemon's TLS pair: given files, or a self-signed pair made once at first start and reused after."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from importer.errors import ConfigError

CERT_NAME = "upload-tls.crt"
KEY_NAME = "upload-tls.key"
VALIDITY = datetime.timedelta(days=3650)  # nobody renews a self-signed certificate: clients pin its fingerprint


def fingerprint(cert: Path) -> str:
    """SHA-256 of the certificate's DER form, as `openssl x509 -fingerprint -sha256` prints it."""
    try:
        der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the TLS certificate {cert}: {err}") from err
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def self_signed_pair(directory: Path, hosts: list[str]) -> tuple[Path, Path]:
    """(certificate, key) in `directory`: made (0600) when missing, reused as they are otherwise."""
    cert, key = directory / CERT_NAME, directory / KEY_NAME
    if cert.exists() and key.exists():
        return cert, key
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "hpp-importer")])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()), critical=False)
        .sign(private, hashes.SHA256())
    )
    _write_private(key, private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    _write_private(cert, certificate.public_bytes(serialization.Encoding.PEM))
    return cert, key


def default_hosts(listen_host: str) -> list[str]:
    """Names the self-signed certificate answers to: the node's name, loopback, and the listen address."""
    hosts = [socket.gethostname(), "localhost", "127.0.0.1", "::1"]
    if listen_host and listen_host not in ("0.0.0.0", "::") and listen_host not in hosts:
        hosts.append(listen_host)
    return hosts


def _write_private(path: Path, data: bytes) -> None:
    """Write a new file 0600 through a temporary name, so a crash never leaves half a key to be reused."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)

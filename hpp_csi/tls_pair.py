"""Self-signed TLS pairs (EC P-256) and their SHA-256 fingerprints: one definition for the driver's metrics and the
importer's node daemon."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import shutil
import ssl
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=3650)  # nobody renews a self-signed certificate: clients pin its fingerprint


@dataclass(frozen=True)
class TlsPair:
    """A PEM certificate and its unencrypted PKCS#8 key."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_pem.decode("ascii"))


def fingerprint(cert_pem: str) -> str:
    """SHA-256 of the certificate's DER form, as `openssl x509 -fingerprint -sha256` prints it (ValueError if not
    a PEM certificate)."""
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert_pem)).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def subject_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Each host as an IP address entry when it parses as one, as a DNS name otherwise; duplicates dropped, and
    names no client could ask for (not ASCII: DNS names travel as A-labels) left out."""
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h for h in hosts if h):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if host.isascii():
                names.append(x509.DNSName(host))
    return names


def self_signed(hosts: Sequence[str], common_name: str) -> TlsPair:
    """A new server-only certificate valid for `hosts`, signed by its own key."""
    private = ec.generate_private_key(ec.SECP256R1())
    # The subject's name is informative only (clients match the alternative names) and X.509 caps it at 64.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "self-signed")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(subject_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()), critical=False)
        .sign(private, hashes.SHA256())
    )
    key = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return TlsPair(certificate.public_bytes(serialization.Encoding.PEM), key)


def write_private(path: Path, data: bytes) -> None:
    """Write a new file 0600 through a temporary name, so a crash never leaves half a key to be reused."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


@contextmanager
def transient_files(pair: TlsPair) -> Iterator[tuple[Path, Path]]:
    """(certificate, key) as files in a fresh 0700 folder that is removed on exit: for APIs that only load a pair
    from paths, while the key stays nowhere on disk once they have read it."""
    directory = Path(tempfile.mkdtemp(prefix="hpp-csi-tls-"))
    try:
        cert, key = directory / "tls.crt", directory / "tls.key"
        write_private(cert, pair.cert_pem)
        write_private(key, pair.key_pem)
        yield cert, key
    finally:
        shutil.rmtree(directory, ignore_errors=True)

"""What we trust over TLS: the system CAs, IMPORTER_CERT_DIR for the origin, IMPORTER_PROXY_CERT_DIR for the proxy."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from importer.errors import ConfigError

log = logging.getLogger(__name__)

SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass(frozen=True)
class TlsSettings:
    insecure: bool = False  # INSECURE_TLS: no verification of the origin (nor of an https:// proxy)
    cert_dir: Path | None = None  # CAs of the origin server
    proxy_cert_dir: Path | None = None  # CA of the proxy; also trusted for origins, as a TLS-inspecting proxy needs

    def origin_ca_files(self) -> list[Path]:
        return ca_files(self.cert_dir, "certificate") + ca_files(self.proxy_cert_dir, "proxy certificate")

    def origin_context(self) -> ssl.SSLContext:
        return _context(self.origin_ca_files(), self.insecure)

    def proxy_context(self) -> ssl.SSLContext:
        return _context(ca_files(self.proxy_cert_dir, "proxy certificate"), self.insecure)

    def ca_bundle(self, path: Path) -> Path | None:
        """The system CAs plus ours in one PEM file (for curl's cainfo=), or None when we add none."""
        extra = self.origin_ca_files()
        if not extra:
            return None
        pems = [SYSTEM_CA_BUNDLE] if SYSTEM_CA_BUNDLE.exists() else []
        path.write_text("\n".join(p.read_text(errors="replace") for p in [*pems, *extra]))
        return path


def ca_files(directory: Path | None, what: str) -> list[Path]:
    """The certificates in a mounted ConfigMap: plain files only, not Kubernetes' ..data links and dirs."""
    if directory is None:
        return []
    if not directory.is_dir():
        raise ConfigError(f"{what} directory {directory} does not exist")
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def _context(cas: list[Path], insecure: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    for cert in cas:
        try:
            ctx.load_verify_locations(cafile=str(cert))
        except (ssl.SSLError, OSError) as err:
            log.warning("ignoring %s in the certificate directory: %s", cert, err)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx

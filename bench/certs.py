"""Throwaway TLS material as files: a trustme CA and a server certificate, for the benchmarks and the tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class ServerCerts:
    authority: trustme.CA  # issues more certificates (clients) under the same CA
    ca: Path
    cert: Path
    key: Path


def make_server_certs(root: Path, host: str = "127.0.0.1") -> ServerCerts:
    """ca.pem, server.pem and server.key under root; the server certificate names host."""
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(root / "ca.pem"))
    server = authority.issue_cert(host)
    server.private_key_pem.write_to_path(str(root / "server.key"))
    server.cert_chain_pems[0].write_to_path(str(root / "server.pem"))
    return ServerCerts(authority, root / "ca.pem", root / "server.pem", root / "server.key")

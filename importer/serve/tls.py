"""TLS for the upload server: the server's pair, and CDI's mutual TLS (a client CA plus one allowed common name)."""

from __future__ import annotations

import ssl
from pathlib import Path

from importer.errors import ConfigError


def server_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """A server context; with client_ca, a client must present a certificate that CA signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"cannot load the TLS certificate {cert} and key {key}: {err}") from err
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(client_ca))
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"cannot load the client CA certificates {client_ca}: {err}") from err
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def common_names(peer: dict[str, object] | None) -> list[str]:
    """The subject common names of a verified peer certificate (ssl.SSLSocket.getpeercert())."""
    if not peer:
        return []
    names = []
    subject = peer.get("subject", ())
    assert isinstance(subject, tuple)
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                names.append(value)
    return names

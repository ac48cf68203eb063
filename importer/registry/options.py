"""How to talk to a registry: CDI's credentials, TLS and deadline settings, and the platform to pick."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from importer.net.transfer import TransferOptions
from importer.registry.manifests import node_architecture


def _node_platform() -> tuple[str, str]:
    return ("linux", node_architecture()[0])


@dataclass
class RegistryOptions(TransferOptions):
    username: str | None = None  # IMPORTER_ACCESS_KEY_ID
    password: str | None = None  # IMPORTER_SECRET_KEY
    insecure: bool = False  # INSECURE_TLS: plain HTTP allowed, or TLS without verification
    cert_dir: Path | None = None  # IMPORTER_CERT_DIR: extra CA certificates
    platform: tuple[str, str] = field(default_factory=_node_platform)  # (os, GOARCH)
    variant: str | None = field(default_factory=lambda: node_architecture()[1])  # "v8" on arm64

"""How to talk to a registry: CDI's credentials, TLS and deadline settings, and the platform to pick."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from importer.deadline import DEFAULT_MIN_RATE, DEFAULT_MIN_RATE_WINDOW, DEFAULT_STALL_TIMEOUT, Deadlines
from importer.registry.manifests import node_architecture


def _node_platform() -> tuple[str, str]:
    return ("linux", node_architecture()[0])


@dataclass
class RegistryOptions:
    username: str | None = None  # IMPORTER_ACCESS_KEY_ID
    password: str | None = None  # IMPORTER_SECRET_KEY
    insecure: bool = False  # INSECURE_TLS: plain HTTP allowed, or TLS without verification
    cert_dir: Path | None = None  # IMPORTER_CERT_DIR: extra CA certificates
    platform: tuple[str, str] = field(default_factory=_node_platform)  # (os, GOARCH)
    variant: str | None = field(default_factory=lambda: node_architecture()[1])  # "v8" on arm64
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    min_rate: int = DEFAULT_MIN_RATE
    min_rate_window: float = DEFAULT_MIN_RATE_WINDOW
    retries: int = 5  # consecutive failures without progress before a blob download gives up
    retry_delay: float = 1.0  # first backoff; doubles on each consecutive failure
    max_redirects: int = 10

    @property
    def deadlines(self) -> Deadlines:
        return Deadlines(self.stall_timeout, self.min_rate, self.min_rate_window)

    @property
    def io_timeout(self) -> float:
        """One socket operation's timeout: half the stall timeout, so a dead connection is retried once in time."""
        return self.stall_timeout / 2 if self.stall_timeout > 0 else DEFAULT_STALL_TIMEOUT

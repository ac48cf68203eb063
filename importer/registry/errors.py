"""The registry's errors: each says which registry, which image, and what to change."""

from __future__ import annotations

from importer.errors import SourceError


class RegistryError(SourceError):
    """The registry refused, failed, or served something we will not import."""


class RegistryUnauthorized(RegistryError):
    """HTTP 401/403: missing or wrong credentials."""


class ManifestUnknown(RegistryError):
    """HTTP 404 for a manifest: the tag, digest or repository does not exist."""

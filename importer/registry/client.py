"""The registry client: resolve a reference to one platform's verified manifest, then stream its blobs."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from importer.deadline import ProgressWatch
from importer.net.pools import Pools
from importer.net.tls import TlsSettings
from importer.pipeline import Reader
from importer.registry.blob import BlobMismatch, BlobReader
from importer.registry.errors import ManifestUnknown, RegistryError, RegistryUnauthorized
from importer.registry.manifests import (
    ACCEPT,
    MAX_MANIFEST,
    Descriptor,
    ImageManifest,
    IndexManifest,
    parse_manifest,
    select_platform,
    sha256_digest,
)
from importer.registry.options import RegistryOptions
from importer.registry.reference import Reference
from importer.registry.transport import Transport, error_detail, read_capped

__all__ = ["BlobMismatch", "Descriptor", "ManifestUnknown", "RegistryClient", "RegistryError", "RegistryOptions",
           "RegistryUnauthorized", "ResolvedImage"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedImage:
    reference: Reference
    digest: str  # the platform manifest we import from, not the index
    index_digest: str | None  # the manifest list / OCI index, when the reference named one
    layers: list[Descriptor]  # bottom layer first
    config: Descriptor | None = None
    media_type: str = ""


class RegistryClient:
    """One image in one registry; pools (direct or through CDI's proxy, per URL) bring the TLS settings."""

    def __init__(self, reference: Reference, options: RegistryOptions, pools: Pools | None = None) -> None:
        self.reference, self.options = reference, options
        self._own_pools = pools is None
        self.pools = pools if pools is not None else Pools(
            TlsSettings(insecure=options.insecure, cert_dir=options.cert_dir), None, options.io_timeout)
        self.transport = Transport(reference.api_host, reference.repository, options, self.pools)
        self.watch = ProgressWatch(options.deadlines)

    def resolve(self) -> ResolvedImage:
        """The manifest to import: by digest (verified) or tag (digest computed); an index picks our platform."""
        ref = self.reference
        manifest, digest = self._manifest(ref.manifest_ref, ref.digest)
        index_digest = None
        if isinstance(manifest, IndexManifest):
            index_digest = digest
            os_name, arch = self.options.platform
            chosen = select_platform(manifest, os_name, arch, self.options.variant, f"{ref} ({digest})")
            manifest, digest = self._manifest(chosen.digest, chosen.digest)
            if isinstance(manifest, IndexManifest):
                raise RegistryError(f"index {index_digest} of {ref} points at another index ({digest}) for "
                                    f"{os_name}/{arch}: nested indexes are not supported")
        log.info("resolved %s to manifest %s%s with %d layers", ref, digest,
                 f" (index {index_digest})" if index_digest else "", len(manifest.layers))
        return ResolvedImage(ref, digest, index_digest, list(manifest.layers), manifest.config, manifest.media_type)

    def _manifest(self, ref: str, expected: str | None) -> tuple[ImageManifest | IndexManifest, str]:
        where = f"{self.reference.registry}/{self.reference.repository}:{ref}" if expected is None else \
            f"{self.reference.registry}/{self.reference.repository}@{ref}"
        resp = self.transport.get(f"/v2/{self.reference.repository}/manifests/{ref}", {"Accept": ACCEPT})
        with contextlib.closing(resp):
            if resp.status == 404:
                raise ManifestUnknown(f"manifest unknown: {where} does not exist in the registry (HTTP 404"
                                      f"{error_detail(resp).replace(' (', ', ').rstrip(')')})")
            if resp.status != 200:
                raise RegistryError(f"GET manifest of {where}: HTTP {resp.status}{error_detail(resp)}")
            body = read_capped(resp, MAX_MANIFEST, f"manifest of {where}")
            content_type = resp.headers.get("Content-Type")
        digest = sha256_digest(body)
        if expected is not None and digest != expected:
            raise RegistryError(f"manifest of {where} digest mismatch: expected {expected}, got {digest}")
        return parse_manifest(body, content_type, where), digest

    def open_blob(self, descriptor: Descriptor) -> Reader:
        """The blob's raw bytes; the last read raises BlobMismatch rather than return b"" for wrong bytes."""
        return BlobReader(self.transport, self.reference.repository, descriptor, self.watch)

    def close(self) -> None:
        if self._own_pools:
            self.pools.clear()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

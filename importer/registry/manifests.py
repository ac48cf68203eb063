"""Manifests and indexes as the registry serves them: validated JSON, sha256 digests, one platform picked."""

from __future__ import annotations

import hashlib
import json
import platform as host_platform
import re
from dataclasses import dataclass
from typing import Any

from importer.registry.errors import RegistryError

MAX_MANIFEST = 4 * 1024 * 1024  # distribution itself refuses manifests above 4 MiB

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
           "application/vnd.docker.distribution.manifest.v1+prettyjws")
IMAGE_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEX_TYPES = (DOCKER_LIST, OCI_INDEX)
ACCEPT = ", ".join((*IMAGE_TYPES, *INDEX_TYPES))

LAYER_TYPES = frozenset({
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
})
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

# GOARCH (and GOARM-style variant) of this node, as indexes name platforms.
_ARCHES: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None), "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "i386": ("386", None), "i686": ("386", None),
    "ppc64le": ("ppc64le", None), "s390x": ("s390x", None), "riscv64": ("riscv64", None),
}


def node_architecture() -> tuple[str, str | None]:
    """This machine as (GOARCH, variant), e.g. ("arm64", "v8")."""
    machine = host_platform.machine().lower()
    return _ARCHES.get(machine, (machine, None))


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str  # "sha256:<hex>"; other algorithms are refused
    size: int


@dataclass(frozen=True)
class PlatformEntry:
    """One manifest of an index and the platform it is for."""

    descriptor: Descriptor
    os: str
    architecture: str
    variant: str | None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class ImageManifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]


@dataclass(frozen=True)
class IndexManifest:
    media_type: str
    manifests: list[PlatformEntry]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: object, what: str) -> str:
    """A digest we can verify: sha256 only (what every registry writes)."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        algorithm = digest.partition(":")[0] if isinstance(digest, str) else type(digest).__name__
        if isinstance(digest, str) and algorithm != "sha256" and ":" in digest:
            raise RegistryError(f"{what} has digest {digest!r}: only sha256 digests are supported")
        raise RegistryError(f"{what} has an invalid digest {digest!r}: expected sha256:<64 lowercase hex>")
    return digest


def parse_descriptor(value: object, what: str) -> Descriptor:
    if not isinstance(value, dict):
        raise RegistryError(f"{what} is not a JSON object")
    media_type, size = value.get("mediaType"), value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise RegistryError(f"{what} has no mediaType")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RegistryError(f"{what} has an invalid size {size!r}")
    return Descriptor(media_type, check_digest(value.get("digest"), what), size)


def parse_manifest(body: bytes, content_type: str | None, where: str) -> ImageManifest | IndexManifest:
    """Validate what GET /manifests/ returned; `where` names it in errors (the reference or digest)."""
    try:
        doc: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RegistryError(f"manifest of {where} is not valid JSON: {err}") from err
    if not isinstance(doc, dict):
        raise RegistryError(f"manifest of {where} is not a JSON object")
    header_type = (content_type or "").split(";")[0].strip()
    if doc.get("schemaVersion") == 1 or header_type in SCHEMA1:
        raise RegistryError(f"{where} is a Docker schema 1 manifest, which is deprecated and not supported: "
                            "push the image again with a current tool (docker, podman, skopeo)")
    if doc.get("schemaVersion") != 2:
        raise RegistryError(f"manifest of {where} has schemaVersion {doc.get('schemaVersion')!r}, expected 2")
    media_type = doc.get("mediaType", header_type)
    if not isinstance(media_type, str) or not media_type:
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST  # OCI makes the field optional
    if media_type in INDEX_TYPES:
        return _parse_index(doc, media_type, where)
    if media_type in IMAGE_TYPES:
        return _parse_image(doc, media_type, where)
    raise RegistryError(f"manifest of {where} has media type {media_type!r}, which is not an image: expected one "
                        f"of {ACCEPT}")


def _parse_image(doc: dict[str, Any], media_type: str, where: str) -> ImageManifest:
    config = parse_descriptor(doc.get("config"), f"config of {where}")
    layers_json = doc.get("layers")
    if not isinstance(layers_json, list):
        raise RegistryError(f"manifest of {where} has no layers list")
    layers = [parse_descriptor(item, f"layer {n} of {where}") for n, item in enumerate(layers_json)]
    for n, layer in enumerate(layers):
        if layer.media_type not in LAYER_TYPES:
            hint = " (encrypted layers cannot be imported)" if "encrypted" in layer.media_type else ""
            raise RegistryError(f"layer {n} of {where} has media type {layer.media_type!r}, not a tar layer{hint}")
    return ImageManifest(media_type, config, layers)


def _parse_index(doc: dict[str, Any], media_type: str, where: str) -> IndexManifest:
    items = doc.get("manifests")
    if not isinstance(items, list):
        raise RegistryError(f"index {where} has no manifests list")
    entries = []
    for n, item in enumerate(items):
        descriptor = parse_descriptor(item, f"manifest {n} of index {where}")
        plat = item.get("platform") or {}
        if not isinstance(plat, dict):
            raise RegistryError(f"manifest {n} of index {where} has an invalid platform")
        os_name, arch, variant = plat.get("os"), plat.get("architecture"), plat.get("variant")
        entries.append(PlatformEntry(descriptor, os_name if isinstance(os_name, str) else "",
                                     arch if isinstance(arch, str) else "",
                                     variant if isinstance(variant, str) and variant else None))
    return IndexManifest(media_type, entries)


def select_platform(index: IndexManifest, os_name: str, arch: str, variant: str | None, where: str) -> Descriptor:
    """The manifest for os/arch[/variant]; an exact variant beats an entry that names none."""
    def fits(entry: PlatformEntry) -> bool:
        if entry.os != os_name or entry.architecture != arch or entry.descriptor.media_type not in IMAGE_TYPES:
            return False
        return variant is None or entry.variant is None or entry.variant == variant

    matches = [e for e in index.manifests if fits(e)]
    matches.sort(key=lambda e: e.variant != variant)  # stable: the index's order among equals
    if not matches:
        wanted = "/".join(p for p in (os_name, arch, variant) if p)
        has = ", ".join(str(e) or "(no platform)" for e in index.manifests) or "nothing"
        raise RegistryError(f"index {where} has no image for {wanted}: it has {has}")
    return matches[0].descriptor

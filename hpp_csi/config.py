"""Storage pool configuration: HPP's --datadir JSON or a HostPathProvisioner CR, checked with HPP's rules."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpp_csi.quantity import parse_bytes

LEGACY_POOL = "legacy"
MAX_POOL_NAME = 50
MAX_POOL_PATH = 255
CR_API_GROUP = "hostpathprovisioner.kubevirt.io"
CR_KIND = "HostPathProvisioner"
CR_VOLUMES_SUBDIR = "csi"  # the operator's layout: volumes of a storage pool live in <path>/csi


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which field and why."""


@dataclass(frozen=True)
class PvcTemplate:
    """What a pool backed by a PVC asks of Kubernetes (OpenShift Virtualization's pools made from PVC templates)."""

    volume_mode: str
    storage_class_name: str | None
    access_modes: tuple[str, ...]
    storage_bytes: int | None

    def describe(self) -> str:
        size = f"{self.storage_bytes} bytes" if self.storage_bytes else "an unspecified size"
        sc = self.storage_class_name or "the default storage class"
        return f"a {self.volume_mode} PVC of {size} from {sc} ({', '.join(self.access_modes) or 'ReadWriteOnce'})"


@dataclass(frozen=True)
class PoolConfig:
    """One storage pool: where its volumes live and, for block-backed pools, what backs it."""

    name: str
    path: Path
    volumes_dir: Path
    device: str | None = None  # a block device holding the pool's filesystem
    size: int | None = None  # create a sparse loop file of this size to back the pool (local use)
    pvc_template: PvcTemplate | None = field(default=None, compare=False)

    @property
    def block_backed(self) -> bool:
        return self.device is not None or self.size is not None or (
            self.pvc_template is not None and self.pvc_template.volume_mode == "Block"
        )


def _require_str(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: '{key}' is required and must be a non-empty string")
    return value


def _parse_pvc_template(raw: Any, where: str) -> PvcTemplate:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}.pvcTemplate must be a mapping (a PersistentVolumeClaim spec)")
    mode = raw.get("volumeMode", "Filesystem")
    if mode not in ("Block", "Filesystem"):
        raise ConfigError(f"{where}.pvcTemplate.volumeMode must be Block or Filesystem, not {mode!r}")
    modes = raw.get("accessModes", ["ReadWriteOnce"])
    if not isinstance(modes, list) or not all(isinstance(m, str) for m in modes):
        raise ConfigError(f"{where}.pvcTemplate.accessModes must be a list of strings")
    resources = raw.get("resources") or {}
    requests = (resources.get("requests") or {}) if isinstance(resources, dict) else None
    if not isinstance(requests, dict):
        raise ConfigError(f"{where}.pvcTemplate.resources.requests must be a mapping such as {{storage: 10Gi}}")
    storage = requests.get("storage")
    try:
        storage_bytes = parse_bytes(storage) if storage is not None else None
    except ValueError as exc:
        raise ConfigError(f"{where}.pvcTemplate.resources.requests.storage: {exc}") from exc
    sc = raw.get("storageClassName")
    return PvcTemplate(mode, sc if isinstance(sc, str) else None, tuple(modes), storage_bytes)


def _parse_pool(entry: Any, where: str, volumes_subdir: str | None) -> PoolConfig:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be an object with 'name' and 'path'")
    name = _require_str(entry, "name", where)
    path = _require_str(entry, "path", where)
    if len(name) > MAX_POOL_NAME:
        raise ConfigError(f"{where}: storage pool name {name!r} is longer than {MAX_POOL_NAME} characters")
    if len(path) > MAX_POOL_PATH:
        raise ConfigError(f"{where}: storage pool path of {name!r} is longer than {MAX_POOL_PATH} characters")
    if not path.startswith("/"):
        raise ConfigError(f"{where}: storage pool path {path!r} of {name!r} must be absolute")
    root = Path(path)
    device = entry.get("device")
    size = entry.get("size")
    try:
        size_bytes = parse_bytes(size) if size is not None else None
    except ValueError as exc:
        raise ConfigError(f"{where}.size: {exc}") from exc
    template = _parse_pvc_template(entry["pvcTemplate"], where) if "pvcTemplate" in entry else None
    block_backed = bool(device or size_bytes or (template and template.volume_mode == "Block"))
    # A block-backed pool's filesystem is mounted at <path>/csi, as the operator's mounter does.
    subdir = volumes_subdir or (CR_VOLUMES_SUBDIR if block_backed else None)
    volumes_dir = root / subdir if subdir else root
    return PoolConfig(name, root, volumes_dir, device if isinstance(device, str) else None, size_bytes, template)


def _check_unique(pools: list[PoolConfig], where: str) -> list[PoolConfig]:
    """`where` names the list in messages ("--datadir", "<file>: spec.storagePools"), with the entries' indexes."""
    names: dict[str, int] = {}
    paths: dict[Path, int] = {}
    for i, pool in enumerate(pools):
        if pool.name in names:
            raise ConfigError(f"{where}[{i}]: storage pool name {pool.name!r} is used more than once (also "
                              f"{where}[{names[pool.name]}]); names must be unique")
        if pool.path in paths:
            raise ConfigError(f"{where}[{i}]: storage pool path {str(pool.path)!r} is used more than once (also "
                              f"{where}[{paths[pool.path]}]); paths must be unique")
        names[pool.name] = i
        paths[pool.path] = i
    if not pools:
        raise ConfigError("no storage pool is configured")
    return pools


def parse_datadir(text: str) -> list[PoolConfig]:
    """HPP's --datadir: a JSON array of {"name", "path"}; volumes live directly under path."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(f"--datadir is not valid JSON ({exc}); expected [{{\"name\": ..., \"path\": ...}}]") from exc
    if not isinstance(raw, list):
        raise ConfigError('--datadir must be a JSON array such as [{"name": "legacy", "path": "/var/hpvolumes"}]')
    return _check_unique([_parse_pool(entry, f"--datadir[{i}]", None) for i, entry in enumerate(raw)], "--datadir")


def parse_cr(text: str, source: str = "config") -> list[PoolConfig]:
    """A HostPathProvisioner CR (YAML or JSON): spec.storagePools, or the legacy spec.pathConfig."""
    import yaml  # only for --config: a --datadir start does not pay for it

    try:
        doc = yaml.safe_load(text)
    # ValueError: a scalar YAML resolves but cannot build (a date like 2001-13-01); RecursionError: deep nesting.
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a {CR_KIND} object")
    api = str(doc.get("apiVersion", ""))
    if api.split("/")[0] != CR_API_GROUP or doc.get("kind") != CR_KIND:
        raise ConfigError(f"{source}: expected apiVersion {CR_API_GROUP}/v1beta1 and kind {CR_KIND}, "
                          f"got {api!r} / {doc.get('kind')!r}")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: spec is required")
    pools, path_config = spec.get("storagePools"), spec.get("pathConfig")
    if pools and path_config:
        raise ConfigError(f"{source}: spec.pathConfig and spec.storagePools cannot both be set; use storagePools")
    if path_config:
        if not isinstance(path_config, dict):
            raise ConfigError(f"{source}: spec.pathConfig must be an object with 'path'")
        legacy = {"name": LEGACY_POOL, "path": _require_str(path_config, "path", f"{source}: spec.pathConfig")}
        return _check_unique([_parse_pool(legacy, f"{source}: spec.pathConfig", CR_VOLUMES_SUBDIR)],
                             f"{source}: spec.pathConfig")
    if not isinstance(pools, list) or not pools:
        raise ConfigError(f"{source}: either spec.storagePools or spec.pathConfig must be set")
    return _check_unique(
        [_parse_pool(p, f"{source}: spec.storagePools[{i}]", CR_VOLUMES_SUBDIR) for i, p in enumerate(pools)],
        f"{source}: spec.storagePools",
    )


def load_cr(path: Path) -> list[PoolConfig]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read --config {path}: {exc.strerror}") from exc
    return parse_cr(text, str(path))

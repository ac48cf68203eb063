"""Which volume capabilities this driver can honour: node-local volumes, one node at a time."""

from __future__ import annotations

from collections.abc import Iterable

from hpp_csi import errors
from hpp_csi.linux.mounts import UnknownMountFlag, bind_flags
from hpp_csi.spec import csi_pb2 as csi

AccessMode = csi.VolumeCapability.AccessMode
SINGLE_NODE_MODES = frozenset(
    {
        AccessMode.SINGLE_NODE_WRITER,
        AccessMode.SINGLE_NODE_READER_ONLY,
        AccessMode.SINGLE_NODE_SINGLE_WRITER,
        AccessMode.SINGLE_NODE_MULTI_WRITER,
    }
)
READ_ONLY_MODES = frozenset({AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.MULTI_NODE_READER_ONLY})


def access_type(capability: csi.VolumeCapability) -> str:
    return capability.WhichOneof("access_type") or ""


def unsupported_reason(capability: csi.VolumeCapability, block_supported: bool) -> str | None:
    """Why a capability cannot be honoured, or None when it can."""
    kind = access_type(capability)
    if kind == "":
        return "volume_capability needs an access_type (mount or block)"
    if kind == "block" and not block_supported:
        return "block access is not supported by this storage pool"
    if kind == "mount":
        try:
            bind_flags(list(capability.mount.mount_flags))
        except UnknownMountFlag as exc:
            return str(exc)
    if not capability.HasField("access_mode") or capability.access_mode.mode == AccessMode.UNKNOWN:
        return "volume_capability needs an access_mode"
    mode = capability.access_mode.mode
    if mode not in SINGLE_NODE_MODES:
        return (
            f"access mode {AccessMode.Mode.Name(mode)} is not supported: volumes are local to one node "
            "(use a SINGLE_NODE_* mode, ReadWriteOnce or ReadWriteOncePod)"
        )
    return None


def check_capabilities(capabilities: Iterable[csi.VolumeCapability], block_supported: bool) -> None:
    """Raise INVALID_ARGUMENT for the first capability the driver cannot honour."""
    caps = list(capabilities)
    if not caps:
        raise errors.invalid_argument("volume_capabilities is required")
    for capability in caps:
        reason = unsupported_reason(capability, block_supported)
        if reason:
            raise errors.invalid_argument(reason)


def requested_mode(capabilities: Iterable[csi.VolumeCapability]) -> str:
    """'block' when any capability asks for block access, else 'mount'."""
    return "block" if any(access_type(c) == "block" for c in capabilities) else "mount"

"""Growing a volume to a CSI capacity range: one rule for NodeExpandVolume (what kubelet calls, on the node that
holds the volume) and ControllerExpandVolume (not advertised; kept for direct callers)."""

from __future__ import annotations

from hpp_csi import errors
from hpp_csi.spec import csi_pb2 as csi
from hpp_csi.storage.store import VolumeRecord
from hpp_csi.storage.volumes import VolumeManager, resolve_capacity


def requested_capacity(capacity_range: csi.CapacityRange) -> int:
    """The size asked for; INVALID_ARGUMENT when the range asks for none or is inconsistent."""
    capacity = resolve_capacity(capacity_range.required_bytes, capacity_range.limit_bytes)
    if capacity <= 0:
        raise errors.invalid_argument("capacity_range must ask for a size")
    return capacity


def grow(manager: VolumeManager, volume_id: str, capacity_range: csi.CapacityRange) -> VolumeRecord:
    """Grow the volume (never shrink it) to what the range asks; the caller holds the volume's lock."""
    capacity = requested_capacity(capacity_range)
    volume = manager.get(volume_id)
    limit = capacity_range.limit_bytes
    if limit and volume.record.capacity_bytes > limit:
        raise errors.out_of_range(
            f"volume {volume_id!r} already holds {volume.record.capacity_bytes} bytes, more than limit_bytes "
            f"{limit}; volumes do not shrink"
        )
    return manager.expand(volume, capacity)

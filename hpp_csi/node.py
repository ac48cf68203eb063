"""CSI Node service: bind mounts of volume directories onto the targets kubelet asks for."""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

import grpc

from hpp_csi import block_publish, errors, loop, mounts, names
from hpp_csi.access import READ_ONLY_MODES, AccessMode, unsupported_reason
from hpp_csi.mounts import MS_RDONLY, bind_flags, bind_mount, is_mount_point, mounts_at, umount, visible_options
from hpp_csi.publications import Publications
from hpp_csi.spec import csi_pb2 as csi
from hpp_csi.spec import csi_pb2_grpc as csi_grpc
from hpp_csi.topology import node_topology
from hpp_csi.volumes import CreateSpec, Volume, VolumeManager

log = logging.getLogger(__name__)

EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
NodeRPC = csi.NodeServiceCapability.RPC
CAPABILITIES = (
    NodeRPC.GET_VOLUME_STATS,
    NodeRPC.VOLUME_CONDITION,
    NodeRPC.SINGLE_NODE_MULTI_WRITER,
    NodeRPC.EXPAND_VOLUME,
)


@dataclass(frozen=True)
class Usage:
    used_bytes: int
    inodes: int


def tree_usage(path: str) -> Usage:
    """Allocated bytes and inodes under `path`, never following a symlink (a pod may plant them)."""
    used, inodes = 0, 0
    stack = [path]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    st = entry.stat(follow_symlinks=False)
                    used += st.st_blocks * 512
                    inodes += 1
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(entry.path)
        except FileNotFoundError:
            continue
    root = os.lstat(path)
    return Usage(used + root.st_blocks * 512, inodes + 1)


def as_mounted(path: str) -> str:
    """`path` as mountinfo names it once mounted: the folders leading to it resolved (kubelet's root dir is
    often reached through a symlink), the last component kept (a symlink there is refused, never followed)."""
    head, tail = os.path.split(path)
    return os.path.join(os.path.realpath(head), tail)


def existing_path(value: str) -> str:
    """A volume path kubelet gives to stats or expansion: NOT_FOUND unless it is absolute and exists (as
    csi-sanity expects for 'some/path')."""
    path = os.path.normpath(value)
    if not os.path.isabs(path) or not os.path.lexists(path):
        raise errors.not_found(f"volume path {value!r} does not exist")
    return path


def open_dir_nofollow(path: str) -> int:
    """An O_PATH handle on a directory that is not a symlink, so a mount cannot be redirected by one."""
    try:
        return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise errors.failed_precondition(f"{path} is a symlink or not a directory; refusing to mount there") \
                from exc
        raise


class NodeService(csi_grpc.NodeServicer):
    def __init__(self, manager: VolumeManager, node_id: str) -> None:
        self.manager = manager
        self.node_id = node_id

    # --- publish --------------------------------------------------------------------------------------------
    def NodePublishVolume(
        self, request: csi.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi.NodePublishVolumeResponse:
        volume_id = names.volume_id(request.volume_id)
        target = names.target_path(request.target_path)
        if not request.HasField("volume_capability"):
            raise errors.invalid_argument("volume_capability is required")
        capability = request.volume_capability
        reason = unsupported_reason(capability, block_supported=True)
        if reason:
            raise errors.invalid_argument(reason)
        flags = bind_flags(list(capability.mount.mount_flags))
        if request.readonly or capability.access_mode.mode in READ_ONLY_MODES:
            flags |= MS_RDONLY
        ephemeral = request.volume_context.get(EPHEMERAL_KEY) == "true"
        kind = "block" if capability.WhichOneof("access_type") == "block" else "mount"
        if ephemeral and kind == "block":
            raise errors.invalid_argument("inline ephemeral volumes are filesystems; block access is not supported")
        with self.manager.locks.hold(volume_id):
            volume = self._ephemeral(volume_id, dict(request.volume_context)) if ephemeral else \
                self.manager.get(volume_id)
            if volume.record.mode != kind:
                raise errors.invalid_argument(
                    f"volume {volume_id!r} is a {volume.record.mode} volume and cannot be published as {kind}"
                )
            try:
                if kind == "block":
                    self._publish_block(volume, target, bool(flags & MS_RDONLY), capability.access_mode.mode)
                else:
                    self._publish(volume, target, flags, capability.access_mode.mode)
            except Exception:
                if ephemeral and not Publications().targets(volume.path):
                    self.manager.delete(volume_id)
                raise
        return csi.NodePublishVolumeResponse()

    def _ephemeral(self, volume_id: str, volume_context: dict[str, str]) -> Volume:
        """Inline ephemeral volumes are created at publish and deleted at unpublish, as HPP does."""
        pool = self.manager.pool_for(volume_context, fallback_to_first=True)
        spec = CreateSpec(volume_id=volume_id, pool=pool, capacity_bytes=0, ephemeral=True)
        volume, created = self.manager.create(spec)
        if not volume.record.ephemeral:
            raise errors.already_exists(f"volume {volume_id!r} exists and is not an ephemeral volume")
        if created:
            log.info("created ephemeral volume %s in pool %s", volume_id, pool.name)
        return volume

    def _publish_block(self, volume: Volume, target: str, read_only: bool, mode: int) -> None:
        if not volume.path.is_file():
            raise errors.not_found(f"block volume {volume.volume_id!r} has no image at {volume.path}")
        if mode == AccessMode.SINGLE_NODE_SINGLE_WRITER and not mounts.is_mount_point(target):
            others = [t for d in loop.devices_backing(volume.path) for t in block_publish.targets_of(d.path)]
            if others:
                raise errors.failed_precondition(
                    f"volume {volume.volume_id!r} is SINGLE_NODE_SINGLE_WRITER and already published at "
                    f"{', '.join(others)}"
                )
        block_publish.publish(volume.path, target, read_only)
        log.info("published block volume %s at %s", volume.volume_id, target)

    def _publish(self, volume: Volume, target: str, flags: int, mode: int) -> None:
        target = as_mounted(target)
        if not volume.exists_on_disk():
            raise errors.not_found(f"volume {volume.volume_id!r} has no data at {volume.path}")
        if is_mount_point(target):
            publications = Publications()
            top = mounts_at(target, publications.table)[-1]
            wanted = visible_options(flags)
            same_source = publications.is_source_of(volume.path, target)
            if same_source and wanted <= top.options and (top.read_only == bool(flags & MS_RDONLY)):
                return
            what = f"volume {volume.volume_id!r}" if same_source else "another volume or filesystem"
            raise errors.already_exists(
                f"{target} is already mounted from {what} with options {','.join(sorted(top.options))}; "
                "unpublish it before publishing with other options"
            )
        if mode == AccessMode.SINGLE_NODE_SINGLE_WRITER:
            others = Publications().targets(volume.path)
            if others:
                raise errors.failed_precondition(
                    f"volume {volume.volume_id!r} is SINGLE_NODE_SINGLE_WRITER and already published at "
                    f"{', '.join(others)}"
                )
        if os.path.lexists(target) and not os.path.isdir(target):
            raise errors.failed_precondition(f"{target} exists and is not a directory; a filesystem volume needs one")
        os.makedirs(target, mode=0o750, exist_ok=True)
        source_fd = open_dir_nofollow(str(volume.path))
        target_fd = open_dir_nofollow(target)
        try:
            bind_mount(f"/proc/self/fd/{source_fd}", f"/proc/self/fd/{target_fd}", flags, remount_at=target)
        finally:
            os.close(source_fd)
            os.close(target_fd)
        log.info("published volume %s at %s%s", volume.volume_id, target, " (read-only)" if flags & MS_RDONLY else "")

    # --- unpublish ------------------------------------------------------------------------------------------
    def NodeUnpublishVolume(
        self, request: csi.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi.NodeUnpublishVolumeResponse:
        volume_id = names.volume_id(request.volume_id)
        target = names.target_path(request.target_path)
        with self.manager.locks.hold(volume_id):
            device = block_publish.device_of_target(target) if is_mount_point(target) else None
            while is_mount_point(target):
                umount(target)
            self._remove_target(target)
            volume = self.manager.find(volume_id)
            if volume is not None and volume.record.mode == "block":
                block_publish.detach_unused(volume.path)  # also one a crash left between attach and mount
            elif device:
                block_publish.release(device)  # the volume is gone: still free its device
            if volume is not None and volume.record.ephemeral and not Publications().targets(volume.path):
                self.manager.delete(volume_id)
                log.info("deleted ephemeral volume %s", volume_id)
        log.info("unpublished volume %s from %s", volume_id, target)
        return csi.NodeUnpublishVolumeResponse()

    @staticmethod
    def _remove_target(target: str) -> None:
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            try:
                os.rmdir(target)
            except OSError as exc:
                if exc.errno == errno.ENOTEMPTY:
                    raise errors.failed_precondition(
                        f"{target} is not a mount point but holds files; refusing to delete them"
                    ) from exc
                raise
        else:
            os.unlink(target)

    # --- stats, info ----------------------------------------------------------------------------------------
    def NodeGetVolumeStats(
        self, request: csi.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi.NodeGetVolumeStatsResponse:
        volume_id = names.volume_id(request.volume_id)
        names.require(request.volume_path, "volume_path")
        volume = self.manager.get(volume_id)
        volume_path = existing_path(request.volume_path)
        if not volume.exists_on_disk():
            condition = csi.VolumeCondition(abnormal=True, message=f"volume data {volume.path} is missing")
            return csi.NodeGetVolumeStatsResponse(volume_condition=condition)
        Unit = csi.VolumeUsage.Unit
        if volume.record.mode == "block":
            device = block_publish.device_of_target(volume_path)
            healthy = device is not None and any(d.path == device for d in loop.devices_backing(volume.path))
            condition = csi.VolumeCondition(
                abnormal=not healthy,
                message="volume is healthy" if healthy else f"{volume_path} is not a published device of the volume",
            )
            size = os.stat(volume.path).st_size
            return csi.NodeGetVolumeStatsResponse(
                usage=[csi.VolumeUsage(unit=Unit.BYTES, total=size)], volume_condition=condition
            )
        fs = volume.pool.capacity()
        capacity = volume.record.capacity_bytes
        if volume.pool.quota and capacity:
            quota = volume.pool.quota_usage(volume.path)
            usage = Usage(quota.used_bytes, quota.inodes)
        else:
            usage = tree_usage(str(volume.path))
        total = capacity or fs.total_bytes
        available = min(max(capacity - usage.used_bytes, 0), fs.available_bytes) if capacity else fs.available_bytes
        if Publications().is_source_of(volume.path, as_mounted(volume_path)) or volume_path == str(volume.path):
            condition = csi.VolumeCondition(abnormal=False, message="volume is healthy")
        else:
            condition = csi.VolumeCondition(abnormal=True, message=f"{volume_path} is not a mount of the volume")
        return csi.NodeGetVolumeStatsResponse(
            usage=[
                csi.VolumeUsage(unit=Unit.BYTES, total=total, used=usage.used_bytes, available=available),
                csi.VolumeUsage(unit=Unit.INODES, total=fs.total_inodes, used=usage.inodes,
                                available=fs.free_inodes),
            ],
            volume_condition=condition,
        )

    def NodeExpandVolume(
        self, request: csi.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi.NodeExpandVolumeResponse:
        volume_id = names.volume_id(request.volume_id)
        names.require(request.volume_path, "volume_path")
        with self.manager.locks.hold(volume_id):
            volume = self.manager.get(volume_id)
            existing_path(request.volume_path)
            if volume.record.mode == "block":
                block_publish.refresh(volume.path)
        return csi.NodeExpandVolumeResponse(capacity_bytes=volume.record.capacity_bytes)

    def NodeGetCapabilities(
        self, request: csi.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi.NodeGetCapabilitiesResponse:
        return csi.NodeGetCapabilitiesResponse(
            capabilities=[csi.NodeServiceCapability(rpc=NodeRPC(type=kind)) for kind in CAPABILITIES]
        )

    def NodeGetInfo(self, request: csi.NodeGetInfoRequest, context: grpc.ServicerContext) -> csi.NodeGetInfoResponse:
        return csi.NodeGetInfoResponse(node_id=self.node_id, accessible_topology=node_topology(self.node_id))

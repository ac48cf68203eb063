"""CSI Node service: bind mounts of volume directories onto the targets kubelet asks for."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat

import grpc

from hpp_csi import errors, names
from hpp_csi.csi.access import READ_ONLY_MODES, AccessMode, unsupported_reason
from hpp_csi.csi.expansion import grow, requested_capacity
from hpp_csi.csi.targets import TargetCheck, nearest_folder, open_folder
from hpp_csi.csi.topology import node_topology
from hpp_csi.linux import mounts
from hpp_csi.linux.mounts import MS_RDONLY, bind_flags, bind_mount, is_mount_point, mounts_at, umount, visible_options
from hpp_csi.linux.safe_open import UnsafePath, open_dir, opened
from hpp_csi.spec import csi_pb2 as csi
from hpp_csi.spec import csi_pb2_grpc as csi_grpc
from hpp_csi.storage import block_publish
from hpp_csi.storage.block_publish import kind_of
from hpp_csi.storage.publications import Publications
from hpp_csi.storage.usage import Usage, tree_usage
from hpp_csi.storage.volumes import CreateSpec, Volume, VolumeManager

log = logging.getLogger(__name__)

EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
NodeRPC = csi.NodeServiceCapability.RPC
CAPABILITIES = (
    NodeRPC.GET_VOLUME_STATS,
    NodeRPC.VOLUME_CONDITION,
    NodeRPC.SINGLE_NODE_MULTI_WRITER,
    NodeRPC.EXPAND_VOLUME,
)



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


def _not_a_volume_dir(volume: Volume, what: str) -> errors.CsiError:
    return errors.failed_precondition(
        f"volume {volume.volume_id!r}: {volume.path} is a {what}, not the directory the driver made; the driver "
        "will not follow or use it: move it away and restore the volume's directory, or delete the volume"
    )


def open_volume_dir(volume: Volume) -> int | None:
    """The filesystem volume's directory opened beneath its pool's descriptor; None when it is missing.
    Something else in its place (a symlink, a file, a FIFO) is FAILED_PRECONDITION: it is never followed."""
    try:
        pool_fd = open_dir(volume.pool.volumes_dir)
    except UnsafePath as exc:
        raise errors.failed_precondition(f"storage pool {volume.pool.name!r}: {exc}") from None
    with opened(pool_fd):
        try:
            st = os.stat(volume.volume_id, dir_fd=pool_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(st.st_mode):  # checked before opening: opening a FIFO or device can block or act
            raise _not_a_volume_dir(volume, kind_of(st.st_mode))
        try:
            return open_dir(volume.volume_id, dir_fd=pool_fd)
        except FileNotFoundError:
            return None
        except UnsafePath:
            raise _not_a_volume_dir(volume, "file of another kind (it was replaced while being opened)") from None



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

    def _target_check(self, target: str) -> TargetCheck:
        return TargetCheck(target, list(self.manager.pools.values()))

    def _publish_block(self, volume: Volume, target: str, read_only: bool, mode: int) -> None:
        if not volume.exists_on_disk():
            raise errors.not_found(f"block volume {volume.volume_id!r} has no image at {volume.path}")
        with opened(block_publish.open_image(volume.path)) as image_fd:
            devices = block_publish.devices_of(volume.path, block_publish.identity_of(image_fd))
        if mode == AccessMode.SINGLE_NODE_SINGLE_WRITER and not mounts.is_mount_point(target):
            others = [t for d in devices for t in block_publish.targets_of(d.path)]
            if others:
                raise errors.failed_precondition(
                    f"volume {volume.volume_id!r} is SINGLE_NODE_SINGLE_WRITER and already published at "
                    f"{', '.join(others)}"
                )
        block_publish.publish(volume.path, target, read_only, self._target_check(target).folder)
        log.info("published block volume %s at %s", volume.volume_id, target)

    def _publish(self, volume: Volume, target: str, flags: int, mode: int) -> None:
        target = as_mounted(target)
        if not volume.exists_on_disk():
            raise errors.not_found(f"volume {volume.volume_id!r} has no data at {volume.path}")
        check = self._target_check(target)
        with opened(open_folder(nearest_folder(os.path.dirname(target)))) as folder_fd:
            # before anything is created: a target inside a pool is refused without leaving a folder there
            check.folder(folder_fd)
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
        created = not os.path.lexists(target)
        os.makedirs(target, mode=0o750, exist_ok=True)
        source_fd = open_volume_dir(volume)
        if source_fd is None:
            raise errors.not_found(f"volume {volume.volume_id!r} has no data at {volume.path}")
        try:
            with opened(open_dir_nofollow(target)) as target_fd:
                try:
                    check.folder(target_fd, is_target=True)  # the folder mounted on, not its name
                except errors.CsiError:
                    if created:
                        with contextlib.suppress(OSError):
                            os.rmdir(target)
                    raise
                try:
                    bind_mount(f"/proc/self/fd/{source_fd}", f"/proc/self/fd/{target_fd}", flags, remount_at=target)
                except FileNotFoundError:
                    raise errors.failed_precondition(
                        f"{target} was removed while it was being published; nothing was mounted, retry"
                    ) from None
        finally:
            os.close(source_fd)
        log.info("published volume %s at %s%s", volume.volume_id, target, " (read-only)" if flags & MS_RDONLY else "")

    # --- unpublish ------------------------------------------------------------------------------------------
    def NodeUnpublishVolume(
        self, request: csi.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi.NodeUnpublishVolumeResponse:
        """Unmount and remove only what this driver published at the target.

        A target with nothing there, or only what the driver leaves behind (an empty folder or empty file), is
        OK: CSI makes unpublish idempotent. Anything else at the target (a mount of another volume or another
        filesystem, a folder with files, a non-empty file, a symlink or special file) answers FAILED_PRECONDITION
        and is left exactly as it is: OK would tell kubelet the target is clean while it still holds someone
        else's data, and kubelet retries and reports the error where a person sees it.
        """
        volume_id = names.volume_id(request.volume_id)
        target = names.target_path(request.target_path)
        with self.manager.locks.hold(volume_id):
            volume = self.manager.find(volume_id)
            while is_mount_point(target):
                if not self._published_here(volume, target):
                    raise errors.failed_precondition(
                        f"{target} is a mount point, but not of volume {volume_id!r} as this driver publishes it; "
                        "refusing to unmount or delete it (unmount it by hand if it is stale)"
                    )
                umount(target)
            self._remove_target(target)
            if volume is not None and volume.record.mode == "block":
                block_publish.detach_unused(volume.path)  # also one a crash left between attach and mount
            if volume is not None and volume.record.ephemeral and not Publications().targets(volume.path):
                self.manager.delete(volume_id)
                log.info("deleted ephemeral volume %s", volume_id)
        log.info("unpublished volume %s from %s", volume_id, target)
        return csi.NodeUnpublishVolumeResponse()

    @staticmethod
    def _published_here(volume: Volume | None, target: str) -> bool:
        """Whether the top mount at `target` is `volume` as published here: its directory (same device and
        inode), or a loop device on its image."""
        if volume is None:
            return False
        if volume.record.mode == "block":
            return block_publish.device_backs(block_publish.device_of_target(target), volume.path,
                                              block_publish.image_identity(volume.path))
        try:
            top = os.stat(target, follow_symlinks=False)
            entry = os.stat(volume.path, follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISDIR(entry.st_mode) and (top.st_dev, top.st_ino) == (entry.st_dev, entry.st_ino)

    @staticmethod
    def _remove_target(target: str) -> None:
        """Remove what publishing created (an empty folder or an empty file); refuse to delete anything else."""
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            try:
                os.rmdir(target)
            except FileNotFoundError:
                return  # removed meanwhile: what was asked is done
            except OSError as exc:
                if exc.errno == errno.ENOTEMPTY:
                    raise errors.failed_precondition(
                        f"{target} is not a mount point but holds files; refusing to delete them"
                    ) from exc
                raise
        elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
        else:
            what = "a non-empty file" if stat.S_ISREG(st.st_mode) else f"a {kind_of(st.st_mode)}"
            raise errors.failed_precondition(
                f"{target} is not a mount point but {what}, which this driver never leaves at a target; "
                "refusing to delete it"
            )

    # --- stats, info ----------------------------------------------------------------------------------------
    def NodeGetVolumeStats(
        self, request: csi.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi.NodeGetVolumeStatsResponse:
        """Usage and condition. Missing data is an abnormal condition; something else in the volume's place in
        the pool (a symlink, FIFO, device) is FAILED_PRECONDITION and is never followed."""
        volume_id = names.volume_id(request.volume_id)
        names.require(request.volume_path, "volume_path")
        volume = self.manager.get(volume_id)
        volume_path = existing_path(request.volume_path)
        if not volume.exists_on_disk():
            condition = csi.VolumeCondition(abnormal=True, message=f"volume data {volume.path} is missing")
            return csi.NodeGetVolumeStatsResponse(volume_condition=condition)
        Unit = csi.VolumeUsage.Unit
        if volume.record.mode == "block":
            with opened(block_publish.open_image(volume.path)) as image_fd:
                size = os.fstat(image_fd).st_size
                ident = block_publish.identity_of(image_fd)
            healthy = block_publish.device_backs(block_publish.device_of_target(volume_path), volume.path, ident)
            condition = csi.VolumeCondition(
                abnormal=not healthy,
                message="volume is healthy" if healthy else f"{volume_path} is not a published device of the volume",
            )
            return csi.NodeGetVolumeStatsResponse(
                usage=[csi.VolumeUsage(unit=Unit.BYTES, total=size)], volume_condition=condition
            )
        volume_fd = open_volume_dir(volume)
        if volume_fd is None:
            condition = csi.VolumeCondition(abnormal=True, message=f"volume data {volume.path} is missing")
            return csi.NodeGetVolumeStatsResponse(volume_condition=condition)
        fs = volume.pool.capacity()
        capacity = volume.record.capacity_bytes
        with opened(volume_fd):
            if volume.pool.quota and capacity:
                quota = volume.pool.quota_usage(volume.path)
                usage = Usage(quota.used_bytes, quota.inodes)
            else:
                usage = tree_usage(volume_fd)
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
        wanted = request.HasField("capacity_range") and (
            request.capacity_range.required_bytes or request.capacity_range.limit_bytes)
        if wanted:
            requested_capacity(request.capacity_range)  # a bad range is refused before the volume is looked up
        with self.manager.locks.hold(volume_id):
            volume = self.manager.get(volume_id)
            existing_path(request.volume_path)
            # kubelet asks for the PV's new size here: the resizer only recorded it (no controller expansion).
            record = grow(self.manager, volume_id, request.capacity_range) if wanted else volume.record
            if record.mode == "block":
                block_publish.refresh(volume.path)
        if wanted:
            log.info("volume %s expanded to %d bytes on node %s", volume_id, record.capacity_bytes, self.node_id)
        return csi.NodeExpandVolumeResponse(capacity_bytes=record.capacity_bytes)

    def NodeGetCapabilities(
        self, request: csi.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi.NodeGetCapabilitiesResponse:
        return csi.NodeGetCapabilitiesResponse(
            capabilities=[csi.NodeServiceCapability(rpc=NodeRPC(type=kind)) for kind in CAPABILITIES]
        )

    def NodeGetInfo(self, request: csi.NodeGetInfoRequest, context: grpc.ServicerContext) -> csi.NodeGetInfoResponse:
        return csi.NodeGetInfoResponse(node_id=self.node_id, accessible_topology=node_topology(self.node_id))

"""`hpp-importer serve`: the node upload daemon, beside the driver, taking uploads into any volume of this node.

Every upload carries `Authorization: Bearer <token>`; the token, signed with the node's key, names the volume.
Each volume with an upload in progress has its own UploadSlot (CDI's upload server state machine), so uploads
into different volumes run side by side and a second one into the same volume is answered 503.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from hpp_csi.storage.pools import StoragePool
from importer.deadline import Deadlines
from importer.errors import ImporterError
from importer.serve import tokens
from importer.serve.resume import DEFAULT_HOLD, upload_id_of
from importer.serve.tls import server_context
from importer.serve.upload_server import (
    POLL_INTERVAL,
    UPLOAD_METHODS,
    UPLOAD_PATHS,
    HealthzHandler,
    QuietServer,
    State,
    UploadHandler,
    UploadJob,
    UploadServerConfig,
    UploadSlot,
    admission_status,
    tls_http_server,
)
from importer.serve.volumes import (
    UPLOADS_DIR,
    NodeVolume,
    VolumeBusy,
    check_free,
    find_volume,
    open_volume_target,
    resume_store_for,
    scratch_dir_for,
)
from importer.target import DEFAULT_FILESYSTEM_OVERHEAD, Target

log = logging.getLogger(__name__)

VOLUME_PARAMETER = "volume"  # ?volume=NAME: optional, must match the token's volume when given
Refusal = tuple[int, str]


@dataclass
class DaemonConfig:
    listen: tuple[str, int]
    pools: list[StoragePool]
    tls_cert: Path
    tls_key: Path
    public_key: Ed25519PublicKey
    healthz: tuple[str, int] | None = None
    filesystem_overhead: float = DEFAULT_FILESYSTEM_OVERHEAD
    scratch_dir: Path | None = None  # None: the volume's pool's staging folder
    deadlines: Deadlines = field(default_factory=Deadlines)
    resume_hold: float = DEFAULT_HOLD


def requested_volume(token: str, query: str) -> str:
    """The volume a request is for: `?volume=` when given, else the one the token names (checked by verify)."""
    named = parse_qs(query).get(VOLUME_PARAMETER)
    if named:
        return named[0]
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as err:
        raise tokens.TokenError(f"the token is not valid: {err}") from None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise tokens.TokenError("the token names no volume")
    return subject


class UploadDaemon:
    """The HTTPS server and one UploadSlot per volume being uploaded into."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._slots: dict[str, tuple[NodeVolume, UploadSlot]] = {}
        self._base = UploadServerConfig(
            listen=config.listen, healthz=config.healthz or ("", 0), open_target=_no_target,
            tls_cert=config.tls_cert, tls_key=config.tls_key, filesystem_overhead=config.filesystem_overhead,
            deadlines=config.deadlines, resume_hold=config.resume_hold,
        )
        # Refused requests still have a body to drain under the same deadlines; this slot never admits one.
        refused = UploadSlot(self._base)
        handler = type("BoundDaemonHandler", (DaemonHandler,), {"app": refused, "daemon": self})
        tls = server_context(config.tls_cert, config.tls_key, None)
        self._servers = [tls_http_server(config.listen, handler, tls)]
        if config.healthz is not None:
            self._servers.append(QuietServer(config.healthz, HealthzHandler))
        self._threads: list[threading.Thread] = []
        self.stopped = threading.Event()

    @property
    def port(self) -> int:
        return int(self._servers[0].server_address[1])

    @property
    def healthz_port(self) -> int | None:
        return int(self._servers[1].server_address[1]) if len(self._servers) > 1 else None

    def start(self) -> None:
        self._sweep()
        for httpd in self._servers:
            thread = threading.Thread(target=httpd.serve_forever, args=(POLL_INTERVAL,), name="http", daemon=True)
            thread.start()
            self._threads.append(thread)

    def run(self) -> None:
        """Serve until stopped (a signal unwinds through here: uploads in progress clean their volumes)."""
        self.start()
        try:
            while not self.stopped.wait(1.0):
                pass
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            slots = [slot for _volume, slot in self._slots.values()]
        for slot in slots:
            slot.cancel()
        for httpd in self._servers:
            if self._threads:
                httpd.shutdown()
            httpd.server_close()
        self._threads.clear()

    def _sweep(self) -> None:
        """What a killed daemon left of uploads that cannot resume is cleaned at start (UploadSlot.sweep)."""
        for pool in self.config.pools:
            try:
                names = os.listdir(pool.store.root / UPLOADS_DIR)
            except OSError:
                continue
            for name in names:
                volume = find_volume(self.config.pools, name.removesuffix(".json"))
                if name.endswith(".json") and volume is not None and volume.pool is pool:
                    try:
                        self._slot_for(volume).sweep()
                    except (OSError, ImporterError, VolumeBusy) as err:
                        log.warning("volume %s: cannot clean what an earlier upload left: %s", volume.volume_id, err)

    # -- called by the handler threads ----------------------------------------------------------------

    def admission(self, authorization: str | None, query: str,
                  upload_id: str | None = None) -> tuple[UploadSlot | None, Refusal | None]:
        """401 for the token, 404 for an unknown volume, 409 for a busy one; else the volume's slot and its answer.

        A request continuing the volume's resumable upload in progress (upload_id) is let through to its slot.
        """
        volume, refusal = self.authorize(authorization, query)
        if volume is None:
            return None, refusal
        slot = self._slot_for(volume)
        if upload_id is not None and slot.resumable_for(upload_id) is not None:
            return slot, None
        with slot.lock:
            busy = admission_status(slot.state)
        if busy is not None:
            return slot, busy
        try:
            check_free(volume, partial_upload=slot.has_record())
        except VolumeBusy as err:
            return None, (409, str(err))
        except OSError as err:  # the mount table or the pool unreadable: not the client's fault
            log.error("cannot check volume %s before an upload: %s", volume.volume_id, err)
            return None, (500, f"cannot check volume {volume.volume_id!r}: {err.strerror or err}")
        return slot, None

    def authorize(self, authorization: str | None, query: str) -> tuple[NodeVolume | None, Refusal | None]:
        """The volume the bearer token allows (401 for the token, 404 for a volume not on this node)."""
        try:
            token = tokens.bearer(authorization)
            volume_id = requested_volume(token, query)
            tokens.verify(self.config.public_key, token, volume_id)
        except tokens.TokenError as err:
            return None, (401, str(err))
        volume = find_volume(self.config.pools, volume_id)
        if volume is None:
            return None, (404, f"volume {volume_id!r} does not exist on this node")
        return volume, None

    def slot_of(self, volume: NodeVolume) -> UploadSlot:
        return self._slot_for(volume)

    def _slot_for(self, volume: NodeVolume) -> UploadSlot:
        """The volume's slot, shared by every request for it so that only one is admitted at a time.

        A slot is replaced only once done (a tenant may have removed the disk since), or when idle and the
        volume changed (grown, or deleted and made again): never while an upload holds it.
        """
        with self._lock:
            known, slot = self._slots.get(volume.volume_id, (None, None))
            if slot is None or slot.state is State.DONE or (slot.state is State.IDLE and known != volume):
                config = dataclasses.replace(
                    self._base, open_target=lambda: open_volume_target(volume),
                    image_size=volume.capacity or None, scratch_dir=scratch_dir_for(volume, self.config.scratch_dir),
                    resume_store=resume_store_for(volume),
                )
                slot = VolumeSlot(config, volume.volume_id)
                self._slots[volume.volume_id] = (volume, slot)
            return slot


class VolumeSlot(UploadSlot):
    """A volume's upload state: unlike the one-shot upload server, the daemon outlives a failed async upload."""

    def __init__(self, config: UploadServerConfig, volume_id: str) -> None:
        super().__init__(config)
        self.volume_id = volume_id

    def _job_ended(self, job: UploadJob) -> None:
        super()._job_ended(job)
        with self.lock:
            if job.handed_off and job.error is not None:
                # answered 200 already, then failed converting: the volume is clean again, open to a new upload
                self.state = State.IDLE
        if job.error is None:
            log.info("volume %s: upload complete", self.volume_id)


def _no_target() -> Target:
    raise AssertionError("a refused request never reaches an import")


class DaemonHandler(UploadHandler):
    """CDI's upload routes, each request bound to the slot of the volume its token names."""

    daemon: UploadDaemon

    def _refusal(self) -> Refusal | None:
        if self.command not in UPLOAD_METHODS or self._route() not in UPLOAD_PATHS:
            return 404, ""
        slot, refusal = self.daemon.admission(self.headers.get("Authorization"), urlsplit(self.path).query,
                                              upload_id_of(self.headers))
        if slot is not None:
            self.app = slot
        if refusal is not None:
            log.info("upload refused with %d: %s", refusal[0], refusal[1])
        return refusal

    def _authorize(self) -> Refusal | None:
        """The token alone (for HEAD with Upload-Id): the request is bound to its volume's slot."""
        volume, refusal = self.daemon.authorize(self.headers.get("Authorization"), urlsplit(self.path).query)
        if volume is not None:
            self.app = self.daemon.slot_of(volume)
        return refusal

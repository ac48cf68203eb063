"""Clone requests on the upload server and the node daemon: CDI's two content types and our sparse one.

A request is a clone when it carries `x-cdi-content-type`. Admission is the upload's (token, volume, busy,
published, already holding a disk); then the body goes to importer.clone.receiver instead of the import.
`GET /v1beta1/upload` with our content type answers what a source must know before a byte moves: the usable
size, the volume mode, and where an interrupted clone of that Upload-Id stands.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from email.message import Message
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from importer.clone.receiver import (
    BLOCKDEVICE_CLONE,
    FILESYSTEM_CLONE,
    CloneResult,
    SparseSession,
    placement,
    receive_cdi,
)
from importer.clone.snappy import SnappyFrameReader
from importer.clone.wire import CONTENT_TYPE, StreamReader
from importer.errors import ChecksumMismatch, ImporterError, InvalidImage
from importer.serve.body import BadRequest, BodyReader
from importer.serve.resume import OFFSET_HEADER, upload_id_of

if TYPE_CHECKING:
    from importer.serve.upload_server import UploadHandler, UploadSlot

log = logging.getLogger(__name__)

CONTENT_TYPE_HEADER = "x-cdi-content-type"
PREALLOCATION_HEADER = "Upload-Preallocation"  # ours: the daemon has no PREALLOCATION of its own
KINDS = (FILESYSTEM_CLONE, BLOCKDEVICE_CLONE, CONTENT_TYPE)
DRAIN_LIMIT, DRAIN_SECONDS = 16 * 1024 * 1024, 5.0


class _Broken(Exception):
    """The connection ended before the end record: a sparse clone is parked for its continuation."""


class _Conflict(Exception):
    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class _Admitting(Protocol):
    def __call__(self, authorization: str | None, query: str) -> tuple[UploadSlot | None, tuple[int, str] | None]:
        ...


def clone_kind(headers: Message) -> str | None:
    value = headers.get(CONTENT_TYPE_HEADER)
    return value.strip().lower() if isinstance(value, str) else None


def _admission(handler: UploadHandler) -> tuple[int, str] | None:
    """The upload's own checks: the daemon's (token, volume, busy, published, holds a disk) or the server's."""
    from importer.serve.upload_server import admission_status

    daemon = getattr(handler, "daemon", None)
    if daemon is not None:
        admit: _Admitting = daemon.admission
        slot, refusal = admit(handler.headers.get("Authorization"), urlsplit(handler.path).query)
        if slot is not None:
            handler.app = slot
        return refusal
    refusal = handler._authorize()
    if refusal is not None:
        return refusal
    with handler.app.lock:
        return admission_status(handler.app.state)


def _parked(slot: UploadSlot, upload_id: str | None) -> SparseSession | None:
    session = getattr(slot, "clone", None)
    if isinstance(session, SparseSession) and upload_id is not None and session.upload_id == upload_id:
        return session
    return None


def _answer(handler: UploadHandler, status: int, text: str, headers: dict[str, str] | None = None) -> None:
    handler._answer(status, text, headers)


def clone_status(handler: UploadHandler) -> None:
    """GET with our content type: 200 and {"capacity", "volumeMode", "offset"}, or the refusal an upload gets."""
    upload_id = upload_id_of(handler.headers)
    refusal = _admission(handler)
    session = _parked(handler.app, upload_id)
    if refusal is not None and not (refusal[0] == 503 and session is not None):
        _answer(handler, *refusal)
        return
    if session is not None:
        if not session.parked:
            _answer(handler, 503, "the clone is still in progress on another connection")
            return
        info = {"capacity": session.place.usable, "volumeMode": "block" if session.place.target.is_block
                else "filesystem", "offset": session.position}
    else:
        cfg = handler.app.config
        target = cfg.open_target()
        try:
            place = placement(target, cfg.image_size, cfg.filesystem_overhead, cfg.preallocation)
            info = {"capacity": place.usable, "volumeMode": "block" if target.is_block else "filesystem",
                    "offset": 0}
        finally:
            target.release()
    body = json.dumps(info)
    with contextlib.suppress(OSError):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body.encode())


def serve_clone(handler: UploadHandler) -> None:
    """POST/PUT with x-cdi-content-type: receive the clone; answered as an upload is (200, 400, 401, 409 ...)."""
    from importer.serve.upload_server import SYNC_PATHS, UPLOAD_METHODS, UPLOAD_PATHS

    handler.close_connection = True
    kind = clone_kind(handler.headers)
    if handler.command not in UPLOAD_METHODS or handler._route() not in UPLOAD_PATHS:
        _answer(handler, 404, "")
        return
    upload_id = upload_id_of(handler.headers)
    refusal = _admission(handler)
    slot = handler.app
    session = _claim(slot, _parked(slot, upload_id)) if kind == CONTENT_TYPE else None
    if refusal is not None and not (refusal[0] == 503 and session is not None):
        _answer(handler, *refusal)
        _drain(handler)
        return
    if handler._route() not in SYNC_PATHS or kind not in KINDS:
        if session is not None:
            _park(slot, session)
        why = "async clone not supported" if kind in KINDS else f"unknown {CONTENT_TYPE_HEADER} {kind!r}"
        _answer(handler, 400, f"Saving stream failed: {why}")
        _drain(handler)
        return
    if session is None:
        busy = slot.admit()
        if busy is not None:
            _answer(handler, *busy)
            _drain(handler)
            return
    try:
        try:
            body = handler._body()
        except BadRequest:
            if session is not None:
                _park(slot, session)  # still held for a well-formed continuation
                _answer(handler, 400, "Saving stream failed: the clone needs a Content-Length or a chunked body")
                return
            raise
        if kind == CONTENT_TYPE:
            result = _receive_sparse(handler, slot, body, session, upload_id)
        else:
            cfg = slot.config
            place = placement(cfg.open_target(), cfg.image_size, cfg.filesystem_overhead, cfg.preallocation)
            result = receive_cdi(kind, SnappyFrameReader(body), place)
    except _Broken as err:
        log.info("clone %s interrupted (%s); it waits %g s to be resumed", upload_id, err, slot.config.resume_hold)
        return
    except _Conflict as err:
        _answer(handler, 409, str(err), {OFFSET_HEADER: str(err.offset)})
        _drain(handler)
        return
    except (BadRequest, InvalidImage, ChecksumMismatch) as err:
        slot.release()
        log.warning("clone refused: %s", err)
        _answer(handler, 400, f"Saving stream failed: {err}")
        _drain(handler)
        return
    except (ImporterError, OSError) as err:
        slot.release()
        log.warning("clone failed: %s", err)
        text = f"{err.strerror or err}" if isinstance(err, OSError) and not isinstance(err, ImporterError) else err
        _answer(handler, 500, f"Saving stream failed: {text}")
        return
    _complete(handler, slot, result)


def _complete(handler: UploadHandler, slot: UploadSlot, result: CloneResult) -> None:
    from importer.serve.upload_server import Outcome, ServerResult, State

    with slot.lock:
        slot.state = State.DONE
    _answer(handler, 200, "")
    log.info("clone complete (%s, %d bytes)", result.kind, result.disk_size)
    slot.outcome = ServerResult(Outcome.COMPLETE, clone=result)
    slot.finished.set()


def _exact(body: BodyReader) -> Callable[[int], bytes]:
    def read(count: int) -> bytes:
        out = bytearray()
        while len(out) < count:
            if not out:  # most reads are whole at once: no copy then
                try:
                    first = body.read(count)
                except BadRequest:
                    raise
                except (OSError, ImporterError) as err:
                    raise _Broken(str(err) or type(err).__name__) from err
                if len(first) == count:
                    return first
                if not first:
                    raise _Broken("the body ended before the clone's end record")
                out += first
                continue
            try:
                piece = body.read(count - len(out))
            except BadRequest:
                raise
            except (OSError, ImporterError) as err:
                raise _Broken(str(err) or type(err).__name__) from err
            if not piece:
                raise _Broken("the body ended before the clone's end record")
            out += piece
        return bytes(out)

    return read


def _receive_sparse(handler: UploadHandler, slot: UploadSlot, body: BodyReader, session: SparseSession | None,
                    upload_id: str | None) -> CloneResult:
    """Our format: a new clone from offset 0, or the continuation of the parked one at its position."""
    if upload_id is None:
        slot.release()  # (a continuation always has one)
        raise BadRequest("a sparse clone needs an Upload-Id")
    reader = StreamReader(_exact(body))
    try:
        header = reader.read_header()
    except (_Broken, BadRequest):
        if session is None:
            slot.release()
        else:
            _park(slot, session)  # parked again, for the next attempt
        raise
    if session is None:
        if header.start != 0:
            slot.release()
            raise _Conflict(f"no interrupted clone {upload_id}; start again from byte 0", 0)
        cfg = slot.config
        asked = (handler.headers.get(PREALLOCATION_HEADER) or "").strip().lower() == "true"
        target = cfg.open_target()
        try:
            place = placement(target, cfg.image_size, cfg.filesystem_overhead, cfg.preallocation or asked)
            session = SparseSession(place, header.manifest, upload_id)
        except BaseException:
            target.release()
            raise
        slot.clone = session
    else:
        if header.manifest != session.manifest or header.start != session.position:
            _park(slot, session)
            raise _Conflict(f"clone {upload_id} continues at byte {session.position}, not {header.start}",
                            session.position)
        log.info("clone %s resumed at byte %d", upload_id, header.start)
    try:
        while True:
            item = reader.next()
            if isinstance(item, bytes):
                result = session.finish(item)
                slot.clone = None
                return result
            session.write(*item)
    except _Broken:
        if slot.cancelled.is_set():
            _drop(slot, session)
            raise ImporterError("the clone was cancelled") from None
        _park(slot, session)
        raise
    except BaseException:
        _drop(slot, session)
        raise


def _claim(slot: UploadSlot, session: SparseSession | None) -> SparseSession | None:
    """The parked clone, taken off its hold for this request; None when there is none or another request has it."""
    if session is None:
        return None
    with slot.lock:
        if slot.clone is not session or not session.parked:
            return None
        session.parked = False
    if session.expiry is not None:
        session.expiry.cancel()
    return session


def _drop(slot: UploadSlot, session: SparseSession) -> None:
    session.abort()
    slot.clone = None


def _park(slot: UploadSlot, session: SparseSession) -> None:
    """Durable up to its position, then held for resume_hold seconds before its target is cleaned."""
    try:
        session.checkpoint()
    except OSError as err:
        log.warning("clone %s cannot be parked: %s", session.upload_id, err)
        _drop(slot, session)
        slot.release()
        return
    session.parked = True
    timer = threading.Timer(slot.config.resume_hold, _expire, args=(slot, session))
    timer.daemon = True
    session.expiry = timer
    timer.start()


def _expire(slot: UploadSlot, session: SparseSession) -> None:
    from importer.serve.upload_server import State

    with slot.lock:
        if slot.clone is not session or not session.parked:
            return
        slot.clone = None
        slot.state = State.IDLE
    log.warning("clone %s was not resumed in time; its target is cleaned", session.upload_id)
    session.abort()


def _drain(handler: UploadHandler) -> None:
    handler._drain_quietly()

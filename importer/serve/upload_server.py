"""`hpp-importer upload-server`: a drop-in for CDI's upload server pod, built on the import phase machine.

One upload at a time is imported exactly like an HTTP import of the same bytes (ImportProcessor over an
UploadSource); the server exits once an upload is complete, or when its deadline passes while idle.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from importer.clone.receiver import CloneResult, SparseSession
from importer.clone.serve import KINDS as CLONE_KINDS
from importer.clone.serve import clone_kind, clone_status, serve_clone
from importer.clone.wire import CONTENT_TYPE as CLONE_CONTENT_TYPE
from importer.deadline import Deadlines, ProgressWatch
from importer.errors import ChecksumMismatch, ConfigError, ImporterError, InvalidImage
from importer.pipeline import Checksum, Reader
from importer.processor import ImportProcessor, ImportRequest, ImportResult
from importer.progress import Progress
from importer.serve.body import BadRequest, BodyReader
from importer.serve.multipart import FormFileReader, boundary_of
from importer.serve.resume import (
    DEFAULT_HOLD,
    ID_HEADER,
    LENGTH_HEADER,
    OFFSET_HEADER,
    OffsetConflict,
    ResumableStream,
    ResumeRequest,
    resume_request,
    upload_id_of,
    wait_for_answer,
)
from importer.serve.resume_state import (
    RAW,
    Destination,
    DurableUpload,
    RecordRefused,
    RecordStore,
    ResumedReader,
    ResumeRecord,
    clean,
    open_prefix,
    restore,
)
from importer.serve.tls import common_names, server_context
from importer.sources.upload import UploadSource
from importer.target import Target

log = logging.getLogger(__name__)

API_VERSIONS = ("v1alpha1", "v1beta1")
SYNC_PATHS = frozenset(f"/{v}/upload" for v in API_VERSIONS)
ASYNC_PATHS = frozenset(f"/{v}/upload-async" for v in API_VERSIONS)
FORM_PATHS = frozenset(f"/{v}/upload-form" for v in API_VERSIONS)
FORM_ASYNC_PATHS = frozenset(f"/{v}/upload-form-async" for v in API_VERSIONS)
UPLOAD_PATHS = SYNC_PATHS | ASYNC_PATHS | FORM_PATHS | FORM_ASYNC_PATHS
UPLOAD_METHODS = ("POST", "PUT")
HEALTHZ_PATH = "/healthz"
# How often the accept loops look for a shutdown: the server exits this soon after its answer (default 0.5 s).
POLL_INTERVAL = 0.05
HEADER_TIMEOUT = 30.0  # TLS handshake and request headers: a silent connection is dropped after this
DRAIN_LIMIT = 16 * 1024 * 1024  # after an early answer, read at most this much of the body so the client sees it
DRAIN_SECONDS = 5.0
CANCEL_GRACE = 10.0  # on SIGTERM, how long an upload in progress gets to clean its target


@dataclass
class UploadServerConfig:
    listen: tuple[str, int]
    healthz: tuple[str, int]
    open_target: Callable[[], Target]  # a fresh target per attempt: a failed upload leaves it clean for the next
    tls_cert: Path
    tls_key: Path
    client_ca: Path | None = None
    client_name: str | None = None
    image_size: int | None = None
    filesystem_overhead: float = 0.055
    preallocation: bool = False
    scratch_dir: Path | None = None
    deadline: datetime.datetime | None = None
    deadlines: Deadlines = field(default_factory=Deadlines)
    progress: Progress | None = None
    resume_hold: float = DEFAULT_HOLD  # how long a broken resumable upload waits for its continuation
    resume_store: RecordStore | None = None  # where the resume record lives; None: no resume after a restart


class State(Enum):
    IDLE = "idle"
    UPLOADING = "uploading"
    PROCESSING = "processing"  # async: the bytes are in, conversion goes on in the background
    DONE = "done"
    CLOSED = "closed"  # the deadline passed while idle


class Outcome(Enum):
    COMPLETE = "complete"
    DEADLINE = "deadline"
    FAILED = "failed"  # an async upload failed after it was answered, or the server was stopped


@dataclass
class ServerResult:
    outcome: Outcome
    result: ImportResult | None = None
    error: str = ""
    clone: CloneResult | None = None  # a clone was received (importer.clone), not an image imported


def admission_status(state: State) -> tuple[int, str] | None:
    """CDI's answer to a new upload in a given state: 503 while busy (or closing), 409 once done."""
    if state in (State.UPLOADING, State.PROCESSING, State.CLOSED):
        return 503, "an upload is already in progress"
    if state is State.DONE:
        return 409, "the upload is already complete"
    return None


def error_status(err: BaseException) -> int:
    """400 for what the client sent (a malformed request, an image refused or too large, a checksum that does not
    match), 500 for the rest."""
    return 400 if isinstance(err, (InvalidImage, BadRequest, ChecksumMismatch)) else 500


class UploadJob:
    """One import of one upload, on its own thread."""

    def __init__(self, request: ImportRequest, wake: threading.Event, on_end: Callable[[UploadJob], None]) -> None:
        self.request = request
        self.wake = wake  # set by the source at the image's last byte, and here when the import ends
        self.result: ImportResult | None = None
        self.error: BaseException | None = None
        self.done = False
        self.handed_off = False  # async: answered 200 before the import ended
        self.ended = threading.Event()
        self._on_end = on_end
        self._thread = threading.Thread(target=self._run, name="upload-import", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def wait(self, async_answer: bool, lost: threading.Event | None = None) -> bool:
        """Until the import ends; for an async upload, only until the last byte of the image is in.

        False when the request's connection lost a resumable upload first (it is parked, or taken over).
        """
        return wait_for_answer(self.wake if async_answer else self.ended, lost)

    def _run(self) -> None:
        try:
            self.result = ImportProcessor(self.request).run()
        except BaseException as err:
            self.error = err
        self._on_end(self)
        self.ended.set()
        self.wake.set()


class UploadSlot:
    """CDI's state machine of one destination around ImportProcessor: idle, uploading, processing, done.

    The upload server has one; the node daemon one per volume with an upload in progress.
    """

    def __init__(self, config: UploadServerConfig) -> None:
        self.config = config
        self.state = State.IDLE
        self.lock = threading.Lock()
        self.finished = threading.Event()
        self.cancelled = threading.Event()
        self.outcome: ServerResult | None = None
        self.job: UploadJob | None = None
        self.resumable: ResumableStream | None = None  # the job's stream, when its upload can be resumed
        self.clone: SparseSession | None = None  # a clone in our format, in progress or parked (importer.clone)

    def cancel(self) -> None:
        """Stopped by a signal: the upload in progress unwinds (its target cleaned) before we go."""
        self.cancelled.set()
        job = self.job
        if job is not None:
            job.join(CANCEL_GRACE)
        clone = self.clone
        if clone is not None and clone.parked:  # one on a connection unwinds at its next read
            clone.abort()

    # -- called by the handler threads ----------------------------------------------------------------

    def admit(self) -> tuple[int, str] | None:
        with self.lock:
            status = admission_status(self.state)
            if status is None:
                self.state = State.UPLOADING
            return status

    def resumable_for(self, upload_id: str) -> ResumableStream | None:
        """The upload in progress when it is the resumable one named upload_id."""
        with self.lock:
            stream = self.resumable
            return stream if stream is not None and stream.upload_id == upload_id else None

    def destination(self) -> Destination | None:
        """Where this slot's resume record lives; None when uploads do not survive a restart here."""
        store = self.config.resume_store
        return Destination(store, self.config.scratch_dir) if store is not None else None

    def restorable(self, upload_id: str, length: int | None) -> ResumeRecord | None:
        """The record of upload_id left by an earlier process, when its prefix can go on; else None, and what a
        refused record named is cleaned. Only while idle: the caller has admitted the request."""
        destination = self.destination()
        if destination is None:
            return None
        target = self.config.open_target()
        try:
            return restore(destination, target, upload_id, length)
        except RecordRefused as err:
            log.warning("upload %s cannot resume after the restart: %s; cleaning what it left", upload_id, err)
            clean(destination, self.config.open_target())
            return None
        finally:
            target.release()

    def has_record(self) -> bool:
        """Whether a resume record (of any upload, readable or not) is at this destination."""
        destination = self.destination()
        try:
            return destination is not None and destination.store.read_bytes() is not None
        except RecordRefused:
            return True  # something is at its name: only a process of ours writes there
        except OSError:
            return False

    def sweep(self) -> None:
        """At start: what a killed process left of an upload that cannot resume (a decoded stream, a record that
        cannot be read) is cleaned now; a resumable one waits for its continuation or the next upload."""
        destination = self.destination()
        if destination is None:
            return
        try:
            record = destination.store.read()
            if record is None or record.resumable:
                return
        except RecordRefused as err:
            log.warning("resume record %s refused: %s", destination.store.name, err)
        except OSError as err:
            log.warning("cannot read resume record %s: %s", destination.store.name, err)
            return
        clean(destination, self.config.open_target())

    def start_job(self, stream: Reader, size: int | None, checksum: str | None = None,
                  restored: ResumeRecord | None = None) -> UploadJob:
        """The import of one upload; restored: it continues the committed prefix an earlier process left."""
        cfg = self.config
        wake = threading.Event()
        target: Target | None = None
        try:
            destination = self.destination()
            if destination is not None and restored is None:
                clean(destination, cfg.open_target())  # a new upload replaces whatever a killed one left
            try:
                expected = Checksum(checksum) if checksum is not None else None
            except ConfigError as err:
                raise BadRequest(str(err)) from err
            durable = None
            target = cfg.open_target()
            if isinstance(stream, ResumableStream) and destination is not None:
                durable = stream.durable = DurableUpload(destination.store, stream.upload_id, stream.length,
                                                         checksum, restored)
            reader: Reader = stream
            if restored is not None and destination is not None and durable is not None:
                if restored.route == RAW and restored.work:
                    target.adopt(restored.work)
                reader = durable.prefix = ResumedReader(open_prefix(destination, target, restored), restored.offset,
                                                        stream)
            request = ImportRequest(
                source=UploadSource(reader, size, received=wake), target=target, image_size=cfg.image_size,
                filesystem_overhead=cfg.filesystem_overhead, preallocation=cfg.preallocation,
                scratch_dir=cfg.scratch_dir, progress=cfg.progress or Progress(), checksum=expected,
                durable=durable,
            )
        except BaseException:
            if isinstance(stream, ResumableStream):
                stream.close()
            if restored is not None and destination is not None:
                with contextlib.suppress(Exception):
                    clean(destination, cfg.open_target())
            if target is not None:
                target.release()
            self.release()
            raise
        job = UploadJob(request, wake, self._job_ended)
        self.job = job
        if isinstance(stream, ResumableStream):
            with self.lock:
                self.resumable = stream
        job.start()
        return job

    def release(self) -> None:
        """An upload that failed while the client waited: the next one may come."""
        with self.lock:
            if self.state is State.UPLOADING:
                self.state = State.IDLE

    def settle(self, job: UploadJob, async_answer: bool) -> None:
        """After the handler's wait: the import ended (either way), or async and the bytes are in."""
        with self.lock:
            if not job.done and async_answer:
                job.handed_off = True
                self.state = State.PROCESSING
            elif job.error is not None:
                self.state = State.IDLE
            else:
                self.state = State.DONE

    def completed(self, job: UploadJob) -> None:
        """The success was answered: the server may stop."""
        self.outcome = ServerResult(Outcome.COMPLETE, job.result)
        self.finished.set()

    def _job_ended(self, job: UploadJob) -> None:
        with self.lock:
            job.done = True
            stream, self.resumable = self.resumable, None
            orphaned = stream is not None and stream.parked  # no request waits to answer: settle here
            if stream is not None:
                stream.close()
            if orphaned and not job.handed_off:
                self._settle_orphan(job)
                return
            if not job.handed_off:
                return  # the waiting handler answers and settles
            if job.error is None:
                self.state = State.DONE
                self.outcome = ServerResult(Outcome.COMPLETE, job.result)
            else:
                log.error("upload failed after it was accepted: %s", job.error)
                self.outcome = ServerResult(Outcome.FAILED, error=_message(job.error))
        self.finished.set()

    def _settle_orphan(self, job: UploadJob) -> None:
        """Under the lock: a resumable upload ended while parked (not resumed in time, or cancelled)."""
        if job.error is not None:
            log.warning("resumable upload failed while interrupted: %s", job.error)
            self.state = State.IDLE  # the target is clean again: the next upload may come
            return
        self.state = State.DONE
        self.outcome = ServerResult(Outcome.COMPLETE, job.result)
        self.finished.set()


def tls_http_server(address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                    tls: ssl.SSLContext) -> QuietServer:
    """An HTTP server whose connections do their TLS handshake on their own thread (UploadHandler.setup)."""
    httpd = QuietServer(address, handler)
    httpd.socket = tls.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    return httpd


class UploadServer(UploadSlot):
    """The upload server pod: one UploadSlot, plus its two HTTP servers."""

    def __init__(self, config: UploadServerConfig) -> None:
        super().__init__(config)
        tls = server_context(config.tls_cert, config.tls_key, config.client_ca)
        handler = type("BoundUploadHandler", (UploadHandler,), {"app": self})
        self._upload_httpd = tls_http_server(config.listen, handler, tls)
        self._healthz_httpd = QuietServer(config.healthz, HealthzHandler)
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return int(self._upload_httpd.server_address[1])

    @property
    def healthz_port(self) -> int:
        return int(self._healthz_httpd.server_address[1])

    def run(self) -> ServerResult:
        """Serve until an upload completes (or fails after its answer) or the deadline passes while idle."""
        self.start()
        try:
            return self.wait()
        except BaseException:
            self.cancel()
            raise
        finally:
            self.close()

    def start(self) -> None:
        self.sweep()
        for httpd in (self._upload_httpd, self._healthz_httpd):
            thread = threading.Thread(target=httpd.serve_forever, args=(POLL_INTERVAL,), name="http", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("upload server on %s:%d, healthz on %s:%d", self.config.listen[0], self.port,
                 self.config.healthz[0], self.healthz_port)

    def wait(self) -> ServerResult:
        while not self.finished.wait(self._wait_slice()):
            if self._deadline_passed() and self._close_if_idle():
                break
        assert self.outcome is not None
        return self.outcome

    def close(self) -> None:
        for httpd in (self._upload_httpd, self._healthz_httpd):
            if self._threads:
                httpd.shutdown()
            httpd.server_close()
        self._threads.clear()

    def _wait_slice(self) -> float:
        deadline = self.config.deadline
        if deadline is None:
            return 1.0
        left = (deadline - datetime.datetime.now(datetime.UTC)).total_seconds()
        return min(1.0, max(0.05, left))

    def _deadline_passed(self) -> bool:
        deadline = self.config.deadline
        return deadline is not None and datetime.datetime.now(datetime.UTC) >= deadline

    def _close_if_idle(self) -> bool:
        # An upload in progress is let finish: its outcome (complete or failed) then decides, not the clock.
        with self.lock:
            if self.state is not State.IDLE:
                return False
            self.state = State.CLOSED
            self.outcome = ServerResult(Outcome.DEADLINE)
            return True


def _message(err: BaseException) -> str:
    if isinstance(err, OSError) and not isinstance(err, ImporterError):
        where = f" ({err.filename})" if err.filename else ""
        return f"{err.strerror or err}{where}"
    return str(err) or type(err).__name__


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: object, client_address: object) -> None:
        err = sys.exc_info()[1]
        log.info("connection from %s ended: %s", client_address, err)


class HealthzHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if urlsplit(self.path).path != HEALTHZ_PATH:
            self._answer(404, b"")
            return
        self._answer(200, b"OK")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("healthz: " + format, *args)


class UploadHandler(BaseHTTPRequestHandler):
    app: UploadSlot
    protocol_version = "HTTP/1.1"
    rbufsize = 0  # headers only through rfile; the body is read from the socket itself (BodyReader)
    timeout = HEADER_TIMEOUT

    def setup(self) -> None:
        super().setup()
        assert isinstance(self.connection, ssl.SSLSocket)
        self.connection.do_handshake()  # here, on the connection's own thread, under HEADER_TIMEOUT

    def log_message(self, format: str, *args: object) -> None:
        log.info(format, *args)

    # -- routing -------------------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        path = self._route()
        if self.headers.get(ID_HEADER) is not None and path in SYNC_PATHS | ASYNC_PATHS:
            self._resume_status()
            return
        self._answer(200 if path in ASYNC_PATHS | FORM_ASYNC_PATHS else 404, "")

    def do_GET(self) -> None:
        if clone_kind(self.headers) == CLONE_CONTENT_TYPE and self._route() in SYNC_PATHS:
            clone_status(self)  # what a clone source asks before a byte moves (importer.clone)
            return
        self._not_found()

    def _not_found(self) -> None:
        self._answer(404, "")

    do_DELETE = do_PATCH = do_OPTIONS = _not_found

    def do_POST(self) -> None:
        self._upload()

    do_PUT = do_POST

    def handle_expect_100(self) -> bool:
        """Refuse before the client sends a byte of the body, when we can."""
        refusal = self._refusal()
        if refusal is not None:
            self.close_connection = True
            self._answer(*refusal)
            return False
        return super().handle_expect_100()

    def _route(self) -> str:
        return urlsplit(self.path).path

    def _refusal(self) -> tuple[int, str] | None:
        """404 for what is not an upload, 401 for a client certificate of the wrong name, 503/409 when busy
        (unless the request continues the resumable upload in progress)."""
        if self.command not in UPLOAD_METHODS or self._route() not in UPLOAD_PATHS:
            return 404, ""
        refusal = self._authorize()
        if refusal is not None:
            return refusal
        upload_id = upload_id_of(self.headers)
        if upload_id is not None and self.app.resumable_for(upload_id) is not None:
            return None
        with self.app.lock:
            return admission_status(self.app.state)

    def _authorize(self) -> tuple[int, str] | None:
        """401 for a client certificate of the wrong name (mutual TLS)."""
        name = self.app.config.client_name
        if name is not None:
            assert isinstance(self.connection, ssl.SSLSocket)
            if name not in common_names(self.connection.getpeercert()):  # type: ignore[arg-type]
                return 401, "client certificate not allowed"
        return None

    # -- resuming ------------------------------------------------------------------------------------

    def _resume_status(self) -> None:
        """HEAD with Upload-Id: where the named upload stands (taking it over from a connection still on it)."""
        refusal = self._authorize()
        if refusal is not None:
            self._answer(*refusal)
            return
        upload_id = upload_id_of(self.headers)
        if upload_id is None:
            self._answer(400, f"{ID_HEADER} must be 8 to 128 characters of A-Z a-z 0-9 . _ -")
            return
        stream = self.app.resumable_for(upload_id)
        if stream is not None:
            offset = stream.take_over()
            self._answer(200, "", {OFFSET_HEADER: str(offset), LENGTH_HEADER: str(stream.length)})
            return
        record = None
        if self.app.admit() is None:  # idle: nothing else may start while the record is read (or cleaned)
            try:
                record = self.app.restorable(upload_id, None)
            finally:
                self.app.release()
        if record is None:
            self._answer(404, f"no interrupted upload {upload_id}")
            return
        self._answer(200, "", {OFFSET_HEADER: str(record.offset), LENGTH_HEADER: str(record.length)})

    def _continue(self, resume: ResumeRequest, async_answer: bool) -> None:
        """A request carrying the rest of a resumable upload from resume.offset."""
        stream = self.app.resumable_for(resume.upload_id)
        try:
            if stream is None:
                raise OffsetConflict(f"no interrupted upload {resume.upload_id}; start again from byte 0", 0)
            if stream.length != resume.length:
                raise OffsetConflict(f"upload {resume.upload_id} is {stream.length} bytes long, not "
                                     f"{resume.length}", stream.offset)
            body = self._body()
            lost = stream.attach(body, resume.offset)
        except OffsetConflict as err:
            self._answer(409, str(err), {OFFSET_HEADER: str(err.expected)})
            self._drain_quietly()
            return
        except BadRequest as err:
            self._answer(400, f"Saving stream failed: {err}")
            return
        job = self.app.job
        assert job is not None
        log.info("upload %s resumed at byte %d of %d", resume.upload_id, resume.offset, resume.length)
        self._finish(job, body, async_answer, lost)

    # -- the upload ----------------------------------------------------------------------------------

    def _upload(self) -> None:
        if clone_kind(self.headers) in CLONE_KINDS:
            serve_clone(self)  # CDI's x-cdi-content-type clones and ours (importer.clone); others: an upload
            return
        self.close_connection = True
        refusal = self._refusal()
        resume: ResumeRequest | None = None
        if refusal is None and self._route() in SYNC_PATHS | ASYNC_PATHS:
            try:
                resume = resume_request(self.headers)
            except BadRequest as err:
                refusal = 400, f"Saving stream failed: {err}"
        if refusal is None and resume is not None and self.app.resumable_for(resume.upload_id) is not None:
            self._continue(resume, self._route() in ASYNC_PATHS)
            return
        if refusal is None:
            refusal = self.app.admit()
        restored = None
        if refusal is None and resume is not None and resume.offset != 0:
            restored = self._restored(resume)
            if restored is None:
                return
        if refusal is not None:
            self._answer(*refusal)
            self._drain_quietly()
            return
        path = self._route()
        async_answer = path in ASYNC_PATHS | FORM_ASYNC_PATHS
        lost: threading.Event | None = None
        try:
            body = self._body()
            stream: Reader = body
            size = body.length
            checksum = None
            if path in FORM_PATHS | FORM_ASYNC_PATHS:
                stream, size = FormFileReader(body, boundary_of(self.headers.get("Content-Type", ""))), None
            elif resume is not None:
                start = restored.offset if restored is not None else 0
                stream = ResumableStream(resume.upload_id, resume.length, self.app.config.resume_hold,
                                         self.app.cancelled, start)
                lost = stream.attach(body, start)
                size = resume.length
                checksum = restored.checksum if restored is not None else resume.checksum
            job = self.app.start_job(stream, size, checksum, restored)
        except BadRequest as err:
            self.app.release()
            self._answer(400, f"Saving stream failed: {err}")
            return
        except ImporterError as err:
            self.app.release()
            self._answer(500, f"Saving stream failed: {err}")
            return
        self._finish(job, body, async_answer, lost)

    def _restored(self, resume: ResumeRequest) -> ResumeRecord | None:
        """Admitted, a continuation that no process here holds: the prefix an earlier process committed, when
        this request continues it; else answered 409 with where to continue (0: start again) and None."""
        try:
            record = self.app.restorable(resume.upload_id, resume.length)
            expected = record.offset if record is not None else 0
            destination = self.app.destination()
            if record is not None and destination is not None and resume.checksum not in (None, record.checksum):
                log.warning("upload %s continues with another checksum than it started with; starting again",
                            resume.upload_id)
                clean(destination, self.app.config.open_target())
                record, expected = None, 0
        except (ImporterError, OSError) as err:
            log.warning("upload %s cannot resume: %s", resume.upload_id, _message(err))
            record, expected = None, 0
        if record is not None and record.offset == resume.offset:
            log.info("upload %s resumed after a restart at byte %d of %d", resume.upload_id, record.offset,
                     record.length)
            return record
        self.app.release()
        self._answer(409, f"upload {resume.upload_id} continues at byte {expected}, not {resume.offset}"
                     if record is not None else f"no interrupted upload {resume.upload_id}; start again from byte 0",
                     {OFFSET_HEADER: str(expected)})
        self._drain_quietly()
        return None

    def _finish(self, job: UploadJob, body: BodyReader, async_answer: bool, lost: threading.Event | None) -> None:
        """Wait for the import (or, async, for the image's last byte), settle the slot and answer."""
        if not job.wait(async_answer, lost):
            log.info("connection lost its upload (interrupted or taken over); the upload waits to be resumed")
            return
        if job.error is None:
            body.drain(DRAIN_LIMIT, DRAIN_SECONDS)  # a form's trailing parts; what the import left unread
        self.app.settle(job, async_answer)
        if job.done and job.error is not None:
            log.warning("upload failed: %s", job.error)
            self._answer(error_status(job.error), f"Saving stream failed: {_message(job.error)}")
            body.drain(DRAIN_LIMIT, DRAIN_SECONDS)
            return
        self._answer(200, "")
        if job.done:
            self.app.completed(job)

    def _body(self) -> BodyReader:
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        length_text = self.headers.get("Content-Length")
        length: int | None = None
        if not chunked:
            if length_text is None or not length_text.strip().isdigit():
                raise BadRequest("the upload needs a Content-Length or a chunked body")
            length = int(length_text)
        watch = ProgressWatch(self.app.config.deadlines)
        return BodyReader(self.connection, length, chunked, watch, self.app.cancelled)

    def _drain_quietly(self) -> None:
        with contextlib.suppress(ImporterError, OSError):
            self._body().drain(DRAIN_LIMIT, DRAIN_SECONDS)

    def _answer(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        body = (text + "\n").encode() if text else b""
        with contextlib.suppress(OSError):
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)


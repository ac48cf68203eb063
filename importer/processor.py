"""The import as an explicit phase machine: info → validate → transfer → convert → resize → complete."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

from hpp_csi.linux.safe_open import open_dir, open_regular, opened
from importer import formats, qcow2, qemu_img
from importer.archive import extract_tar
from importer.deadline import ProcessWatchdog
from importer.errors import ConfigError, ImageTooLarge, InvalidImage, ScratchSpaceRequired, ToolError
from importer.fetch import DEFAULT_CONNECTIONS, Fetcher, plan
from importer.pipeline import (
    CHUNK,
    Checksum,
    CountingReader,
    Layers,
    Reader,
    can_write_through,
    open_layers,
    read_full,
)
from importer.progress import Progress
from importer.qcow2 import Segment
from importer.qcow2_import import Qcow2Import, qcow2_fetcher
from importer.qcow2_stream import Qcow2Stream, disk_size, stream_problem
from importer.qcow2_stream_buffer import DEFAULT_MEMORY_LIMIT, ClusterBuffer
from importer.sources import BlankSource, FileSource, Source, SourceInfo
from importer.target import (
    BackgroundWriter,
    FileTarget,
    Preallocation,
    SparseWriter,
    Target,
    WritebackPacer,
    ZeroPolicy,
    fallocate,
    preallocate_file,
    usable_size,
)

log = logging.getLogger(__name__)

INFO_TIMEOUT = 60.0
CHECK_TIMEOUT = 300.0  # check reads all metadata: about 1 MiB of L2 tables per 8 GiB of a qcow2
# Limits for `qemu-img info` on untrusted images, as OpenStack applies them (crafted headers can eat memory/CPU).
INFO_ADDRESS_SPACE = 1024 * 1024 * 1024
INFO_CPU_SECONDS = 30
SCRATCH_RESERVE = 0.02  # keep 2% of scratch free: a full scratch volume makes every later error confusing


class Phase(Enum):
    INFO = "info"
    VALIDATE = "validate"
    TRANSFER = "transfer"
    CONVERT = "convert"
    RESIZE = "resize"
    COMPLETE = "complete"


class Route(Enum):
    """How the bytes travel; see docs/importer.md for the matrix."""

    BLANK = "blank"  # no source: an empty disk of the usable size
    STREAM = "stream"  # raw or qcow2, possibly compressed: decoded straight into the target, no qemu-img
    DIRECT = "direct"  # a convertible format qemu-img reads in place (local file, or HTTP Range via nbdkit)
    SCRATCH = "scratch"  # a convertible format that cannot be read in place: download to scratch, then convert
    ARCHIVE = "archive"  # a tar extracted into the directory


def choose_route(fmt: str, compressed: bool, random_access: bool, hash_before_convert: bool) -> Route:
    """The route for an image whose innermost format is fmt (plain decision, tested directly)."""
    if not formats.is_convertible(fmt):
        return Route.STREAM
    if compressed or not random_access or hash_before_convert:
        return Route.SCRATCH
    return Route.DIRECT


def scratch_reason(fmt: str, compressions: list[str], random_access: bool,
                   sequential_reason: str = Source.sequential_reason) -> str:
    if compressions:
        return f"a {'+'.join(compressions)}-compressed {fmt} image must be decompressed before conversion"
    if not random_access:
        return f"{sequential_reason}, so the {fmt} image must be stored first"
    return f"the {fmt} image must be downloaded and its checksum verified before conversion"


class DurableWork(Protocol):
    """A resumable upload's bytes on disk, kept across a server restart (importer/serve/resume_state.py)."""

    offset: int  # bytes of the image an earlier process left in the work file (0: a fresh upload)
    scratch_name: str | None  # that work file, when it is a scratch file

    def attach(self, route: Route, resumable: bool, work: Path, fd: int, writer: SparseWriter | None) -> None:
        """The import writes work through fd (and writer, when the bytes land as they arrive); raises when a
        resumed upload's bytes no longer take the route they took before."""


@dataclass
class ImportRequest:
    source: Source
    target: Target
    content_type: str = "kubevirt"
    image_size: int | None = None
    filesystem_overhead: float = 0.055
    preallocation: bool = False
    scratch_dir: Path | None = None
    checksum: Checksum | None = None
    progress: Progress = field(default_factory=Progress)
    info_timeout: float = INFO_TIMEOUT
    qcow2_reader: str = "native"  # or "qemu-img": who converts a qcow2 read in place
    connections: int = DEFAULT_CONNECTIONS
    durable: DurableWork | None = None  # a resumable upload: its record follows what reaches the disk
    stream_qcow2: bool = True  # a qcow2 read in order is placed as it passes (False: stored in scratch first)
    qcow2_stream_memory: int = DEFAULT_MEMORY_LIMIT  # clusters waiting for their L2 table, before scratch


@dataclass
class ImportResult:
    route: Route
    fmt: str
    compressions: list[str]
    virtual_size: int
    usable_size: int
    preallocation: Preallocation
    scratch_used: bool
    dest: Path
    source_bytes: int
    reader: str = ""  # how the bytes were read: "native"/"qemu-img" (qcow2 in place), "ranges" (raw in parts),
    # "qcow2-stream" (qcow2 in order)
    scratch_bytes: int = 0  # peak bytes a streamed qcow2 kept in scratch (clusters ahead of their L2 table)

    @property
    def preallocation_applied(self) -> bool:
        return self.preallocation is not Preallocation.NONE


class ImportProcessor:
    """Runs one import; every phase method returns the next phase, failures unwind through abort()."""

    def __init__(self, request: ImportRequest) -> None:
        self.req = request
        self.phase = Phase.INFO
        self._stack = contextlib.ExitStack()
        self._workdir = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="hpp-importer-")))
        self.info: SourceInfo | None = None
        self.route = Route.STREAM
        self.fmt = formats.RAW
        self.layers: Layers | None = None
        self.counter: CountingReader | None = None
        self.qemu_input = ""
        self.usable = 0
        self.virtual_size = 0
        self.work: Path | None = None
        self.scratch_file: Path | None = None
        self.applied = Preallocation.NONE
        self.reader = ""
        self.qcow2_header: qcow2.Header | None = None
        self.scratch_bytes = 0
        self._source_percent = self.req.progress.range(0, 100)

    def run(self) -> ImportResult:
        steps = {
            Phase.INFO: self._info,
            Phase.VALIDATE: self._validate,
            Phase.TRANSFER: self._transfer,
            Phase.CONVERT: self._convert,
            Phase.RESIZE: self._resize,
        }
        try:
            while self.phase is not Phase.COMPLETE:
                log.debug("phase %s", self.phase.value)
                self.phase = steps[self.phase]()
            self.req.target.commit()
            self.req.progress.done()
        except BaseException:
            self.req.target.abort()
            raise
        finally:
            if self.layers is not None:
                self.layers.close()
            if self.scratch_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.scratch_file.unlink()
            self._stack.close()
        return ImportResult(
            route=self.route,
            fmt=self.fmt,
            compressions=self.layers.compressions if self.layers else [],
            virtual_size=self.virtual_size,
            usable_size=self.usable,
            preallocation=self.applied,
            scratch_used=self.route is Route.SCRATCH or self.scratch_bytes > 0,
            dest=getattr(self.req.target, "final", self.req.target.path),
            source_bytes=self.counter.count if self.counter else 0,
            reader=self.reader,
            scratch_bytes=self.scratch_bytes,
        )

    # -- phases ---------------------------------------------------------------------------------------

    def _info(self) -> Phase:
        req = self.req
        self.info = info = req.source.probe()
        if isinstance(req.source, BlankSource):
            self.route = Route.BLANK
            return Phase.VALIDATE
        outer = formats.sniff(info.header)
        hash_first = req.checksum is not None and not isinstance(req.source, FileSource)
        if req.content_type == "kubevirt" and formats.is_convertible(outer):
            self.fmt = outer
            self.route = choose_route(outer, False, info.random_access, hash_first)
            if self.route is Route.DIRECT:
                self.qemu_input = req.source.qemu_input(self._stack, self._workdir)
                self._choose_reader(info.header, info.size)
                return Phase.VALIDATE
        if (req.content_type == "kubevirt" and outer == formats.RAW and info.random_access and info.size
                and req.checksum is None):
            # Plain raw that can be read at offsets: parallel Range requests (a checksum needs the bytes in order).
            self.route, self.reader = Route.STREAM, "ranges"
            return Phase.VALIDATE
        # Everything else is read as a stream; peeling the compression layers reads only a few KiB.
        self.counter = CountingReader(req.source.open(), req.checksum, self._on_source_bytes)
        self.layers = open_layers(self.counter)
        self.fmt = self.layers.fmt
        if req.content_type == "archive":
            self.route = Route.ARCHIVE
        else:
            compressed = bool(self.layers.compressions)
            self.route = choose_route(self.fmt, compressed, info.random_access, hash_first)
            if self.route is Route.SCRATCH and self.fmt == "qcow2" and req.stream_qcow2:
                # Placed cluster by cluster as it passes: no scratch unless clusters come before their tables.
                self.route, self.reader = Route.STREAM, "qcow2-stream"
                self.qcow2_header = qcow2.parse_header(self.layers.header)
        if self.route is Route.SCRATCH and req.scratch_dir is None:
            raise ScratchSpaceRequired(scratch_reason(self.fmt, self.layers.compressions, info.random_access,
                                                      req.source.sequential_reason))
        return Phase.VALIDATE

    def _validate(self) -> Phase:
        req = self.req
        overhead = req.target.overhead(req.filesystem_overhead)
        self.usable = usable_size(req.target.available(), req.image_size, overhead)
        if self.usable <= 0:
            raise ImageTooLarge(0, self.usable)
        if self.route is Route.BLANK:
            self.virtual_size = self.usable
            return Phase.RESIZE
        if self.route is Route.ARCHIVE:
            if req.target.is_block:
                raise ConfigError("content type 'archive' needs a directory destination, not a block device")
            if self.fmt != formats.TAR:
                raise InvalidImage(f"content type 'archive' expects a tar archive, but the data is {self.fmt}")
            return Phase.TRANSFER
        header = self.layers.header if self.layers else (self.info.header if self.info else b"")
        formats.check_header(self.fmt, header)
        if self.reader == "qcow2-stream":
            assert self.qcow2_header is not None
            problem = stream_problem(self.qcow2_header)
            if problem is not None:
                raise InvalidImage(f"corrupt qcow2 image: {problem}")
            self.virtual_size = disk_size(self.qcow2_header)
            if self.virtual_size > self.usable:
                raise ImageTooLarge(self.virtual_size, self.usable)
        elif self.route is Route.DIRECT:
            self._check_image(self.qemu_input, consistency=self.reader != "native")
        elif self.route is Route.STREAM and self.info and self.info.size is not None and not self.layers_compressed:
            self.virtual_size = self.info.size
            if self.virtual_size > self.usable:
                raise ImageTooLarge(self.virtual_size, self.usable)
        return Phase.TRANSFER

    def _transfer(self) -> Phase:
        if self.route is Route.STREAM:
            if self.reader == "ranges":
                self._fetch_raw()
            elif self.reader == "qcow2-stream":
                self._stream_qcow2()
            else:
                self._stream_into_target()
            return Phase.RESIZE
        if self.route is Route.SCRATCH:
            self._download_to_scratch()
            return Phase.CONVERT
        if self.route is Route.ARCHIVE:
            self._extract_archive()
            return Phase.COMPLETE
        if self.reader == "native":
            self._read_qcow2()
            return Phase.RESIZE
        if self.req.checksum is not None:  # DIRECT from a local file: hash it in place before converting
            with contextlib.closing(CountingReader(self.req.source.open(), self.req.checksum, lambda n: None)) as r:
                while r.read(CHUNK):
                    pass
            self.req.checksum.verify()
        return Phase.CONVERT

    def _convert(self) -> Phase:
        req = self.req
        source = self.qemu_input if self.route is Route.DIRECT else str(self.scratch_file)
        self.work = req.target.begin()
        prealloc = None
        if req.preallocation and not req.target.is_block:
            prealloc = "falloc" if fallocate_supported(req.target.path) else "full"
            self.applied = Preallocation(prealloc)
        cmd = qemu_img.convert_command(source, self.fmt, str(self.work), preallocation=prealloc,
                                       dest_is_block=req.target.is_block)
        progress = req.progress.range(50, 100) if self.route is Route.SCRATCH else req.progress.range(0, 100)
        with WritebackPacer(self.work):
            run_with_progress(cmd, progress.set, self._watchdog)
        return Phase.RESIZE

    def _resize(self) -> Phase:
        req = self.req
        if self.work is None:  # blank
            self.work = req.target.begin()
            if not req.target.is_block:
                os.close(os.open(self.work, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o660))
        written = 0 if self.route is Route.BLANK else self.virtual_size
        applied = req.target.finish_size(self.work, self.usable, req.preallocation, written)
        if req.preallocation:
            self.applied = applied if self.applied is Preallocation.NONE else self.applied
        return Phase.COMPLETE

    # -- helpers --------------------------------------------------------------------------------------

    @property
    def _resumed(self) -> int:
        return self.req.durable.offset if self.req.durable is not None else 0

    @property
    def layers_compressed(self) -> bool:
        return bool(self.layers and self.layers.compressions)

    def _on_source_bytes(self, count: int) -> None:
        size = self.info.size if self.info else None
        if size:
            self._source_percent.set(100.0 * count / size)

    def _choose_reader(self, header: bytes, size: int | None) -> None:
        """Our qcow2 reader where it knows the image, else qemu-img (which also words the errors better)."""
        if self.fmt != "qcow2":
            return
        self.reader = "qemu-img"
        if self.req.qcow2_reader != "native" or size is None:
            return
        parsed = qcow2.parse_header(header)
        reason = qcow2.unsupported(parsed)
        if reason is not None:
            log.info("qcow2 with %s: converting with qemu-img", reason)
            return
        self.reader, self.qcow2_header = "native", parsed

    def _open_work(self) -> tuple[int, Path]:
        """The target opened for writing (a new temporary file, or the device), preallocated when asked."""
        req = self.req
        self.work = work = req.target.begin()
        resumed = self._resumed
        fd = req.target.open_work(work, create=not resumed)
        try:
            if resumed and not req.target.is_block:
                os.ftruncate(fd, resumed)  # what followed the last commit may differ from what comes now
            if req.preallocation and not req.target.is_block:
                self.applied = preallocate_file(fd, 0, self.usable)
            elif req.preallocation:
                self.applied = Preallocation.FULL
        except BaseException:
            os.close(fd)
            raise
        return fd, work

    def _read_qcow2(self) -> None:
        """The direct route for a qcow2 we can read: tables checked, then clusters fetched in parallel."""
        req = self.req
        assert self.qcow2_header is not None and self.info is not None and self.info.size is not None
        fd, work = self._open_work()
        writer = SparseWriter(fd, req.target.zero_policy(self.applied), self.usable)
        fetcher = qcow2_fetcher(req.source, self.qcow2_header, writer, req.connections)
        try:
            with WritebackPacer(work):
                Qcow2Import(req.source, self.qcow2_header, self.info.size, writer, fetcher,
                            req.progress.range(0, 100).set).run()
            if not req.target.is_block and not req.preallocation:
                os.ftruncate(fd, self.virtual_size)
        finally:
            fetcher.close(then=functools.partial(os.close, fd))  # after a failure, once no thread writes

    def _fetch_raw(self) -> None:
        """An uncompressed raw image from a source with Range support: fetched in parallel parts, holes kept."""
        req = self.req
        assert self.info is not None and self.info.size is not None
        size = self.info.size
        fd, work = self._open_work()
        writer = SparseWriter(fd, req.target.zero_policy(self.applied), self.usable)
        percent = req.progress.range(0, 100).set
        fetcher = Fetcher(req.source, writer, _no_compressed_segments, req.connections,
                          lambda done: percent(100.0 * done / size))
        try:
            with WritebackPacer(work):
                fetcher.run(plan([Segment(0, size, 0, size)]))
            if not req.target.is_block and not req.preallocation:
                os.ftruncate(fd, size)
        finally:
            fetcher.close(then=functools.partial(os.close, fd))  # after a failure, once no thread writes

    def _check_image(self, source: str, consistency: bool = True) -> None:
        """qemu-img info under limits, then the whitelist, the security checks and the size check.

        consistency=False skips `qemu-img check`: our qcow2 reader checks every table entry against the file
        size itself, which is what check is here for.
        """
        cmd = qemu_img.info_command(source, self.fmt)
        try:
            done = self._run_tool(cmd, self.req.info_timeout)
        except subprocess.TimeoutExpired as err:
            raise InvalidImage(f"qemu-img info did not finish within {self.req.info_timeout:.0f}s") from err
        if done.returncode != 0:
            raise InvalidImage(f"not a valid {self.fmt} image: {_last_line(done.stderr)}")
        info = qemu_img.parse_info(done.stdout.decode())
        if info.format not in formats.ALLOWED_QEMU_FORMATS:
            raise InvalidImage(f"image format {info.format} is not allowed (allowed: {formats.ALLOWED_QEMU_FORMATS})")
        if info.backing_file:
            raise InvalidImage(f"image has a backing file ({info.backing_file}); refusing it")
        if info.data_file:
            raise InvalidImage(f"image has an external data file ({info.data_file}); refusing it")
        if info.encrypted:
            raise InvalidImage("image is encrypted; encrypted images are not supported")
        self.virtual_size = info.virtual_size
        if info.virtual_size > self.usable:
            raise ImageTooLarge(info.virtual_size, self.usable)
        if not consistency:
            return
        # qemu-img reads past the end of a local file as zeros: a truncated image would convert "successfully".
        try:
            done = self._run_tool(qemu_img.check_command(source, self.fmt), CHECK_TIMEOUT)
        except subprocess.TimeoutExpired as err:
            raise InvalidImage(f"qemu-img check did not finish within {CHECK_TIMEOUT:.0f}s") from err
        problem = qemu_img.check_problem(done.returncode, done.stdout.decode(errors="replace"),
                                         done.stderr.decode(errors="replace"))
        if problem:
            raise InvalidImage(f"{self.fmt} image failed its consistency check: {problem}")

    def _watchdog(self, proc: subprocess.Popen[bytes]) -> ProcessWatchdog:
        """Ends a qemu-img reading the source through nbdkit when the source stops making progress."""
        served = getattr(self.req.source, "served", None)
        if self.route is not Route.DIRECT or served is None:
            return ProcessWatchdog(proc, None, None)
        return ProcessWatchdog(proc, self.req.source.watch, served.poll)

    def _run_tool(self, cmd: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
        """qemu-img info/check under limits and a timeout, watched like the transfer itself."""
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_info_limits)
        with self._watchdog(proc) as watchdog:
            try:
                out, err = proc.communicate(timeout=timeout)
            except BaseException:
                proc.kill()
                proc.communicate()
                raise
        watchdog.raise_if_fired()
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def _stream_into_target(self) -> None:
        req = self.req
        assert self.layers is not None
        fd, work = self._open_work()
        try:
            compressions = self.layers.compressions
            if not req.target.is_block and not req.preallocation and compressions \
                    and can_write_through(compressions[-1]):
                # xz/zstd write the file (holes included) themselves: no decompressed byte crosses Python.
                if req.durable is not None:
                    req.durable.attach(Route.STREAM, False, work, fd, None)
                with WritebackPacer(work):
                    self.layers.decompress_into(fd, self.usable)
                self.virtual_size = os.fstat(fd).st_size
            else:
                writer = SparseWriter(fd, req.target.zero_policy(self.applied), self.usable, self._resumed)
                if req.durable is not None:
                    req.durable.attach(Route.STREAM, not compressions, work, fd, writer)
                copy(self.layers.open(), writer)
                if not req.target.is_block and not req.preallocation:
                    os.ftruncate(fd, writer.offset)
                self.virtual_size = writer.offset
            if req.checksum is not None:
                req.checksum.verify()
        finally:
            os.close(fd)

    def _stream_qcow2(self) -> None:
        """A qcow2 read in order: each cluster written where its L2 entry says, as it passes."""
        req = self.req
        assert self.layers is not None and self.qcow2_header is not None
        fd, work = self._open_work()
        try:
            writer = SparseWriter(fd, req.target.zero_policy(self.applied), self.usable)
            if req.durable is not None:  # clusters land out of order: no prefix to resume from
                req.durable.attach(Route.STREAM, False, work, fd, None)
            buffer = ClusterBuffer(self.qcow2_header.cluster_size, req.qcow2_stream_memory, req.scratch_dir)
            try:
                with WritebackPacer(work):
                    stats = Qcow2Stream(self.qcow2_header, self.layers.open(), writer, buffer).run()
            finally:
                buffer.close()  # the spill file has no name: closing it frees its space
            self.scratch_bytes = stats.peak_scratch
            if stats.peak_memory or stats.peak_scratch:
                log.info("qcow2 stream: %d clusters arrived before their L2 tables (peak %d bytes in memory, %d in "
                         "scratch)", stats.buffered_clusters, stats.peak_memory, stats.peak_scratch)
            if not req.target.is_block and not req.preallocation:
                os.ftruncate(fd, self.virtual_size)
            if req.checksum is not None:
                req.checksum.verify()
        finally:
            os.close(fd)

    def _download_to_scratch(self) -> None:
        req = self.req
        assert self.layers is not None and req.scratch_dir is not None
        if not req.scratch_dir.is_dir():
            raise ConfigError(f"scratch directory {req.scratch_dir} does not exist")
        st = os.statvfs(req.scratch_dir)
        limit = int(st.f_bavail * st.f_frsize * (1 - SCRATCH_RESERVE))
        resumed, durable = self._resumed, req.durable
        name = durable.scratch_name if durable is not None and resumed and durable.scratch_name else None
        self.scratch_file = req.scratch_dir / (name or f"hpp-import-{uuid.uuid4().hex[:12]}.{self.fmt}")
        self._source_percent = req.progress.range(0, 50)
        flags = os.O_WRONLY if name else os.O_WRONLY | os.O_CREAT | os.O_EXCL
        with opened(os.open(req.scratch_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)) as scratch_fd:
            fd = open_regular(scratch_fd, self.scratch_file.name, flags, 0o600)
        try:
            if name:
                os.ftruncate(fd, resumed)  # what followed the last commit may differ from what comes now
            writer = SparseWriter(fd, ZeroPolicy.SKIP, limit, resumed)
            if durable is not None:
                durable.attach(Route.SCRATCH, not self.layers.compressions, self.scratch_file, fd, writer)
            try:
                copy(self.layers.open(), writer)
            except ImageTooLarge as err:
                raise InvalidImage(
                    f"the downloaded image does not fit in scratch space {req.scratch_dir} ({limit} bytes usable)"
                ) from err
            os.ftruncate(fd, writer.offset)
        finally:
            os.close(fd)
        if req.checksum is not None:
            req.checksum.verify()
        with open(self.scratch_file, "rb") as f:
            formats.check_header(self.fmt, f.read(formats.HEADER_SIZE))
        self._check_image(str(self.scratch_file))

    def _extract_archive(self) -> None:
        req = self.req
        assert self.layers is not None and isinstance(req.target, FileTarget)
        dest_fd = open_dir(req.target.path)
        try:
            extraction = extract_tar(self.layers.open(), dest_fd, self.usable)
            try:
                if req.checksum is not None:
                    req.checksum.verify()
            except BaseException:
                extraction.undo()
                raise
        finally:
            os.close(dest_fd)


def _no_compressed_segments(data: bytes, segment: Segment) -> bytes:
    raise AssertionError("a raw image has no compressed segments")


def copy(reader: Reader, writer: SparseWriter) -> None:
    with BackgroundWriter(writer) as background:
        while chunk := read_full(reader, CHUNK):
            background.write(chunk)


def fallocate_supported(directory: Path) -> bool:
    """Whether the filesystem holding directory implements fallocate(2) (so preallocation=falloc works)."""
    with tempfile.TemporaryFile(dir=directory) as probe:
        try:
            fallocate(probe.fileno(), 0, 0, 4096)
            return True
        except OSError:
            return False


def run_with_progress(cmd: list[str], on_percent: Callable[[float], None],
                      watchdog: Callable[[subprocess.Popen[bytes]], ProcessWatchdog] | None = None) -> None:
    """Run qemu-img convert -p, forwarding its percentages; a failure carries qemu-img's last error line.

    watchdog, when given, kills it once the source stops making progress, and its reason wins.
    """
    log.debug("running %s", " ".join(cmd))
    with tempfile.TemporaryFile() as stderr:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
        except OSError as err:
            raise ToolError(f"cannot run {cmd[0]}: {err}") from err
        assert proc.stdout is not None
        guard = watchdog(proc) if watchdog is not None else ProcessWatchdog(proc, None, None)
        try:
            with guard:
                while data := os.read(proc.stdout.fileno(), 4096):
                    percent = qemu_img.parse_progress(data)
                    if percent is not None:
                        on_percent(percent)
                proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
        guard.raise_if_fired()
        if proc.returncode != 0:
            stderr.seek(0)
            raise ToolError(f"{cmd[0]} {cmd[1]} failed: {_last_line(stderr.read())}")


def _info_limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (INFO_ADDRESS_SPACE, INFO_ADDRESS_SPACE))
    resource.setrlimit(resource.RLIMIT_CPU, (INFO_CPU_SECONDS, INFO_CPU_SECONDS))


def _last_line(output: bytes) -> str:
    lines = output.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no error output"

"""One blob as a verified stream: every byte hashed, size and digest checked at the end, resumed with Range."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time

import urllib3
from urllib3.exceptions import HTTPError

from importer.deadline import ProgressWatch
from importer.registry.errors import RegistryError
from importer.registry.manifests import Descriptor
from importer.registry.transport import Transport, describe, error_detail

log = logging.getLogger(__name__)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class BlobMismatch(RegistryError):
    """The blob's bytes are not what its descriptor promised (digest or size)."""


class _Broken(Exception):
    """The connection broke mid-blob; resumable."""


class BlobReader:
    """Reads a blob's raw (still compressed) bytes; never returns b"" before they are proven to be the blob."""

    def __init__(self, transport: Transport, repository: str, descriptor: Descriptor, watch: ProgressWatch) -> None:
        self._transport, self._descriptor, self._watch = transport, descriptor, watch
        self._path = f"/v2/{repository}/blobs/{descriptor.digest}"
        self._what = f"blob {descriptor.digest} of {transport.host}/{repository}"
        self._hash = hashlib.sha256()
        self._resp: urllib3.BaseHTTPResponse | None = None
        self._pos = 0
        self._failures = 0
        self._verified = False

    @property
    def position(self) -> int:
        return self._pos

    def read(self, size: int, /) -> bytes:
        opts = self._transport.options
        while True:
            try:
                if self._verified:
                    return b""
                if self._resp is None:
                    self._connect()
                assert self._resp is not None
                try:
                    data = self._resp.read1(size)
                except HTTPError as err:
                    raise _Broken(describe(err, f"{self._transport.base}{self._path}", opts.io_timeout)) from err
                if data:
                    return self._take(data)
                if self._pos < self._descriptor.size:
                    raise _Broken(f"connection closed after {self._pos} of {self._descriptor.size} bytes")
                self._verify()
                return b""
            except _Broken as err:
                self._drop()
                self._watch.check()
                self._failures += 1
                if self._failures > opts.retries:
                    raise RegistryError(f"download of {self._what} failed after {self._pos} of "
                                        f"{self._descriptor.size} bytes and {opts.retries} retries: {err}") from err
                delay = min(opts.retry_delay * 2 ** (self._failures - 1), max(0.0, self._watch.stall_left()))
                log.warning("%s interrupted at byte %d (%s); resuming in %.1fs", self._what, self._pos, err, delay)
                time.sleep(delay)

    def _take(self, data: bytes) -> bytes:
        if self._pos + len(data) > self._descriptor.size:
            self._drop()
            raise BlobMismatch(f"{self._what} is longer than the {self._descriptor.size} bytes its descriptor "
                               "says: refusing it")
        self._pos += len(data)
        self._hash.update(data)
        self._failures = 0
        self._watch.received(len(data))
        self._watch.check()
        return data

    def _verify(self) -> None:
        got = "sha256:" + self._hash.hexdigest()
        self._drop(reuse=True)
        if got != self._descriptor.digest:
            raise BlobMismatch(f"{self._what} digest mismatch: expected {self._descriptor.digest}, got {got}")
        self._verified = True

    def _connect(self) -> None:
        headers = {"Range": f"bytes={self._pos}-"} if self._pos else {}
        try:
            resp = self._transport.get(self._path, headers)
        except RegistryError as err:
            if isinstance(err.__cause__, HTTPError) and not isinstance(err.__cause__, urllib3.exceptions.SSLError):
                raise _Broken(str(err)) from err
            raise
        if resp.status == 404:
            resp.close()
            raise RegistryError(f"{self._what} is unknown to the registry (HTTP 404, blob unknown)")
        if self._pos == 0 and resp.status == 200:
            self._resp = resp
            return
        if self._pos and resp.status == 206:
            match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            total = match.group(3) if match is not None else "*"
            if match is None or int(match.group(1)) != self._pos or total not in ("*", str(self._descriptor.size)):
                resp.close()
                raise RegistryError(f"{self._what}: the registry answered a request for bytes {self._pos}- "
                                    f"with the wrong range ({resp.headers.get('Content-Range')!r})")
            self._resp = resp
            return
        if self._pos and resp.status == 200:
            resp.close()
            raise RegistryError(f"{self._what}: the connection broke after {self._pos} of {self._descriptor.size} "
                                "bytes and the registry cannot resume it (it ignores Range requests)")
        detail = error_detail(resp)
        resp.close()
        raise RegistryError(f"GET {self._what}: HTTP {resp.status}{detail}")

    def _drop(self, reuse: bool = False) -> None:
        """Forget the response; its connection goes back to the pool only when read to the end."""
        if self._resp is not None:
            with contextlib.suppress(Exception):
                if reuse:
                    self._resp.release_conn()
                else:
                    self._resp.close()
            self._resp = None

    def close(self) -> None:
        self._drop()

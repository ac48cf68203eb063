"""The `file` field of a multipart/form-data body, streamed: the boundary is searched in a sliding buffer."""

from __future__ import annotations

import re

from importer.pipeline import Reader
from importer.serve.body import BadRequest

FORM_FIELD = "file"  # CDI's form field name
READ_SIZE = 1024 * 1024
MAX_PREAMBLE = 64 * 1024
MAX_PART_HEADERS = 16 * 1024
MAX_BOUNDARY = 200  # RFC 2046 allows 70; leave room for sloppy clients, refuse absurd ones

_BOUNDARY = re.compile(r';\s*boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_FIELD_NAME = re.compile(r'(?:^|;)\s*name\s*=\s*(?:"([^"]*)"|([^;\s]+))', re.IGNORECASE)


def boundary_of(content_type: str) -> bytes:
    """The boundary of a multipart/form-data Content-Type, or BadRequest."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind != "multipart/form-data":
        raise BadRequest(f"expected a multipart/form-data body, got Content-Type {content_type[:80]!r}")
    found = _BOUNDARY.search(content_type)
    if not found:
        raise BadRequest("multipart/form-data without a boundary")
    boundary = (found.group(1) or found.group(2)).encode("latin-1", "replace")
    if len(boundary) > MAX_BOUNDARY:
        raise BadRequest("multipart boundary too long")
    return boundary


def field_name(headers: bytes) -> str | None:
    """The name in a part's Content-Disposition header (file names and everything else are ignored)."""
    for line in headers.decode("latin-1").split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-disposition":
            found = _FIELD_NAME.search(value.split(";", 1)[1] if ";" in value else "")
            if found:
                return found.group(1) if found.group(1) is not None else found.group(2)
    return None


class FormFileReader:
    """Reads the content of the first part named `file`; other parts are skipped, their contents dropped."""

    def __init__(self, body: Reader, boundary: bytes) -> None:
        self._body = body
        self._delim = b"\r\n--" + boundary
        self._buf = bytearray(b"\r\n")  # so the first boundary looks like every later one
        self._started = False
        self._eof = False

    def read(self, size: int, /) -> bytes:
        if not self._started:
            self._find_file_part()
            self._started = True
        if self._eof:
            return b""
        while True:
            at = self._buf.find(self._delim)
            if at == 0:
                self._eof = True
                return b""
            count = min(size, at) if at > 0 else min(size, len(self._buf) - len(self._delim) + 1)
            if count > 0:
                with memoryview(self._buf) as view:
                    out = view[:count].tobytes()  # one copy (slicing the bytearray first would make two)
                del self._buf[:count]  # cheap at the front: bytearray only moves its start
                return out
            self._more("the form ends inside the file field")

    def close(self) -> None:
        pass

    def _find_file_part(self) -> None:
        limit = MAX_PREAMBLE
        while True:
            self._skip_to_delimiter(limit)
            del self._buf[:len(self._delim)]
            while len(self._buf) < 2:
                self._more("the form ends after a boundary")
            if self._buf[:2] == b"--":
                raise BadRequest(f"the form has no field named {FORM_FIELD!r}")
            headers = self._part_headers()
            if field_name(headers) == FORM_FIELD:
                return
            limit = -1  # the content of a skipped part may be of any size

    def _skip_to_delimiter(self, limit: int) -> None:
        while (at := self._buf.find(self._delim)) < 0:
            keep = len(self._delim) - 1
            if limit >= 0:
                limit -= max(0, len(self._buf) - keep)
                if limit < 0:
                    raise BadRequest("no multipart boundary where the form should start")
            del self._buf[:max(0, len(self._buf) - keep)]
            self._more("the form ends before its boundary")
        del self._buf[:at]

    def _part_headers(self) -> bytes:
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            if len(self._buf) > MAX_PART_HEADERS:
                raise BadRequest("multipart part headers too long")
            self._more("the form ends inside part headers")
        headers = bytes(self._buf[:end])
        del self._buf[:end + 4]
        # what follows the boundary on its line (transport padding) ends with the first CRLF
        return headers.split(b"\r\n", 1)[1] if b"\r\n" in headers else b""

    def _more(self, why: str) -> None:
        data = self._body.read(READ_SIZE)
        if not data:
            raise BadRequest(why)
        self._buf += data

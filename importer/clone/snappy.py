"""The snappy framing format CDI's cloner wraps its stream in (golang/snappy's buffered writer), decoded.

Each chunk is handed to cramjam with the stream identifier in front, so its CRC-32C is checked too; lengths are
bounded before anything is read or decompressed.
"""

from __future__ import annotations

import cramjam

from importer.pipeline import Reader
from importer.serve.body import BadRequest

STREAM_ID = b"\xff\x06\x00\x00sNaPpY"
MAX_DATA = 65536  # the format's limit on one chunk's uncompressed data
MAX_COMPRESSED = 4 + 32 + MAX_DATA + MAX_DATA // 6  # snappy's worst case for 64 KiB, plus the CRC


class SnappyFrameReader:
    """A Reader over a framed snappy stream: the decompressed bytes, in order."""

    def __init__(self, source: Reader) -> None:
        self._source = source
        self._pending = b""
        self._seen_id = False
        self.eof = False

    def read(self, size: int, /) -> bytes:
        while not self._pending and not self.eof:
            self._pending = self._next_chunk()
        out, self._pending = self._pending[:size], self._pending[size:]
        return out

    def close(self) -> None:
        self._source.close()

    def _exact(self, count: int, at_start: bool = False) -> bytes:
        data = b""
        while len(data) < count:
            piece = self._source.read(count - len(data))
            if not piece:
                if at_start and not data:
                    return b""
                raise BadRequest("the snappy stream ends in the middle of a chunk")
            data += piece
        return data

    def _next_chunk(self) -> bytes:
        head = self._exact(4, at_start=True)
        if not head:
            if not self._seen_id:
                raise BadRequest("empty clone stream: no snappy stream identifier")
            self.eof = True
            return b""
        kind, length = head[0], int.from_bytes(head[1:], "little")
        if not self._seen_id and kind != 0xFF:
            raise BadRequest("not a snappy framed stream (no stream identifier first)")
        if kind == 0xFF:
            if head + self._exact(length) != STREAM_ID:
                raise BadRequest("invalid snappy stream identifier")
            self._seen_id = True
            return b""
        if kind in (0x00, 0x01):
            if length < 4 or length > (MAX_COMPRESSED if kind == 0 else MAX_DATA + 4):
                raise BadRequest(f"snappy chunk of {length} bytes is out of bounds")
            body = self._exact(length)
            if kind == 0 and cramjam.snappy.decompress_raw_len(body[4:]) > MAX_DATA:
                raise BadRequest("snappy chunk decompresses past 64 KiB")
            try:
                return bytes(cramjam.snappy.decompress(STREAM_ID + head + body))
            except cramjam.DecompressionError as err:
                raise BadRequest(f"corrupt snappy chunk: {err}") from None
        if 0x02 <= kind <= 0x7F:
            raise BadRequest(f"reserved unskippable snappy chunk type {kind:#x}")
        self._exact(length)  # padding (0xfe) and skippable chunks
        return b""

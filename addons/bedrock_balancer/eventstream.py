"""AWS event-stream codec (``application/vnd.amazon.eventstream``).

Bedrock's streaming operations (InvokeModelWithResponseStream, ConverseStream) answer with a sequence
of binary frames::

    total_length:u32  headers_length:u32  prelude_crc:u32   (the 12-byte prelude)
    headers (headers_length bytes)
    payload (total_length - headers_length - 16 bytes)
    message_crc:u32   (CRC32 of every byte before it, prelude included)

A header is ``name_len:u8 name type:u8 value``; the value layout depends on the type (0 true, 1 false,
2 int8, 3 int16, 4 int32, 5 int64, 6 bytes with a u16 length, 7 UTF-8 string with a u16 length,
8 timestamp as int64 milliseconds, 9 UUID as 16 bytes). Values decode as botocore decodes them
(timestamps stay integers of milliseconds, UUIDs stay 16 raw bytes), so frames read here compare
equal to what ``botocore.eventstream`` reports.

The module is pure (no mitmproxy import) because it sits on the proxy's hot path: every streamed
response passes through :class:`FrameDecoder`. For that reason the struct formats are compiled once,
CRCs come from :func:`zlib.crc32`, the decoder keeps one growing buffer and an offset instead of
re-slicing per frame, and a CRC error is reported as soon as the 12 prelude bytes arrive.
"""

from __future__ import annotations

import datetime as _dt
import json
import struct
import uuid as _uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Frame",
    "FrameDecoder",
    "FrameError",
    "encode_frame",
    "event_frame",
    "exception_frame",
    "error_frame",
    "decode_frames",
]

PRELUDE_LENGTH = 12
# Prelude plus the trailing message CRC: the size of a frame with no headers and no payload.
MIN_FRAME_LENGTH = 16
# The same limits botocore's parser enforces; a bigger value means a corrupt or hostile stream.
MAX_HEADERS_LENGTH = 128 * 1024
MAX_PAYLOAD_LENGTH = 24 * 1024 * 1024

_PRELUDE = struct.Struct("!III")
_LENGTHS = struct.Struct("!II")
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_I8 = struct.Struct("!b")
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_I64 = struct.Struct("!q")

# Header value type codes from the event-stream specification.
TYPE_TRUE = 0
TYPE_FALSE = 1
TYPE_BYTE = 2
TYPE_SHORT = 3
TYPE_INT = 4
TYPE_LONG = 5
TYPE_BYTES = 6
TYPE_STRING = 7
TYPE_TIMESTAMP = 8
TYPE_UUID = 9

# Fixed-width integer types: code -> (struct, width).
_FIXED_INT_TYPES = {
    TYPE_BYTE: _I8,
    TYPE_SHORT: _I16,
    TYPE_INT: _I32,
    TYPE_LONG: _I64,
    TYPE_TIMESTAMP: _I64,
}

_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


class FrameError(ValueError):
    """A frame that cannot be trusted: bad CRC, impossible lengths, malformed headers."""


@dataclass(slots=True)
class Frame:
    """One decoded event-stream message."""

    headers: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    @property
    def message_type(self) -> str | None:
        """``event``, ``exception`` or ``error`` (None when the header is absent)."""
        return self.headers.get(":message-type")

    @property
    def event_type(self) -> str | None:
        return self.headers.get(":event-type")

    @property
    def exception_type(self) -> str | None:
        return self.headers.get(":exception-type")

    @property
    def error_code(self) -> str | None:
        """``:error-code`` of an unmodeled ``error`` frame."""
        return self.headers.get(":error-code")

    def to_bytes(self) -> bytes:
        return encode_frame(self.headers, self.payload)


# --------------------------------------------------------------------------------------------------
# Encoding


def _encode_header(name: str, value: Any) -> bytes:
    name_bytes = name.encode("utf-8")
    if len(name_bytes) > 255:
        raise ValueError(f"header name longer than 255 bytes: {name!r}")
    prefix = bytes((len(name_bytes),)) + name_bytes
    # str first: it is the only type Bedrock itself sends, so the common case costs one check.
    if isinstance(value, str):
        return prefix + _string_value(TYPE_STRING, value.encode("utf-8"))
    if isinstance(value, bool):
        return prefix + bytes((TYPE_TRUE if value else TYPE_FALSE,))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return prefix + _string_value(TYPE_BYTES, bytes(value))
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return prefix + bytes((TYPE_INT,)) + _I32.pack(value)
        return prefix + bytes((TYPE_LONG,)) + _I64.pack(value)
    if isinstance(value, _dt.datetime):
        millis = int((value - _EPOCH).total_seconds() * 1000)
        return prefix + bytes((TYPE_TIMESTAMP,)) + _I64.pack(millis)
    if isinstance(value, _uuid.UUID):
        return prefix + bytes((TYPE_UUID,)) + value.bytes
    raise TypeError(f"unsupported header value type for {name!r}: {type(value).__name__}")


def _string_value(type_code: int, data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("header value longer than 65535 bytes")
    return bytes((type_code,)) + _U16.pack(len(data)) + data


def encode_frame(headers: dict[str, Any], payload: bytes) -> bytes:
    """Encode one frame. ``str`` values are written as type 7 strings, as Bedrock does.

    ``bytes``, ``bool``, ``int`` (int32, or int64 when it does not fit), timezone-aware
    ``datetime`` and ``uuid.UUID`` values are accepted too, so tests can build any frame AWS sends.
    """
    header_bytes = b"".join(_encode_header(name, value) for name, value in headers.items())
    total_length = MIN_FRAME_LENGTH + len(header_bytes) + len(payload)
    lengths = _LENGTHS.pack(total_length, len(header_bytes))
    prelude_crc = zlib.crc32(lengths)
    head = lengths + _U32.pack(prelude_crc) + header_bytes
    message_crc = zlib.crc32(payload, zlib.crc32(head))
    return b"".join((head, payload, _U32.pack(message_crc)))


def _json_payload(payload: Any) -> bytes:
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def event_frame(event_type: str, payload: Any) -> bytes:
    """A normal ``event`` frame; ``payload`` is bytes or an object serialised as compact JSON."""
    return encode_frame(
        {
            ":event-type": event_type,
            ":content-type": "application/json",
            ":message-type": "event",
        },
        _json_payload(payload),
    )


def exception_frame(exception_type: str, message: str) -> bytes:
    """A modeled exception inside a 200 stream, e.g. ``throttlingException``."""
    return encode_frame(
        {
            ":exception-type": exception_type,
            ":content-type": "application/json",
            ":message-type": "exception",
        },
        _json_payload({"message": message}),
    )


def error_frame(error_code: str, error_message: str) -> bytes:
    """An unmodeled ``error`` frame (error details travel in headers, the payload is empty)."""
    return encode_frame(
        {
            ":message-type": "error",
            ":error-code": error_code,
            ":error-message": error_message,
        },
        b"",
    )


# --------------------------------------------------------------------------------------------------
# Decoding


def _decode_headers(data: memoryview) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    pos = 0
    end = len(data)
    try:
        while pos < end:
            name_length = data[pos]
            pos += 1
            name = bytes(data[pos : pos + name_length]).decode("utf-8")
            pos += name_length
            type_code = data[pos]
            pos += 1
            value, pos = _decode_value(type_code, data, pos)
            if pos > end:
                raise FrameError(f"header {name!r} runs past the header block")
            if name in headers:
                raise FrameError(f"duplicate header {name!r}")
            headers[name] = value
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise FrameError(f"malformed headers: {exc}") from exc
    return headers


def _decode_value(type_code: int, data: memoryview, pos: int) -> tuple[Any, int]:
    if type_code == TYPE_STRING:
        (length,) = _U16.unpack_from(data, pos)
        pos += 2
        return bytes(data[pos : pos + length]).decode("utf-8"), pos + length
    if type_code == TYPE_TRUE:
        return True, pos
    if type_code == TYPE_FALSE:
        return False, pos
    if type_code == TYPE_BYTES:
        (length,) = _U16.unpack_from(data, pos)
        pos += 2
        return bytes(data[pos : pos + length]), pos + length
    if type_code == TYPE_UUID:
        if pos + 16 > len(data):
            raise FrameError("truncated uuid header")
        return bytes(data[pos : pos + 16]), pos + 16
    int_struct = _FIXED_INT_TYPES.get(type_code)
    if int_struct is None:
        raise FrameError(f"unknown header value type {type_code}")
    (value,) = int_struct.unpack_from(data, pos)
    return value, pos + int_struct.size


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get back the frames completed so far.

    After a :class:`FrameError` the stream is out of sync and the decoder must not be used again.
    """

    __slots__ = ("_buffer", "_offset")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._offset = 0

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer) - self._offset

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        buffer = self._buffer
        available = len(buffer)
        offset = self._offset
        while available - offset >= PRELUDE_LENGTH:
            total_length, headers_length = _check_prelude(buffer, offset)
            if available - offset < total_length:
                break
            frames.append(_decode_frame(buffer, offset, total_length, headers_length))
            offset += total_length
        # Drop consumed bytes only now and then: a per-frame del would copy the tail every time.
        if offset == available:
            buffer.clear()
            offset = 0
        elif offset > 65536:
            del buffer[:offset]
            offset = 0
        self._offset = offset
        return frames


def _check_prelude(buffer: bytearray, offset: int) -> tuple[int, int]:
    total_length, headers_length, prelude_crc = _PRELUDE.unpack_from(buffer, offset)
    if zlib.crc32(memoryview(buffer)[offset : offset + 8]) != prelude_crc:
        raise FrameError("prelude CRC mismatch")
    if total_length < MIN_FRAME_LENGTH:
        raise FrameError(f"frame length {total_length} is shorter than the minimum")
    if headers_length > MAX_HEADERS_LENGTH:
        raise FrameError(f"headers length {headers_length} exceeds {MAX_HEADERS_LENGTH}")
    payload_length = total_length - headers_length - MIN_FRAME_LENGTH
    if payload_length < 0:
        raise FrameError(f"headers length {headers_length} exceeds the frame length {total_length}")
    if payload_length > MAX_PAYLOAD_LENGTH:
        raise FrameError(f"payload length {payload_length} exceeds {MAX_PAYLOAD_LENGTH}")
    return total_length, headers_length


def _decode_frame(buffer: bytearray, offset: int, total_length: int, headers_length: int) -> Frame:
    view = memoryview(buffer)[offset : offset + total_length]
    try:
        (message_crc,) = _U32.unpack_from(view, total_length - 4)
        if zlib.crc32(view[: total_length - 4]) != message_crc:
            raise FrameError("message CRC mismatch")
        headers_end = PRELUDE_LENGTH + headers_length
        headers = _decode_headers(view[PRELUDE_LENGTH:headers_end])
        payload = bytes(view[headers_end : total_length - 4])
    finally:
        # A live memoryview would forbid resizing the buffer on the next feed.
        view.release()
    return Frame(headers, payload)


def decode_frames(data: bytes) -> list[Frame]:
    """Decode a complete byte string of frames; trailing partial data is an error."""
    decoder = FrameDecoder()
    frames = decoder.feed(data)
    if decoder.pending:
        raise FrameError(f"{decoder.pending} trailing bytes do not form a complete frame")
    return frames

"""The event-stream codec against the reference frames, botocore's parser and hand-built frames."""

from __future__ import annotations

import datetime as dt
import struct
import uuid
import zlib

import pytest
from botocore.eventstream import EventStreamBuffer
from hypothesis import given, settings
from hypothesis import strategies as st

from bedrock_balancer.eventstream import (
    Frame,
    FrameDecoder,
    FrameError,
    decode_frames,
    encode_frame,
    error_frame,
    event_frame,
    exception_frame,
)

# Verified against botocore's parser (shared/reference/bedrock-runtime.md).
THROTTLING_FRAME_HEX = (
    "000000b0000000614f5086b30f3a657863657074696f6e2d747970650700137468726f74746c696e67457863657074"
    "696f6e0d3a636f6e74656e742d747970650700106170706c69636174696f6e2f6a736f6e0d3a6d6573736167652d74"
    "797065070009657863657074696f6e7b226d657373616765223a22546f6f206d616e7920746f6b656e732c20706c65"
    "6173652077616974206265666f726520747279696e6720616761696e2e227df70ae57f"
)
CHUNK_FRAME_HEX = (
    "000000920000004b2fea33010b3a6576656e742d747970650700056368756e6b0d3a636f6e74656e742d7479706507"
    "00106170706c69636174696f6e2f6a736f6e0d3a6d6573736167652d747970650700056576656e747b226279746573"
    "223a2265794a306558426c496a6f696257567a6332466e5a56397a64473977496e303d222c2270223a226162636422"
    "7d42b72480"
)
EMPTY_FRAME_HEX = "000000100000000005c248eb7d98c8ff"


def botocore_messages(data: bytes) -> list:
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    return list(buffer)


# ------------------------------------------------------------------------------------------------
# Reference frames, byte for byte


def test_throttling_exception_frame_matches_reference():
    frame = exception_frame("throttlingException", "Too many tokens, please wait before trying again.")
    assert frame.hex() == THROTTLING_FRAME_HEX
    assert len(frame) == 176


def test_chunk_event_frame_matches_reference():
    payload = {"bytes": "eyJ0eXBlIjoibWVzc2FnZV9zdG9wIn0=", "p": "abcd"}
    assert event_frame("chunk", payload).hex() == CHUNK_FRAME_HEX
    # Already-serialised payloads pass through untouched.
    raw = b'{"bytes":"eyJ0eXBlIjoibWVzc2FnZV9zdG9wIn0=","p":"abcd"}'
    assert event_frame("chunk", raw).hex() == CHUNK_FRAME_HEX


def test_empty_frame_matches_reference():
    assert encode_frame({}, b"").hex() == EMPTY_FRAME_HEX


def test_reference_frames_decode_with_their_properties():
    frames = decode_frames(bytes.fromhex(THROTTLING_FRAME_HEX + CHUNK_FRAME_HEX + EMPTY_FRAME_HEX))
    throttling, chunk, empty = frames
    assert throttling.message_type == "exception"
    assert throttling.exception_type == "throttlingException"
    assert throttling.event_type is None
    assert throttling.payload == b'{"message":"Too many tokens, please wait before trying again."}'
    assert chunk.message_type == "event"
    assert chunk.event_type == "chunk"
    assert chunk.headers[":content-type"] == "application/json"
    assert chunk.payload == b'{"bytes":"eyJ0eXBlIjoibWVzc2FnZV9zdG9wIn0=","p":"abcd"}'
    assert empty == Frame({}, b"")


def test_error_frame_carries_code_and_message_headers():
    (frame,) = decode_frames(error_frame("InternalFailure", "boom"))
    assert frame.message_type == "error"
    assert frame.error_code == "InternalFailure"
    assert frame.headers[":error-message"] == "boom"
    assert frame.payload == b""


# ------------------------------------------------------------------------------------------------
# Round trips with botocore


def test_botocore_reads_what_we_encode():
    data = event_frame("contentBlockDelta", {"delta": {"text": "héllo"}}) + exception_frame(
        "modelStreamErrorException", "bad"
    )
    first, second = botocore_messages(data)
    assert first.headers == {
        ":event-type": "contentBlockDelta",
        ":content-type": "application/json",
        ":message-type": "event",
    }
    assert first.payload == '{"delta":{"text":"héllo"}}'.encode()
    assert second.headers[":exception-type"] == "modelStreamErrorException"


def test_every_header_type_round_trips_through_botocore():
    moment = dt.datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone.utc)
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    headers = {
        "yes": True,
        "no": False,
        "small": 7,
        "large": 2**40,
        "blob": b"\x00\x01\xff",
        "text": "value",
        "when": moment,
        "id": ident,
    }
    data = encode_frame(headers, b"payload")
    (ours,) = decode_frames(data)
    (theirs,) = botocore_messages(data)
    expected = dict(headers, when=int(moment.timestamp() * 1000), id=ident.bytes)
    assert ours.headers == expected
    assert theirs.headers == expected
    assert ours.payload == theirs.payload == b"payload"


def _header(name: str, type_code: int, value: bytes) -> bytes:
    encoded = name.encode()
    return bytes((len(encoded),)) + encoded + bytes((type_code,)) + value


def _raw_frame(header_bytes: bytes, payload: bytes) -> bytes:
    """A frame assembled by hand from the specification, independent of encode_frame."""
    total = 16 + len(header_bytes) + len(payload)
    prelude = struct.pack("!II", total, len(header_bytes))
    head = prelude + struct.pack("!I", zlib.crc32(prelude)) + header_bytes + payload
    return head + struct.pack("!I", zlib.crc32(head))


def test_decodes_every_header_type_from_hand_built_frame():
    header_bytes = b"".join(
        [
            _header("t", 0, b""),
            _header("f", 1, b""),
            _header("byte", 2, struct.pack("!b", -5)),
            _header("short", 3, struct.pack("!h", -300)),
            _header("int", 4, struct.pack("!i", -70000)),
            _header("long", 5, struct.pack("!q", -(2**40))),
            _header("bytes", 6, struct.pack("!H", 3) + b"abc"),
            _header("string", 7, struct.pack("!H", 5) + "héé".encode()),
            _header("timestamp", 8, struct.pack("!q", 1700000000123)),
            _header("uuid", 9, bytes(range(16))),
        ]
    )
    data = _raw_frame(header_bytes, b"{}")
    (ours,) = decode_frames(data)
    (theirs,) = botocore_messages(data)
    assert ours.headers == theirs.headers
    assert ours.headers == {
        "t": True,
        "f": False,
        "byte": -5,
        "short": -300,
        "int": -70000,
        "long": -(2**40),
        "bytes": b"abc",
        "string": "héé",
        "timestamp": 1700000000123,
        "uuid": bytes(range(16)),
    }


header_names = st.text(min_size=1, max_size=20).filter(lambda n: len(n.encode()) <= 255)
header_values = st.one_of(
    st.text(max_size=50), st.binary(max_size=50), st.booleans(), st.integers(-(2**63), 2**63 - 1)
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(header_names, header_values, max_size=6), st.binary(max_size=300))
def test_round_trip_matches_botocore(headers, payload):
    data = encode_frame(headers, payload)
    (ours,) = decode_frames(data)
    (theirs,) = botocore_messages(data)
    assert ours.headers == headers == theirs.headers
    assert ours.payload == payload == theirs.payload


# ------------------------------------------------------------------------------------------------
# Incremental decoding


def test_byte_by_byte_feeding_yields_each_frame_once_complete():
    data = bytes.fromhex(THROTTLING_FRAME_HEX + CHUNK_FRAME_HEX)
    decoder = FrameDecoder()
    completed_at = []
    frames = []
    for index in range(len(data)):
        new = decoder.feed(data[index : index + 1])
        if new:
            completed_at.append(index + 1)
            frames.extend(new)
    assert completed_at == [176, 176 + 146]
    assert [f.exception_type for f in frames] == ["throttlingException", None]
    assert frames[1].event_type == "chunk"
    assert decoder.pending == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=8), st.data())
def test_any_split_of_a_stream_decodes_the_same(payloads, data):
    stream = b"".join(event_frame("chunk", payload) for payload in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    frames = []
    for start, end in zip([0] + cuts, cuts + [len(stream)]):
        frames.extend(decoder.feed(stream[start:end]))
    assert [frame.payload for frame in frames] == payloads
    assert decoder.pending == 0


def test_many_frames_in_one_feed_and_buffer_compaction():
    frames = [event_frame("chunk", {"i": i, "p": "x" * 500}) for i in range(400)]
    decoder = FrameDecoder()
    decoded = decoder.feed(b"".join(frames) + frames[0][:10])
    assert len(decoded) == 400
    assert decoder.pending == 10
    assert decoder.feed(frames[0][10:])[0].payload == decoded[0].payload


# ------------------------------------------------------------------------------------------------
# Corruption


def test_corrupted_payload_raises_frame_error():
    data = bytearray(bytes.fromhex(CHUNK_FRAME_HEX))
    data[100] ^= 0x01
    with pytest.raises(FrameError, match="message CRC"):
        FrameDecoder().feed(bytes(data))


def test_corrupted_prelude_raises_before_the_frame_is_complete():
    data = bytearray(bytes.fromhex(CHUNK_FRAME_HEX))
    data[3] ^= 0x01  # total length
    with pytest.raises(FrameError, match="prelude CRC"):
        FrameDecoder().feed(bytes(data[:12]))


def test_corrupted_message_crc_raises():
    data = bytearray(bytes.fromhex(THROTTLING_FRAME_HEX))
    data[-1] ^= 0xFF
    with pytest.raises(FrameError):
        decode_frames(bytes(data))


@pytest.mark.parametrize(
    "total_length, headers_length, reason",
    [
        (15, 0, "shorter than the minimum"),
        (20, 10, "exceeds the frame length"),
        (16 + 200 * 1024, 200 * 1024, "headers length"),
        (16 + 25 * 1024 * 1024, 0, "payload length"),
    ],
)
def test_impossible_lengths_raise(total_length, headers_length, reason):
    prelude = struct.pack("!II", total_length, headers_length)
    data = prelude + struct.pack("!I", zlib.crc32(prelude))
    with pytest.raises(FrameError, match=reason):
        FrameDecoder().feed(data)


def test_malformed_headers_raise_frame_error():
    truncated_string = _header("s", 7, struct.pack("!H", 40) + b"short")
    with pytest.raises(FrameError):
        decode_frames(_raw_frame(truncated_string, b""))
    unknown_type = _header("x", 42, b"")
    with pytest.raises(FrameError, match="unknown header value type"):
        decode_frames(_raw_frame(unknown_type, b""))
    duplicate = _header("d", 0, b"") + _header("d", 1, b"")
    with pytest.raises(FrameError, match="duplicate"):
        decode_frames(_raw_frame(duplicate, b""))


def test_trailing_partial_frame_is_an_error_for_decode_frames():
    with pytest.raises(FrameError, match="trailing"):
        decode_frames(bytes.fromhex(EMPTY_FRAME_HEX) + b"\x00\x00")


def test_frame_error_is_a_value_error():
    assert issubclass(FrameError, ValueError)


def test_encoder_rejects_oversized_and_unknown_values():
    with pytest.raises(ValueError):
        encode_frame({"n" * 256: "v"}, b"")
    with pytest.raises(ValueError):
        encode_frame({"n": "v" * 70000}, b"")
    with pytest.raises(TypeError):
        encode_frame({"n": 1.5}, b"")


def _invoke_chunk(event: dict) -> bytes:
    import base64
    import json

    return event_frame("chunk", {"bytes": base64.b64encode(json.dumps(event).encode()).decode()})


@pytest.mark.parametrize("opening, content", [
    ([event_frame("messageStart", {"role": "assistant"})], event_frame("contentBlockDelta", {"delta": {"text": "Hi"}})),
    ([_invoke_chunk({"type": "message_start", "message": {}}), _invoke_chunk({"type": "content_block_start", "index": 0}),
      _invoke_chunk({"type": "ping"})], _invoke_chunk({"type": "content_block_delta", "delta": {"text": "Hi"}})),
    ([], event_frame("chunk", {"bytes": "not base64 json"})),  # a chunk the meter cannot read is content
])
def test_the_meter_sees_content_only_after_the_events_that_open_an_answer(opening, content):
    from bedrock_balancer.usage import StreamMeter

    meter = StreamMeter()
    for frame in opening:
        meter.feed(frame)
    assert not meter.content_seen  # the stream may still fail over
    meter.feed(content)
    assert meter.content_seen and meter.frames == len(opening) + 1

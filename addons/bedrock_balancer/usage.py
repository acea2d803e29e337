"""Read token usage from Bedrock answers: headers, Converse bodies and event streams.

* InvokeModel: ``x-amzn-bedrock-input-token-count`` / ``-output-token-count`` headers.
* Converse: ``usage.inputTokens`` / ``usage.outputTokens`` in the JSON body.
* ConverseStream: the final ``metadata`` event's ``usage``.
* InvokeModelWithResponseStream: the last chunk's ``amazon-bedrock-invocationMetrics``.

The stream meter sees every byte that passes, frame by frame, and also remembers whether an
exception frame came and whether any content came before it.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from .eventstream import FrameDecoder, FrameError

_METRICS_KEY = b"amazon-bedrock-invocationMetrics"
# Events of InvokeModelWithResponseStream (the model's own, in a chunk) that open an answer without any
# of its content (Anthropic's): a stream that stalls or fails after them can still be failed over.
_OPENING_MODEL_EVENTS = frozenset({"message_start", "content_block_start", "ping"})


@dataclass
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None

    def total(self, unknown: int) -> int:
        """Input plus output tokens; ``unknown`` when the answer said neither (keep a reservation: the safe side)."""
        if self.input_tokens is None and self.output_tokens is None:
            return unknown
        return (self.input_tokens or 0) + (self.output_tokens or 0)


def _model_event(payload: bytes) -> bytes | None:
    """The model's own event (JSON) that an InvokeModelWithResponseStream chunk carries in base64."""
    try:
        return base64.b64decode(json.loads(payload)["bytes"])
    except (ValueError, KeyError, TypeError):
        return None


def _opens_the_answer(frame) -> bool:
    if frame.event_type == "messageStart":
        return True
    event = _model_event(frame.payload) if frame.event_type == "chunk" else None
    if event is None:
        return False
    try:
        event = json.loads(event)
    except ValueError:
        return False
    return isinstance(event, dict) and event.get("type") in _OPENING_MODEL_EVENTS


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def from_response(headers_get, body: bytes) -> Usage:
    usage = Usage(_int(headers_get("x-amzn-bedrock-input-token-count")), _int(headers_get("x-amzn-bedrock-output-token-count")))
    if usage.input_tokens is None and body[:1] == b"{" and b'"usage"' in body:
        try:
            parsed = json.loads(body).get("usage") or {}
        except (ValueError, AttributeError):
            return usage
        usage.input_tokens, usage.output_tokens = _int(parsed.get("inputTokens")), _int(parsed.get("outputTokens"))
    return usage


class StreamMeter:
    """Fed the raw bytes of an event stream as they pass; keeps usage and the stream's outcome."""

    def __init__(self) -> None:
        self.usage = Usage()
        self.frames = 0
        self.exception: str | None = None  # ``throttlingException`` etc. once an exception frame passed
        # An event with content (not messageStart, nor a model's opening chunk): from here on the answer
        # is the client's.
        self.content_seen = False
        self.corrupt = False
        self._decoder = FrameDecoder()

    def feed(self, data: bytes) -> None:
        if self.corrupt:
            return
        try:
            frames = self._decoder.feed(data)
        except FrameError:
            self.corrupt = True
            return
        for frame in frames:
            self.frames += 1
            if frame.message_type in ("exception", "error"):
                self.exception = frame.exception_type or frame.error_code or "error"
                continue
            if not self.content_seen and not _opens_the_answer(frame):
                self.content_seen = True
            if frame.event_type == "metadata":
                self._read_converse_metadata(frame.payload)
            elif frame.event_type == "chunk" and len(frame.payload) > 64:
                self._read_invocation_metrics(frame.payload)

    @property
    def pending_bytes(self) -> int:
        """Bytes seen that do not yet make a whole frame."""
        return self._decoder.pending

    def _read_converse_metadata(self, payload: bytes) -> None:
        try:
            usage = json.loads(payload).get("usage") or {}
        except (ValueError, AttributeError):
            return
        self.usage = Usage(_int(usage.get("inputTokens")), _int(usage.get("outputTokens")))

    def _read_invocation_metrics(self, payload: bytes) -> None:
        chunk = _model_event(payload)
        if chunk is None or _METRICS_KEY not in chunk:
            return
        try:
            metrics = json.loads(chunk)[_METRICS_KEY.decode()]
        except (ValueError, KeyError, TypeError):
            return
        self.usage = Usage(_int(metrics.get("inputTokenCount")), _int(metrics.get("outputTokenCount")))

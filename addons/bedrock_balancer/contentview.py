"""Content views for mitmweb and the mitmproxy console: Bedrock event streams and SigV4 headers.

Two views, registered by the :class:`BedrockViews` addon on mitmproxy 11 (``contentviews.View``,
styled lines) and on mitmproxy 12+ (``contentviews.Contentview``, one text with YAML highlighting):

* **Bedrock EventStream** (chosen automatically for ``application/vnd.amazon.eventstream``): one
  entry per frame with its event type and headers, the JSON payload pretty-printed, base64 ``bytes``
  chunks (InvokeModelWithResponseStream) decoded to the model's JSON, exception and error frames
  marked, and CRC errors, impossible lengths and truncated trailing bytes reported where they occur
  instead of failing the view. A summary on top gives the assembled text and the token usage.
* **Bedrock SigV4** (chosen by hand, for any message of a flow): the SigV4 ``Authorization`` parts
  (credential scope, signed headers, ``x-amz-date``) of what the client sent and of what the proxy
  sent (nothing, when the proxy answered the request itself), and what the rewrite changed.
  Signatures and session tokens are never shown.

mitmproxy discards the body of a streamed response, so the balancer streams event streams through
:func:`bounded_copy`, which passes every chunk on unchanged and keeps the first bytes for the view
(see ``bounded_copy`` for what the addon calls, and when).

The rendering functions (:func:`render_eventstream`, :func:`render_sigv4`) are plain: they return
``(description, lines)`` where each line is a list of ``(style, text)`` pairs, and the text of the
lines joined is valid YAML, which is what mitmproxy 12 highlights.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import struct
import zlib
from typing import Any, Iterable

from mitmproxy import contentviews

from . import eventstream
from .doctor import authorization_parts
from .errors import PROXY_ERROR_HEADER
from .relay import TARGET_HEADER

log = logging.getLogger(__name__)

__all__ = [
    "BedrockViews",
    "BoundedCopy",
    "bounded_copy",
    "attach_copy",
    "sigv4_summary",
    "render_eventstream",
    "render_sigv4",
    "EVENTSTREAM_VIEW_NAME",
    "SIGV4_VIEW_NAME",
    "CLIENT_SIGV4_KEY",
    "STREAM_COPY_KEY",
    "DEFAULT_COPY_LIMIT",
]

EVENT_STREAM = "application/vnd.amazon.eventstream"
EVENTSTREAM_VIEW_NAME = "Bedrock EventStream"
SIGV4_VIEW_NAME = "Bedrock SigV4"
# flow.metadata keys (values are plain dicts of str/int/list so flows stay serialisable).
CLIENT_SIGV4_KEY = "bedrock_balancer.client_sigv4"
STREAM_COPY_KEY = "bedrock_balancer.stream_copy"
DEFAULT_COPY_LIMIT = 1024 * 1024
# A view of a huge copy would be slow to build and to scroll; past this many frames, count only.
MAX_FRAMES_SHOWN = 2000
# A base64 value longer than this is shortened in the payload (it is shown decoded below it).
BASE64_SHOWN = 60

Line = list[tuple[str, str]]

# Styles: mitmproxy 11's console knows all of them; mitmweb 11 styles "header", "highlight" (bold)
# and "offset" (blue). mitmproxy 12 ignores them and highlights the text as YAML.
KEY, VALUE, STRONG, ALERT, NOTE = "header", "text", "highlight", "error", "offset"


# --------------------------------------------------------------------------------------------------
# A small writer of YAML-shaped, styled lines


class _Doc:
    def __init__(self) -> None:
        self.lines: list[Line] = []

    def comment(self, text: str, style: str = NOTE) -> None:
        self.lines.append([(style, f"# {text}")])

    def alert(self, text: str) -> None:
        """A problem worth seeing at a glance (a YAML comment, styled as an error)."""
        self.lines.append([(ALERT, "# ⚠ "), (STRONG, text)])

    def item(self, indent: int, key: str, value: str | None = None, style: str = VALUE, note: str = "") -> None:
        line: Line = [(VALUE, " " * indent), (KEY, f"{key}:")]
        if value is not None:
            line.append((style, f" {value}"))
        if note:
            line.append((NOTE, f"  # {note}"))
        self.lines.append(line)

    def block(self, indent: int, key: str, obj: Any, note: str = "") -> None:
        """``key: <pretty JSON>``; JSON is YAML, and continuation lines are indented past the key."""
        text = json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False)
        first, *rest = text.split("\n")
        self.item(indent, key, first, note=note if not rest else "")
        for line in rest:
            self.lines.append([(VALUE, " " * (indent + 2) + line)])
        if note and rest:
            self.lines[-1].append((NOTE, f"  # {note}"))

    def text(self) -> str:
        return "\n".join("".join(t for _, t in line) for line in self.lines)


_PLAIN_SCALAR = re.compile(r"[A-Za-z_/][A-Za-z0-9_./+-]*")


def _scalar(value: Any) -> str:
    """A header value as a YAML scalar."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return json.dumps(f"<{len(value)} bytes: {bytes(value[:32]).hex()}{'…' if len(value) > 32 else ''}>")
    text = str(value)
    if _PLAIN_SCALAR.fullmatch(text) and text.lower() not in ("true", "false", "null", "yes", "no", "on", "off"):
        return text
    return json.dumps(text, ensure_ascii=False)


# --------------------------------------------------------------------------------------------------
# Event streams


class _Summary:
    def __init__(self) -> None:
        self.frames = 0
        self.events: list[str] = []
        self.text: list[str] = []
        self.usage: dict[str, Any] = {}
        self.problems: list[str] = []


def render_eventstream(data: bytes, copy_info: dict | None = None) -> tuple[str, list[Line]]:
    """Describe an event stream frame by frame. Never raises on bad input: problems become lines.

    ``copy_info`` is the flow's ``bedrock_balancer.stream_copy`` metadata (see :func:`bounded_copy`),
    which says whether ``data`` is only the first part of a longer stream.
    """
    summary = _Summary()
    body = _Doc()
    cut_by_copy = bool(copy_info) and copy_info.get("kept", 0) < copy_info.get("total", 0)
    offset = 0
    size = len(data)
    while offset < size:
        if summary.frames >= MAX_FRAMES_SHOWN:
            rest = _count_frames(data, offset)
            body.comment(f"{rest} more frame(s) in the remaining {size - offset} bytes are not shown")
            break
        offset = _render_frame(body, summary, data, offset, cut_by_copy)
        if offset < 0:
            break

    head = _Doc()
    shape = f"{summary.frames} frame(s), {size} bytes"
    if copy_info and cut_by_copy:
        shape += f" (the first {copy_info['kept']} of {copy_info['total']} streamed bytes: the proxy keeps {copy_info.get('limit')} for this view)"
    elif copy_info and not copy_info.get("complete", True):
        shape += " (the stream did not end normally)"
    head.comment(f"Bedrock event stream: {shape}", STRONG)
    if summary.events:
        head.comment("events: " + _run_lengths(summary.events))
    if summary.text:
        head.comment("text: " + json.dumps("".join(summary.text), ensure_ascii=False)[:2000])
    if summary.usage:
        head.comment("usage: " + ", ".join(f"{k}={v}" for k, v in summary.usage.items()))
    for problem in summary.problems:
        head.alert(problem)
    if not size:
        head.comment("empty body")
    description = f"Bedrock event stream, {summary.frames} frame(s)"
    if summary.problems:
        description += f", {len(summary.problems)} problem(s)"
    return description, head.lines + body.lines


def _run_lengths(names: list[str]) -> str:
    out: list[str] = []
    for name in names:
        if out and out[-1][0] == name:
            out[-1][1] += 1
        else:
            out.append([name, 1])
    return ", ".join(f"{n} ×{c}" if c > 1 else n for n, c in out)


def _count_frames(data: bytes, offset: int) -> int:
    count = 0
    while len(data) - offset >= eventstream.PRELUDE_LENGTH:
        total, _ = struct.unpack_from("!II", data, offset)
        if total < eventstream.MIN_FRAME_LENGTH:
            break
        count += 1
        offset += total
    return count


def _render_frame(doc: _Doc, summary: _Summary, data: bytes, offset: int, cut_by_copy: bool) -> int:
    """Render the frame at ``offset``; return the next offset, or -1 when the rest cannot be framed."""
    number = summary.frames + 1
    remaining = len(data) - offset
    if remaining < eventstream.PRELUDE_LENGTH:
        return _trailing(doc, summary, number, offset, remaining, None, cut_by_copy)
    total, headers_length, prelude_crc = struct.unpack_from("!III", data, offset)
    if zlib.crc32(data[offset : offset + 8]) != prelude_crc:
        problem = f"frame {number} at byte {offset}: prelude CRC mismatch; the remaining {remaining} bytes cannot be framed"
        summary.problems.append(problem)
        doc.lines.append([(VALUE, "- "), (KEY, "corrupt:"), (ALERT, " " + json.dumps(problem))])
        doc.item(2, "bytes", json.dumps(data[offset : offset + 32].hex() + ("…" if remaining > 32 else "")))
        return -1
    payload_length = total - headers_length - eventstream.MIN_FRAME_LENGTH
    if total < eventstream.MIN_FRAME_LENGTH or payload_length < 0 or headers_length > eventstream.MAX_HEADERS_LENGTH:
        problem = f"frame {number} at byte {offset}: impossible lengths (total {total}, headers {headers_length}); the rest cannot be framed"
        summary.problems.append(problem)
        doc.lines.append([(VALUE, "- "), (KEY, "corrupt:"), (ALERT, " " + json.dumps(problem))])
        return -1
    if remaining < total:
        return _trailing(doc, summary, number, offset, remaining, total, cut_by_copy)

    raw = data[offset : offset + total]
    crc_note = None
    try:
        (frame,) = eventstream.decode_frames(raw)
    except eventstream.FrameError as e:
        if "message CRC" not in str(e):
            problem = f"frame {number} at byte {offset}: {e}"
            summary.problems.append(problem)
            summary.frames += 1
            doc.lines.append([(VALUE, "- "), (KEY, "frame:"), (VALUE, f" {number}"), (NOTE, f"  # byte {offset}, {total} bytes")])
            doc.item(2, "corrupt", json.dumps(str(e)), ALERT)
            return offset + total
        # The lengths are sound (the prelude CRC held): show what arrived, flagged as unverified.
        (received_crc,) = struct.unpack_from("!I", raw, total - 4)
        computed = zlib.crc32(raw[:-4])
        crc_note = f"message CRC mismatch (received {received_crc:08x}, computed {computed:08x}): contents unverified"
        summary.problems.append(f"frame {number} at byte {offset}: {crc_note}")
        try:
            (frame,) = eventstream.decode_frames(raw[:-4] + struct.pack("!I", computed))
        except eventstream.FrameError as e2:
            summary.frames += 1
            doc.lines.append([(VALUE, "- "), (KEY, "frame:"), (VALUE, f" {number}"), (NOTE, f"  # byte {offset}, {total} bytes")])
            doc.item(2, "corrupt", json.dumps(f"{crc_note}; {e2}"), ALERT)
            return offset + total

    summary.frames += 1
    _render_decoded(doc, summary, frame, number, offset, total, crc_note)
    return offset + total


def _trailing(doc: _Doc, summary: _Summary, number: int, offset: int, remaining: int, total: int | None, cut_by_copy: bool) -> int:
    declared = f" of the {total} it declares" if total else ""
    if cut_by_copy:
        doc.comment(f"the kept copy ends inside frame {number}: {remaining} byte(s){declared} were kept, the rest was streamed on but not kept")
    else:
        problem = f"truncated: {remaining} trailing byte(s) at byte {offset} do not form a complete frame (frame {number}: {remaining} byte(s){declared or ', not even a prelude'})"
        summary.problems.append(problem)
        doc.lines.append([(VALUE, "- "), (KEY, "truncated:"), (ALERT, " " + json.dumps(problem))])
    return -1


def _render_decoded(doc: _Doc, summary: _Summary, frame: eventstream.Frame, number: int, offset: int, total: int, crc_note: str | None) -> None:
    message_type = frame.message_type
    doc.lines.append([(VALUE, "- "), (KEY, "frame:"), (VALUE, f" {number}"), (NOTE, f"  # byte {offset}, {total} bytes")])
    if crc_note:
        doc.item(2, "CRC", json.dumps(crc_note), ALERT)
    payload_obj = _json(frame.payload)
    if message_type == "exception":
        name = frame.exception_type or "?"
        message = payload_obj.get("message") if isinstance(payload_obj, dict) else None
        summary.events.append(f"EXCEPTION {name}")
        summary.problems.append(f"frame {number}: exception {name}" + (f": {message}" if message else ""))
        doc.lines.append([(VALUE, "  "), (KEY, "EXCEPTION:"), (ALERT, f" {_scalar(name)}"), (ALERT, "  # ⚠ exception frame")])
        if message is not None:
            doc.item(2, "message", json.dumps(message, ensure_ascii=False), STRONG)
    elif message_type == "error":
        code = frame.error_code or "?"
        summary.events.append(f"ERROR {code}")
        message = frame.headers.get(":error-message")
        summary.problems.append(f"frame {number}: error {code}" + (f": {message}" if message else ""))
        doc.lines.append([(VALUE, "  "), (KEY, "ERROR:"), (ALERT, f" {_scalar(code)}"), (ALERT, "  # ⚠ error frame")])
        if message is not None:
            doc.item(2, "message", json.dumps(str(message), ensure_ascii=False), STRONG)
    else:
        event = frame.event_type or "?"
        summary.events.append(event)
        doc.item(2, "event", _scalar(event), STRONG)
        if message_type != "event":
            doc.item(2, "message-type", _scalar(message_type), note="not event, exception or error")
    doc.item(2, "headers")
    for name, value in frame.headers.items():
        doc.item(4, _scalar(name), _scalar(value))

    decoded = None
    if isinstance(payload_obj, dict) and isinstance(payload_obj.get("bytes"), str):
        decoded = _decode_bytes(payload_obj["bytes"])
        shown = dict(payload_obj)
        if len(shown["bytes"]) > BASE64_SHOWN:
            shown["bytes"] = shown["bytes"][:BASE64_SHOWN] + f"…({len(payload_obj['bytes'])} base64 chars)"
        doc.block(2, "payload", shown)
    elif payload_obj is not _NOT_JSON:
        doc.block(2, "payload", payload_obj)
    elif not frame.payload:
        doc.item(2, "payload", '""', note="empty")
    else:
        _raw_payload(doc, frame.payload)

    if decoded is not None:
        kind, value, length = decoded
        if kind == "json":
            doc.block(2, "bytes", value, note=f"decoded from base64, {length} bytes")
            if message_type == "event":
                _learn_invoke_chunk(summary, value)
        elif kind == "text":
            doc.item(2, "bytes", json.dumps(value, ensure_ascii=False), note=f"decoded from base64, {length} bytes, not JSON")
        else:
            doc.item(2, "bytes", json.dumps(value), ALERT, note="not valid base64")
    elif message_type == "event" and isinstance(payload_obj, dict):
        _learn_converse_event(summary, frame.event_type, payload_obj)


_NOT_JSON = object()


def _json(payload: bytes) -> Any:
    if not payload:
        return _NOT_JSON
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return _NOT_JSON


def _decode_bytes(value: str) -> tuple[str, Any, int]:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        return "invalid", f"{e}", 0
    try:
        return "json", json.loads(raw), len(raw)
    except (ValueError, UnicodeDecodeError):
        return "text", raw.decode("utf-8", "backslashreplace"), len(raw)


def _raw_payload(doc: _Doc, payload: bytes) -> None:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        doc.item(2, "payload", json.dumps(payload[:256].hex() + ("…" if len(payload) > 256 else "")), note=f"{len(payload)} bytes, binary (hex)")
        return
    doc.item(2, "payload", json.dumps(text, ensure_ascii=False), note=f"{len(payload)} bytes, not JSON")


def _learn_converse_event(summary: _Summary, event: str | None, payload: dict) -> None:
    if event == "contentBlockDelta":
        text = (payload.get("delta") or {}).get("text")
        if isinstance(text, str):
            summary.text.append(text)
    elif event == "metadata" and isinstance(payload.get("usage"), dict):
        summary.usage.update(payload["usage"])


def _learn_invoke_chunk(summary: _Summary, chunk: Any) -> None:
    if not isinstance(chunk, dict):
        return
    delta = chunk.get("delta")
    if chunk.get("type") == "content_block_delta" and isinstance(delta, dict) and isinstance(delta.get("text"), str):
        summary.text.append(delta["text"])
    metrics = chunk.get("amazon-bedrock-invocationMetrics")
    if isinstance(metrics, dict):
        summary.usage.update({k: v for k, v in metrics.items() if k in ("inputTokenCount", "outputTokenCount")})


# --------------------------------------------------------------------------------------------------
# SigV4


def sigv4_summary(authorization: str | None, amz_date: str | None) -> dict | None:
    """What the addon stores as ``flow.metadata["bedrock_balancer.client_sigv4"]``.

    ``{access_key_id, date, region, service, signed_headers, amz_date}`` from the client's
    ``Authorization`` and ``X-Amz-Date`` headers; no signature. None when the request is not SigV4
    signed (a bearer token, or no Authorization at all).
    """
    parts = authorization_parts(authorization)
    return None if parts is None else _scope_fields(parts, amz_date)


def _scope_fields(parts: dict, amz_date: str | None) -> dict:
    """What a SigV4 Authorization says (from :func:`authorization_parts`), with its X-Amz-Date: no signature."""
    return {
        "access_key_id": parts["access_key_id"],
        "date": parts["date"],
        "region": parts["region"],
        "service": parts["service"],
        "signed_headers": list(parts["signed_headers"]),
        "amz_date": amz_date,
    }


def _auth_kind(value: str | None) -> str:
    if not value:
        return "none"
    scheme = value.strip().split(" ", 1)[0]
    return scheme


def render_sigv4(flow: Any) -> tuple[str, list[Line]]:
    """Both sides of the rewrite, from a flow: the client's (metadata) and the one the request shows."""
    doc = _Doc()
    request = getattr(flow, "request", None) if flow is not None else None
    metadata = getattr(flow, "metadata", {}) if flow is not None else {}
    client = metadata.get(CLIENT_SIGV4_KEY) if isinstance(metadata, dict) else None
    if request is None:
        doc.comment("no HTTP request in this flow")
        return "Bedrock SigV4", doc.lines
    headers = request.headers
    authorization = headers.get("authorization")
    shown = authorization_parts(authorization)
    balanced = isinstance(client, dict) or any(k.startswith("bedrock_balancer") for k in metadata)

    doc.comment("SigV4 of this flow; signatures and session tokens are never shown", STRONG)
    if balanced:
        doc.item(0, "client sent")
        if isinstance(client, dict):
            _sigv4_fields(doc, client, None)
        else:
            doc.comment("  no SigV4 recorded for the client (a bearer token or no Authorization header)")
        not_sent = _not_sent_upstream(flow, shown, headers, client if isinstance(client, dict) else None)
        if not_sent is not None:
            # The request shown is then the client's own (credentials redacted): listing its fields as
            # "proxy sent", with no changes, would read as if the client's credentials had been forwarded.
            doc.item(0, "proxy sent", "nothing", STRONG, note="nothing was sent upstream")
            doc.comment(f"  {not_sent}")
        elif shown is not None:
            doc.item(0, "proxy sent")
            proxy = _fields_from_request(shown, headers)
            _sigv4_fields(doc, proxy, client if isinstance(client, dict) else None, request)
            if isinstance(client, dict):
                _changes(doc, client, proxy)
        else:
            doc.item(0, "proxy sent")
            doc.comment(f"  no SigV4 Authorization on the request as shown ({_auth_kind(authorization)}):"
                        " the request did not go upstream, or it is still in flight")
    else:
        doc.item(0, "request")
        if shown is not None:
            _sigv4_fields(doc, _fields_from_request(shown, headers), None, request)
        elif authorization:
            doc.item(2, "authorization", _scalar(f"{_auth_kind(authorization)} <redacted>"), note="not SigV4")
        else:
            doc.comment("  no Authorization header")
    return "Bedrock SigV4", doc.lines


def _not_sent_upstream(flow: Any, shown: dict | None, headers: Any, client: dict | None) -> str | None:
    """Why the flow shows that its request never went upstream, or None when it went (or may yet).

    The addon leaves the client's request in a flow it sent nowhere, and puts the request as sent
    upstream in one it sent. The answer says which: a proxy-made error without a target names no
    attempt. A flow that ended without an answer (the client left, the flow was killed) tells by its
    request: one still carrying the client's own access key, scope, signed headers and x-amz-date was
    not re-signed. A flow still in flight tells nothing yet (a whole answer is awaited with the client's
    request still in the flow).
    """
    response = getattr(flow, "response", None)
    if response is not None:
        if response.headers.get(PROXY_ERROR_HEADER) and not response.headers.get(TARGET_HEADER):
            return f"the proxy answered this request itself ({response.status_code}) before any attempt upstream: " \
                   "the request shown is the client's own"
        return None
    if getattr(flow, "error", None) is None:
        return None
    if shown is not None and client is not None and _scope_fields(shown, headers.get("x-amz-date")) == _scope_fields_of(client):
        return "the flow ended without an answer, and the request shown still carries the client's own SigV4 " \
               "(the proxy did not re-sign it): it is the client's request"
    return None


def _scope_fields_of(summary: dict) -> dict:
    """A recorded summary (flow metadata, possibly read back from a flow file) in :func:`_scope_fields`' shape."""
    return {**summary, "signed_headers": list(summary.get("signed_headers") or [])}


def _fields_from_request(parts: dict, headers: Any) -> dict:
    return {
        **_scope_fields(parts, headers.get("x-amz-date")),
        "_signature": parts["signature_state"],
        "_token": "x-amz-security-token" in headers,
    }


def _sigv4_fields(doc: _Doc, fields: dict, other: dict | None, request: Any = None) -> None:
    def changed(key: str) -> bool:
        return other is not None and other.get(key) != fields.get(key)

    if request is not None:
        doc.item(2, "host", _scalar(request.headers.get("host") or request.host))
    for key, label in (("access_key_id", "access key"), ("region", "region"), ("service", "service"), ("date", "date"), ("amz_date", "x-amz-date")):
        value = fields.get(key)
        doc.item(2, label, _scalar(value) if value is not None else "null", STRONG if changed(key) else VALUE, note="changed" if changed(key) else "")
    scope = "/".join(str(fields.get(k)) for k in ("date", "region", "service")) + "/aws4_request"
    doc.item(2, "scope", _scalar(scope))
    signed = fields.get("signed_headers") or []
    doc.item(2, "signed headers", "[" + ", ".join(_scalar(h) for h in signed) + "]")
    if "_signature" in fields:
        doc.item(2, "signature", _scalar(f"<{fields['_signature']}>"), note="never shown")
        doc.item(2, "session token", "present (redacted)" if fields["_token"] else "none")


def _changes(doc: _Doc, client: dict, proxy: dict) -> None:
    changes = []
    for key, label in (("region", "region"), ("service", "service"), ("access_key_id", "access key"), ("date", "date")):
        if client.get(key) != proxy.get(key):
            changes.append(f"{label} {client.get(key)} -> {proxy.get(key)}")
    before, after = set(client.get("signed_headers") or []), set(proxy.get("signed_headers") or [])
    if after - before:
        changes.append("signed headers added: " + ", ".join(sorted(after - before)))
    if before - after:
        changes.append("signed headers dropped: " + ", ".join(sorted(before - after)))
    doc.item(0, "changes", "[" + ", ".join(json.dumps(c) for c in changes) + "]" if changes else "[]")


# --------------------------------------------------------------------------------------------------
# The bounded copy of a streamed body


class BoundedCopy:
    """A ``flow.response.stream`` callable: passes chunks on unchanged, keeps the first ``limit`` bytes.

    mitmproxy calls it with each chunk as it arrives and with ``b""`` at the end of the body. When
    built with the flow, it attaches the copy at that end (before any ``response`` hook runs, so
    ``save_stream_file`` / ``-w`` store it too); :meth:`attach` does it by hand (in ``error``, when
    the stream broke and the end never came).
    """

    __slots__ = ("limit", "kept", "total", "ended", "_flow")

    def __init__(self, limit: int, flow: Any = None) -> None:
        self.limit = max(0, int(limit))
        self.kept = bytearray()
        self.total = 0
        self.ended = False
        self._flow = flow

    def __call__(self, chunk: bytes) -> bytes:
        if chunk:
            self.total += len(chunk)
            room = self.limit - len(self.kept)
            if room > 0:
                if isinstance(self.kept, bytes):  # attached early (error hook) and the stream went on
                    self.kept = bytearray(self.kept)
                self.kept += chunk[:room]
        else:
            self.ended = True
            if self._flow is not None:
                self.attach(self._flow)
                self._flow = None  # no reference cycle flow -> response -> stream -> flow
        return chunk

    def attach(self, flow: Any) -> bool:
        """Give ``flow.response`` the kept bytes as its body (unless it has a body) and record the copy."""
        response = getattr(flow, "response", None)
        if response is None:
            return False
        if not isinstance(self.kept, bytes):
            self.kept = bytes(self.kept)  # one immutable copy, shared with the response: no second buffer
        if response.raw_content is None or (response.raw_content == b"" and self.kept):
            # raw_content, not content: no Content-Length rewrite, no content-encoding round trip. A body
            # mitmproxy stored itself (mitmproxy 12's store_streamed_bodies) is complete: keep it.
            response.raw_content = self.kept
        flow.metadata[STREAM_COPY_KEY] = {
            "kept": len(self.kept),
            "total": self.total,
            "limit": self.limit,
            "complete": self.ended,
        }
        return True


def bounded_copy(limit_bytes: int = DEFAULT_COPY_LIMIT, flow: Any = None) -> BoundedCopy:
    """A ``flow.response.stream`` callable keeping the first ``limit_bytes`` of the body for the views.

    In ``responseheaders``: ``flow.response.stream = bounded_copy(limit, flow)`` (instead of ``True``).
    With ``flow`` given, the copy becomes ``flow.response.raw_content`` as soon as the body ends;
    call :func:`attach_copy` in ``response`` and ``error`` as well (harmless when already done; it
    is what keeps a broken stream's bytes). The client receives every byte unchanged either way.
    """
    return BoundedCopy(limit_bytes, flow)


def attach_copy(flow: Any) -> bool:
    """Attach the kept bytes of a :class:`BoundedCopy` stream to the flow's response, if it has one."""
    response = getattr(flow, "response", None)
    stream = getattr(response, "stream", None) if response is not None else None
    if isinstance(stream, BoundedCopy):
        return stream.attach(flow)
    return False


# --------------------------------------------------------------------------------------------------
# Registration: mitmproxy 12+ (Contentview) and mitmproxy 11 (View)

_NEW_API = hasattr(contentviews, "Contentview")


def _copy_info(flow: Any) -> dict | None:
    metadata = getattr(flow, "metadata", None)
    info = metadata.get(STREAM_COPY_KEY) if isinstance(metadata, dict) else None
    return info if isinstance(info, dict) else None


def _is_eventstream(content_type: str | None, http_message: Any) -> bool:
    if content_type:
        return content_type.split(";")[0].strip().lower() == EVENT_STREAM
    headers = getattr(http_message, "headers", None)
    return bool(headers) and headers.get("content-type", "").split(";")[0].strip().lower() == EVENT_STREAM


def _safe_render(render, *args) -> tuple[str, list[Line]]:
    try:
        return render(*args)
    except Exception as e:  # a view must never take the UI down; show what went wrong instead
        log.debug("bedrock view failed", exc_info=True)
        return "Bedrock view error", [[(ALERT, f"# ⚠ the view failed: {type(e).__name__}: {e}")]]


def _text(lines: Iterable[Line]) -> str:
    return "\n".join("".join(t for _, t in line) for line in lines)


if _NEW_API:

    class EventStreamContentview(contentviews.Contentview):
        name = EVENTSTREAM_VIEW_NAME
        syntax_highlight = "yaml"

        def prettify(self, data: bytes, metadata: Any) -> str:
            return _text(_safe_render(render_eventstream, data, _copy_info(metadata.flow))[1])

        def render_priority(self, data: bytes, metadata: Any) -> float:
            return 2.0 if _is_eventstream(metadata.content_type, metadata.http_message) else -1.0

    class SigV4Contentview(contentviews.Contentview):
        name = SIGV4_VIEW_NAME
        syntax_highlight = "yaml"

        def prettify(self, data: bytes, metadata: Any) -> str:
            return _text(_safe_render(render_sigv4, metadata.flow)[1])

        def render_priority(self, data: bytes, metadata: Any) -> float:
            return -1.0  # never chosen automatically

    def _make_views() -> list[Any]:
        return [EventStreamContentview(), SigV4Contentview()]

    def _register(views: list[Any]) -> None:
        for view in views:
            contentviews.add(view)

    def _unregister(views: list[Any]) -> None:
        registry = contentviews.registry
        by_name = getattr(registry, "_by_name", None)  # mitmproxy 12 has no public removal
        for view in views:
            if isinstance(by_name, dict) and by_name.get(view.name.lower()) is view:
                del by_name[view.name.lower()]

else:

    class EventStreamView(contentviews.View):
        name = EVENTSTREAM_VIEW_NAME

        def __call__(self, data: bytes, *, content_type=None, flow=None, http_message=None, **unknown):
            description, lines = _safe_render(render_eventstream, data, _copy_info(flow))
            return description, iter(lines)

        def render_priority(self, data: bytes, *, content_type=None, flow=None, http_message=None, **unknown) -> float:
            return 2.0 if _is_eventstream(content_type, http_message) else -1.0

    class SigV4View(contentviews.View):
        name = SIGV4_VIEW_NAME

        def __call__(self, data: bytes, *, content_type=None, flow=None, http_message=None, **unknown):
            description, lines = _safe_render(render_sigv4, flow)
            return description, iter(lines)

        def render_priority(self, data: bytes, **unknown) -> float:
            return -1.0  # never chosen automatically

    def _make_views() -> list[Any]:
        return [EventStreamView(), SigV4View()]

    def _register(views: list[Any]) -> None:
        for view in views:
            existing = contentviews.get(view.name)
            if existing is not None:  # a previous load (script reload) that did not unload
                contentviews.remove(existing)
            contentviews.add(view)

    def _unregister(views: list[Any]) -> None:
        for view in views:
            if view in contentviews.views:
                contentviews.remove(view)


class BedrockViews:
    """Addon registering both views while it is loaded (mitmweb, the console, mitmdump ``-v``)."""

    name = "bedrock_views"

    def __init__(self) -> None:
        self.views: list[Any] = []

    def load(self, loader: Any) -> None:
        if not self.views:
            self.views = _make_views()
            _register(self.views)

    def done(self) -> None:
        if self.views:
            _unregister(self.views)
            self.views = []

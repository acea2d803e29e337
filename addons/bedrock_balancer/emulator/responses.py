"""Bodies, headers and event streams in Bedrock's wire format.

Everything here is a pure function of its arguments (plus randomness for ids and padding), so the
server only decides *which* answer to give. Shapes follow the botocore service model for
``bedrock-runtime`` 2023-09-30 and what Bedrock is seen to send:

* errors: the status, ``x-amzn-ErrorType: <Type>:<namespace>`` (AWS appends a coral namespace
  after a colon; SDKs cut it off, a proxy must too), ``Content-Type: application/json`` and
  ``{"message": ...}``;
* event-stream frames carry a random-length padding field ``p`` (AWS pads to hide the length of
  the text), and streamed invoke chunks wrap the model's own JSON event in base64 ``bytes``;
* the last invoke chunk carries ``amazon-bedrock-invocationMetrics``; ConverseStream ends with a
  ``metadata`` event holding usage and metrics.

The emulated model always answers ``Hello from <region>`` so a test can tell which region served.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import json
import random
import string
import uuid
from dataclasses import dataclass
from typing import Any

from ..eventstream import event_frame

JSON_CONTENT_TYPE = "application/json"
EVENT_STREAM_CONTENT_TYPE = "application/vnd.amazon.eventstream"

# The namespaces AWS appends to x-amzn-ErrorType. The exact text for Bedrock is a guess; only
# the part before the colon matters to SDKs.
BEDROCK_ERROR_NAMESPACE = "http://internal.amazon.com/coral/com.amazon.bedrock/"
AUTH_ERROR_NAMESPACE = "http://internal.amazon.com/coral/com.amazon.coral.service/"

ERROR_STATUS = {
    "AccessDeniedException": 403,
    "ConflictException": 400,
    "ExpiredTokenException": 403,
    "IncompleteSignatureException": 403,
    "InternalServerException": 500,
    "InvalidSignatureException": 403,
    "MissingAuthenticationTokenException": 403,
    "ModelErrorException": 424,
    "ModelNotReadyException": 429,
    "ModelTimeoutException": 408,
    "ResourceNotFoundException": 404,
    "ServiceQuotaExceededException": 400,
    "ServiceUnavailableException": 503,
    "ThrottlingException": 429,
    "UnknownOperationException": 404,
    "UnrecognizedClientException": 403,
    "ValidationException": 400,
}
AUTH_ERROR_TYPES = frozenset(
    {
        "ExpiredTokenException",
        "IncompleteSignatureException",
        "InvalidSignatureException",
        "MissingAuthenticationTokenException",
        "UnrecognizedClientException",
    }
)

TOO_MANY_REQUESTS = "Too many requests, please wait before trying again."
TOO_MANY_TOKENS = "Too many tokens, please wait before trying again."
MODEL_NOT_READY = (
    "Model is not ready for inference. Wait and try your request again. "
    "Refer to the Bedrock documentation for more information."
)
SERVICE_UNAVAILABLE = "Bedrock is unable to process your request."
# What AWS says when the calling account has no access to the model (with the caller's ARN in real life).
NO_MODEL_ACCESS = (
    "User: arn:aws:sts::123456789012:assumed-role/bedrock-proxy/session is not authorized to perform: "
    "bedrock:InvokeModel on resource: arn:aws:bedrock:us-east-1::foundation-model/* because no identity-based policy allows it"
)
INTERNAL_ERROR = "The system encountered an unexpected error during processing. Try your request again."

ACCOUNT_ID = "123456789012"

_PADDING_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """A complete (non-streamed) HTTP response."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def new_request_id() -> str:
    return str(uuid.uuid4())


def http_date() -> str:
    return email.utils.formatdate(usegmt=True)


def compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def padding() -> str:
    """AWS pads events with a prefix of the alphabet of random length."""
    return _PADDING_ALPHABET[: random.randint(1, len(_PADDING_ALPHABET))]


def base_headers(request_id: str, region: str) -> list[tuple[str, str]]:
    return [
        ("Date", http_date()),
        ("x-amzn-RequestId", request_id),
        ("x-emulator-region", region),
    ]


def json_answer(
    status: int, body: Any, request_id: str, region: str, extra_headers: list[tuple[str, str]] = ()
) -> HttpAnswer:
    payload = compact_json(body)
    headers = base_headers(request_id, region)
    headers += [("Content-Type", JSON_CONTENT_TYPE), ("Content-Length", str(len(payload)))]
    headers += list(extra_headers)
    return HttpAnswer(status, headers, payload)


def error_answer(
    error_type: str, message: str, request_id: str, region: str, status: int | None = None
) -> HttpAnswer:
    namespace = AUTH_ERROR_NAMESPACE if error_type in AUTH_ERROR_TYPES else BEDROCK_ERROR_NAMESPACE
    return json_answer(
        status or ERROR_STATUS.get(error_type, 400),
        {"message": message},
        request_id,
        region,
        [("x-amzn-ErrorType", f"{error_type}:{namespace}")],
    )


def reply_text(region: str) -> str:
    return f"Hello from {region}"


def reply_pieces(region: str) -> list[str]:
    """The reply split as a model streams it; joined they give :func:`reply_text`."""
    return ["Hello", " from", f" {region}"]


# --------------------------------------------------------------------------------------------------
# InvokeModel (Anthropic messages shape)


def invoke_headers(input_tokens: int, output_tokens: int, latency_ms: int) -> list[tuple[str, str]]:
    return [
        ("x-amzn-bedrock-invocation-latency", str(latency_ms)),
        ("x-amzn-bedrock-output-token-count", str(output_tokens)),
        ("x-amzn-bedrock-input-token-count", str(input_tokens)),
    ]


def _message_id() -> str:
    return "msg_bdrk_" + uuid.uuid4().hex[:24]


def anthropic_message(model: str, region: str, input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "id": _message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": reply_text(region)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }


def _chunk(event: dict[str, Any]) -> bytes:
    encoded = base64.b64encode(compact_json(event)).decode("ascii")
    return event_frame("chunk", {"bytes": encoded, "p": padding()})


def invoke_stream_head(model: str, input_tokens: int) -> list[bytes]:
    """Frames before the text: message_start and content_block_start."""
    return [
        _chunk(
            {
                "type": "message_start",
                "message": {
                    "id": _message_id(),
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": input_tokens, "output_tokens": 1},
                },
            }
        ),
        _chunk({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ]


def invoke_stream_delta(text: str) -> bytes:
    return _chunk({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})


def invoke_stream_tail(
    input_tokens: int, output_tokens: int, latency_ms: int, first_byte_latency_ms: int
) -> list[bytes]:
    return [
        _chunk({"type": "content_block_stop", "index": 0}),
        _chunk(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            }
        ),
        _chunk(
            {
                "type": "message_stop",
                "amazon-bedrock-invocationMetrics": {
                    "inputTokenCount": input_tokens,
                    "outputTokenCount": output_tokens,
                    "invocationLatency": latency_ms,
                    "firstByteLatency": first_byte_latency_ms,
                },
            }
        ),
    ]


# --------------------------------------------------------------------------------------------------
# Converse


def converse_body(region: str, input_tokens: int, output_tokens: int, latency_ms: int) -> dict[str, Any]:
    return {
        "output": {"message": {"role": "assistant", "content": [{"text": reply_text(region)}]}},
        "stopReason": "end_turn",
        "usage": {
            "inputTokens": input_tokens,
            "outputTokens": output_tokens,
            "totalTokens": input_tokens + output_tokens,
        },
        "metrics": {"latencyMs": latency_ms},
    }


def converse_stream_head() -> list[bytes]:
    return [event_frame("messageStart", {"p": padding(), "role": "assistant"})]


def converse_stream_delta(text: str) -> bytes:
    return event_frame(
        "contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": text}, "p": padding()}
    )


def converse_stream_tail(input_tokens: int, output_tokens: int, latency_ms: int) -> list[bytes]:
    return [
        event_frame("contentBlockStop", {"contentBlockIndex": 0, "p": padding()}),
        event_frame("messageStop", {"p": padding(), "stopReason": "end_turn"}),
        event_frame(
            "metadata",
            {
                "metrics": {"latencyMs": latency_ms},
                "p": padding(),
                "usage": {
                    "inputTokens": input_tokens,
                    "outputTokens": output_tokens,
                    "totalTokens": input_tokens + output_tokens,
                },
            },
        ),
    ]


def stream_headers(operation: str) -> list[tuple[str, str]]:
    headers = [("Content-Type", EVENT_STREAM_CONTENT_TYPE), ("Transfer-Encoding", "chunked")]
    if operation == "InvokeModelWithResponseStream":
        headers.append(("x-amzn-bedrock-content-type", JSON_CONTENT_TYPE))
    return headers


# --------------------------------------------------------------------------------------------------
# Guardrails and async invocations


def guardrail_body() -> dict[str, Any]:
    return {
        "usage": {
            "topicPolicyUnits": 0,
            "contentPolicyUnits": 1,
            "wordPolicyUnits": 0,
            "sensitiveInformationPolicyUnits": 0,
            "sensitiveInformationPolicyFreeUnits": 0,
            "contextualGroundingPolicyUnits": 0,
        },
        "action": "NONE",
        "outputs": [],
        "assessments": [],
    }


def iso_timestamp(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

"""Errors the proxy itself answers with, in Bedrock's wire format (restJson1).

botocore picks the exception class from the ``x-amzn-ErrorType`` header, not from the status code, so
a proxy-made error must carry the shape name AWS would use; the body is ``{"message": ...}``. The
``x-bedrock-balancer-error`` header tells an operator that the proxy, not AWS, produced the answer.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

# On every answer the proxy makes itself, so that an operator (and the SigV4 view) can tell it from AWS's.
PROXY_ERROR_HEADER = "x-bedrock-balancer-error"

# Shape name -> HTTP status, as in the Bedrock Runtime service model.
STATUS_BY_ERROR_TYPE = {
    "ValidationException": 400,
    "ServiceQuotaExceededException": 400,
    "ConflictException": 400,
    "IncompleteSignatureException": 400,
    "AccessDeniedException": 403,
    "InvalidSignatureException": 403,
    "UnrecognizedClientException": 403,
    "MissingAuthenticationTokenException": 403,
    "ResourceNotFoundException": 404,
    "UnknownOperationException": 404,
    "ModelTimeoutException": 408,
    "RequestEntityTooLargeException": 413,
    "ModelErrorException": 424,
    "ModelStreamErrorException": 424,
    "ThrottlingException": 429,
    "ModelNotReadyException": 429,
    "InternalServerException": 500,
    "ServiceUnavailableException": 503,
}


@dataclass(frozen=True)
class BedrockError(Exception):
    """An answer the proxy gives instead of forwarding the request."""

    error_type: str
    message: str

    def __post_init__(self) -> None:
        if self.error_type not in STATUS_BY_ERROR_TYPE:
            raise ValueError(f"unknown Bedrock error type {self.error_type!r}")

    @property
    def status(self) -> int:
        return STATUS_BY_ERROR_TYPE[self.error_type]

    def wire(self) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body of the HTTP response that carries this error."""
        body = json.dumps({"message": self.message}).encode()
        headers = {
            "Content-Type": "application/json",
            "x-amzn-ErrorType": self.error_type,
            "x-amzn-RequestId": str(uuid.uuid4()),
            PROXY_ERROR_HEADER: "true",
        }
        return self.status, headers, body

    def __str__(self) -> str:
        return f"{self.error_type}: {self.message}"


def status_of_stream_exception(exception_type: str | None) -> int | None:
    """The HTTP status of an exception event inside a stream (``throttlingException``): the status AWS gives the
    same error outside a stream (429), or None for an event type it has no status for."""
    if not exception_type:
        return None
    return STATUS_BY_ERROR_TYPE.get(exception_type[:1].upper() + exception_type[1:])


def error_type_of(headers_get, body: bytes) -> str | None:
    """The error shape of an upstream answer, as botocore would read it (header first, then body)."""
    value = headers_get("x-amzn-ErrorType")
    if value:
        return value.split(":", 1)[0]
    document = _error_document(body)
    code = document.get("__type") or document.get("code")
    return code.rsplit("#", 1)[-1] if isinstance(code, str) else None


def error_message_of(body: bytes) -> str:
    """The ``message`` of an upstream error answer, for the proxy's log (one line, bounded)."""
    document = _error_document(body)
    message = document.get("message") or document.get("Message")
    return " ".join(str(message).split())[:500] if message else "(no message)"


def _error_document(body: bytes) -> dict:
    """An error answer's JSON object; empty when the body is not one."""
    try:
        parsed = json.loads(body) if body else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}

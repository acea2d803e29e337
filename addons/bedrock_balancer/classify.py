"""Classify a Bedrock Runtime request: which operation, which model, may it move to another region?

Plain functions over the request's method, raw path, host and headers; no mitmproxy import.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from urllib.parse import unquote

from . import sigv4
from .errors import BedrockError

# bedrock-runtime.us-east-1.amazonaws.com, bedrock-runtime-fips.us-east-1.amazonaws.com,
# bedrock-runtime.us-east-1.api.aws (dual-stack), ....amazonaws.com.cn (China) and PrivateLink names
# such as vpce-0abc-1xyz.bedrock-runtime.us-east-1.vpce.amazonaws.com.
BEDROCK_HOST = re.compile(
    r"^(?:vpce-[a-z0-9-]+\.)?bedrock-runtime(?:-fips)?\.(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)\."
    r"(?:vpce\.)?(?:amazonaws\.com(?:\.cn)?|api\.aws)\.?$",
    re.IGNORECASE,
)
# The same, for mitmproxy's allow_hosts, which is searched in "host:port".
BEDROCK_HOST_PATTERN = BEDROCK_HOST.pattern.replace(r"\.?$", r"\.?:\d+$")

REGION = re.compile(r"^[a-z]{2}(?:-[a-z]+)+-\d+$")

INVOKE = "InvokeModel"
INVOKE_STREAM = "InvokeModelWithResponseStream"
CONVERSE = "Converse"
CONVERSE_STREAM = "ConverseStream"
COUNT_TOKENS = "CountTokens"
BIDIRECTIONAL = "InvokeModelWithBidirectionalStream"
APPLY_GUARDRAIL = "ApplyGuardrail"
START_ASYNC_INVOKE = "StartAsyncInvoke"
GET_ASYNC_INVOKE = "GetAsyncInvoke"
LIST_ASYNC_INVOKES = "ListAsyncInvokes"

MODEL_ACTIONS = {
    "invoke": INVOKE,
    "invoke-with-response-stream": INVOKE_STREAM,
    "converse": CONVERSE,
    "converse-stream": CONVERSE_STREAM,
    "count-tokens": COUNT_TOKENS,
    "invoke-with-bidirectional-stream": BIDIRECTIONAL,
}
BALANCEABLE = frozenset({INVOKE, INVOKE_STREAM, CONVERSE, CONVERSE_STREAM, COUNT_TOKENS})
STREAMING = frozenset({INVOKE_STREAM, CONVERSE_STREAM})

_MODEL_PATH = re.compile(r"^/model/(?P<model>[^?#]+)/(?P<action>[a-z-]+)$")
_GUARDRAIL_PATH = re.compile(r"^/guardrail/[^/]+/version/[^/]+/apply$")
_ASYNC_INVOKE_PATH = re.compile(r"^/async-invoke(?:/(?P<arn>[^/]+))?/?$")

# Resource types whose ARN names a region the resource lives in and cannot leave.
REGION_BOUND_RESOURCES = frozenset(
    {
        "provisioned-model",
        "custom-model",
        "custom-model-deployment",
        "imported-model",
        "application-inference-profile",
        "prompt",
        "prompt-router",
        "default-prompt-router",
        "marketplace/model-endpoint",
        "endpoint",  # SageMaker endpoints (arn:aws:sagemaker:...)
    }
)
# Model ids are letters, digits and . _ : / - (ARNs); anything else (control characters, spaces, %)
# is refused before it can reach a URL or a log line.
_MODEL_ID_CHARS = re.compile(r"^[A-Za-z0-9._:/+-]{1,2048}$")

GUARDRAIL_HEADER = "x-amzn-bedrock-guardrailidentifier"
GUARDRAIL_REASON = "the request names a guardrail, and guardrails are per region"
_UNPARSED = object()


class RequestBody:
    """A request body, parsed as JSON at most once: several decisions read it, and bodies reach 20 MB."""

    __slots__ = ("raw", "_parsed")

    def __init__(self, raw: bytes):
        self.raw = raw
        self._parsed = _UNPARSED

    @classmethod
    def of(cls, body: bytes | RequestBody) -> RequestBody:
        return body if isinstance(body, RequestBody) else cls(body)

    @property
    def json(self) -> object | None:
        """The parsed body; None when it is empty or not JSON (or absurdly nested)."""
        if self._parsed is _UNPARSED:
            try:
                self._parsed = json.loads(self.raw) if self.raw else None
            except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
                self._parsed = None
        return self._parsed


@dataclass(frozen=True, slots=True)
class Arn:
    partition: str
    service: str
    region: str
    account: str
    resource_type: str
    resource_id: str

    @classmethod
    def parse(cls, text: str) -> Arn | None:
        parts = text.split(":", 5)
        if len(parts) != 6 or parts[0] != "arn":
            return None
        resource_type, _, resource_id = parts[5].rpartition("/")
        return cls(parts[1], parts[2], parts[3], parts[4], resource_type, resource_id)

    @property
    def region_bound(self) -> bool:
        return self.resource_type in REGION_BOUND_RESOURCES or self.service != "bedrock"


@dataclass(frozen=True, slots=True)
class BedrockRequest:
    """What the proxy needs to know about one request to route it."""

    operation: str
    model_id: str | None  # decoded (``anthropic.claude-v2:1``); None for operations without a model
    raw_model_id: str | None  # the path segment exactly as the client sent it
    client_region: str | None  # from the host the client addressed, else from its credential scope
    region_bound_reason: str | None  # why the request must stay in client_region; None if it may move
    fips: bool = False  # the client addressed a FIPS endpoint: only FIPS targets may serve it

    @property
    def balanceable(self) -> bool:
        return self.region_bound_reason is None

    @property
    def streaming(self) -> bool:
        return self.operation in STREAMING


def host_region(host: str) -> str | None:
    """The region a Bedrock Runtime host name belongs to, or None for any other host."""
    match = BEDROCK_HOST.match(host)
    return match.group("region").lower() if match else None


def is_bedrock_host(host: str) -> bool:
    return BEDROCK_HOST.match(host) is not None


def is_fips_host(host: str) -> bool:
    match = BEDROCK_HOST.match(host)
    return match is not None and "bedrock-runtime-fips." in host.lower()


def scope_region(authorization: str | None) -> str | None:
    if not authorization:
        return None
    try:
        return sigv4.parse_authorization(authorization).region
    except sigv4.AuthorizationError:
        return None


def classify(
    method: str,
    raw_path: str,
    host: str,
    authorization: str | None,
    guardrail_header: str | None,
    fallback_region: str | None = None,
    body: bytes | RequestBody = b"",
    fips: bool = False,
) -> BedrockRequest:
    """Classify a request, or raise :class:`BedrockError` for one the proxy will not forward.

    ``fips``: the client addressed a FIPS endpoint (in reverse mode ``host`` is not the one it addressed)."""
    path = raw_path.split("?", 1)[0]
    client_region = host_region(host) or scope_region(authorization) or fallback_region
    fips = fips or is_fips_host(host)
    if match := _MODEL_PATH.match(path):
        request = with_body(_classify_model_request(method, match, client_region, guardrail_header), body)
        return replace(request, fips=True) if fips else request
    if _GUARDRAIL_PATH.match(path) and method == "POST":
        return BedrockRequest(APPLY_GUARDRAIL, None, None, client_region, "guardrails are per region", fips)
    if match := _ASYNC_INVOKE_PATH.match(path):
        operation = _async_invoke_operation(method, match.group("arn"))
        return BedrockRequest(operation, None, None, client_region, "async invocations live in one region", fips)
    raise BedrockError("UnknownOperationException", f"bedrock-balancer: {method} {path} is not a Bedrock Runtime operation")


def _classify_model_request(method, match, client_region, guardrail_header) -> BedrockRequest:
    action = match.group("action")
    operation = MODEL_ACTIONS.get(action)
    if operation is None or method != "POST":
        raise BedrockError("UnknownOperationException", f"bedrock-balancer: {method} .../{action} is not a Bedrock Runtime operation")
    raw_model_id = match.group("model")
    model_id = decode_model_id(raw_model_id)
    if operation == BIDIRECTIONAL:
        raise BedrockError(
            "ValidationException",
            "bedrock-balancer does not proxy InvokeModelWithBidirectionalStream: it is an HTTP/2 stream in which the "
            "client signs every input frame with its own key, so the proxy can neither move it to another region "
            "nor re-sign it. Send it to Bedrock directly (add the Bedrock host to NO_PROXY for that client).",
        )
    reason = None
    arn = Arn.parse(model_id)
    if arn is not None and arn.region_bound:
        reason = f"{arn.resource_type} ARNs name the region the resource lives in"
    elif guardrail_header:
        reason = GUARDRAIL_REASON
    return BedrockRequest(operation, model_id, raw_model_id, client_region, reason)


def with_body(request: BedrockRequest, body: bytes | RequestBody) -> BedrockRequest:
    """The classification completed by what the body says (Converse names its guardrail there).

    Separate from :func:`classify` so that the operation can be known, and the body checked against it,
    before anything parses the body."""
    if request.model_id is None or not request.balanceable or not _body_guardrail(body):
        return request
    return replace(request, region_bound_reason=GUARDRAIL_REASON)


def _body_guardrail(body: bytes | RequestBody) -> str | None:
    """Converse names its guardrail in the body (``guardrailConfig``) rather than in a header."""
    body = RequestBody.of(body)
    if b'"guardrailConfig"' not in body.raw:
        return None
    parsed = body.json
    config = parsed.get("guardrailConfig") if isinstance(parsed, dict) else None
    return config.get("guardrailIdentifier") if isinstance(config, dict) else None


def _async_invoke_operation(method: str, arn: str | None) -> str:
    if method == "POST" and arn is None:
        return START_ASYNC_INVOKE
    if method == "GET":
        return GET_ASYNC_INVOKE if arn else LIST_ASYNC_INVOKES
    raise BedrockError("UnknownOperationException", f"bedrock-balancer: {method} /async-invoke is not a Bedrock Runtime operation")


def decode_model_id(raw_model_id: str) -> str:
    try:
        model_id = unquote(raw_model_id, errors="strict") if "%" in raw_model_id else raw_model_id
    except UnicodeDecodeError:
        model_id = ""
    if not _MODEL_ID_CHARS.match(model_id) or ".." in model_id.split("/"):
        raise BedrockError("ValidationException", "bedrock-balancer: the model identifier contains characters a model id cannot have")
    return model_id

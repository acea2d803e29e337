"""Who may spend the proxy's AWS credentials: client authentication, request hygiene, per-client limits.

Plain code, no mitmproxy import; the addon calls it from its ``request`` hook with the request *as the
client sent it* (raw, percent-encoded path and query, headers in arrival order, body bytes).

* :class:`Authenticator` checks a virtual SigV4 key exactly as AWS checks a real one (canonical request
  with the double-encoded path, signed headers, body hash, ±15 minutes, the credential scope) using the
  steps of :mod:`.sigv4`, or looks a Bedrock API key (``Authorization: Bearer``) up. It raises
  :class:`~.errors.BedrockError` with the type AWS would answer: ``MissingAuthenticationTokenException``,
  ``IncompleteSignatureException``, ``InvalidSignatureException``, ``UnrecognizedClientException``
  (and, for an API key Bedrock does not know, ``AccessDeniedException`` as Bedrock answers).
* :func:`check_request` / :func:`check_body` refuse hostile or malformed input before anything else
  looks at it: duplicated singleton headers, control characters, credentials in the query string,
  bodies that are not the JSON a JSON operation needs.
* :class:`ClientLimits` enforces per-client ``rpm``/``tpm`` with the same sliding-window ledger the
  routing uses for targets (keys ``("client:<name>", "*")``).

Secrets are looked up, never stored in an error message, a log line or a repr; signatures are compared
in constant time and API keys are found by their SHA-256, so timing tells nothing about either.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Callable, Iterable, Sequence

from . import sigv4
from .classify import (
    APPLY_GUARDRAIL,
    CONVERSE,
    CONVERSE_STREAM,
    COUNT_TOKENS,
    INVOKE,
    INVOKE_STREAM,
    REGION,
    START_ASYNC_INVOKE,
    RequestBody,
)
from .errors import BedrockError
from .quota import Budget, QuotaLedger, Reservation

SERVICE = "bedrock"
CLOCK_SKEW = timedelta(minutes=15)  # AWS's window for SigV4 request dates

MISSING_TOKEN_MESSAGE = "Missing Authentication Token"
INVALID_TOKEN_MESSAGE = "The security token included in the request is invalid."
SIGNATURE_MISMATCH_MESSAGE = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
)
API_KEY_INVALID_MESSAGE = "Authentication failed: Please make sure your API Key is valid."

_AMZ_DATE = re.compile(r"^\d{8}T\d{6}Z$")


@dataclass(frozen=True)
class Identity:
    """An authenticated client: its configured name, and how it proved it."""

    name: str
    method: str  # "sigv4" or "api-key"


def _error(error_type: str, message: str) -> BedrockError:
    return BedrockError(error_type, message)


def _values(headers: Sequence[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name]


class Authenticator:
    """Verifies virtual SigV4 keys and Bedrock API keys.

    ``clients`` are :class:`~.config.ClientKey` (name, access_key_id, secret_access_key) and
    ``api_keys`` :class:`~.config.ApiKey` (name, key). ``now`` returns the current UTC time (tests
    inject a clock). With ``debug_signatures`` a signature mismatch says which canonical request and
    string to sign the proxy computed, as S3 does, so a client author can find what differs.
    """

    def __init__(
        self,
        clients: Iterable = (),
        api_keys: Iterable = (),
        *,
        service: str = SERVICE,
        now: Callable[[], datetime] | None = None,
        debug_signatures: bool = False,
    ) -> None:
        self._secrets = {c.access_key_id: (c.name, c.secret_access_key) for c in clients}
        self._api_keys = {_digest(k.key): k.name for k in api_keys}
        self.service = service
        self.now = now or (lambda: datetime.now(timezone.utc))
        self.debug_signatures = debug_signatures

    def __repr__(self) -> str:
        return f"Authenticator({len(self._secrets)} virtual keys, {len(self._api_keys)} API keys)"

    def authenticate(
        self, method: str, raw_path: str, raw_query: str, headers: Sequence[tuple[str, str]], body: bytes
    ) -> Identity:
        """The client's identity, or :class:`BedrockError` with the error AWS would answer."""
        values = _values(headers, "authorization")
        if len(values) > 1:
            raise _error("IncompleteSignatureException", f"bedrock-balancer: the request carries {len(values)} Authorization headers; send one")
        authorization = values[0].strip() if values else ""
        if not authorization:
            raise _error("MissingAuthenticationTokenException", MISSING_TOKEN_MESSAGE)
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() == "bearer":
            return self._api_key(credential.strip())
        return self._sigv4(method, raw_path, raw_query, headers, body, authorization)

    # -- Bedrock API keys ----------------------------------------------------------------------

    def _api_key(self, key: str) -> Identity:
        name = self._api_keys.get(_digest(key)) if key else None
        if name is None:
            raise _error("AccessDeniedException", API_KEY_INVALID_MESSAGE)
        return Identity(name, "api-key")

    # -- SigV4 ---------------------------------------------------------------------------------

    def _sigv4(self, method, raw_path, raw_query, headers, body, authorization: str) -> Identity:
        try:
            auth = sigv4.parse_authorization(authorization)
        except sigv4.AuthorizationError as e:
            raise _error(
                "IncompleteSignatureException",
                f"Authorization header is not a valid AWS4-HMAC-SHA256 signature ({e}); expected "
                "'AWS4-HMAC-SHA256 Credential=<key>/<date>/<region>/<service>/aws4_request, SignedHeaders=..., Signature=...'",
            ) from None
        date_header, amz_date, request_time = _request_time(headers)
        if "host" not in auth.signed_headers:
            raise _error("InvalidSignatureException", "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.")
        if date_header not in auth.signed_headers:
            shown = "X-Amz-Date" if date_header == "x-amz-date" else "Date"
            raise _error("InvalidSignatureException", f"'{shown}' must be a 'SignedHeader' in the AWS Authorization.")
        if auth.date != amz_date[:8]:
            raise _error(
                "InvalidSignatureException",
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: "
                f"'{auth.date}' != '{amz_date[:8]}', from '{amz_date}'.",
            )
        if not REGION.match(auth.region):
            raise _error("InvalidSignatureException", "Credential should be scoped to a valid region. ")
        if auth.service != self.service:
            raise _error("InvalidSignatureException", f"Credential should be scoped to correct service: '{self.service}'. ")
        self._check_clock(amz_date, request_time)
        known = self._secrets.get(auth.access_key)
        if known is None:
            raise _error("UnrecognizedClientException", INVALID_TOKEN_MESSAGE)
        if _values(headers, "x-amz-security-token"):
            # Virtual keys are long-term keys: a session token cannot belong to one (AWS answers the same).
            raise _error("UnrecognizedClientException", INVALID_TOKEN_MESSAGE)
        name, secret = known
        body_hash = sigv4.payload_hash(body)
        declared = _values(headers, "x-amz-content-sha256")
        if declared and declared[0].strip() != body_hash:
            raise _error("InvalidSignatureException", "The provided 'x-amz-content-sha256' header does not match what was computed.")
        try:
            creq = sigv4.canonical_request(method, raw_path, raw_query, list(headers), auth.signed_headers, body_hash)
        except (UnicodeError, ValueError):  # a path or query that cannot be canonicalised cannot match
            raise _error("InvalidSignatureException", SIGNATURE_MISMATCH_MESSAGE) from None
        sts = sigv4.string_to_sign(amz_date, auth.scope, creq)
        expected = sigv4.signature(sigv4.signing_key(secret, auth.date, auth.region, auth.service), sts)
        if not hmac.compare_digest(expected, auth.signature):
            message = SIGNATURE_MISMATCH_MESSAGE
            if self.debug_signatures:
                message += (
                    f"\n\nThe Canonical String for this request should have been\n'{creq}'\n\n"
                    f"The String-to-Sign should have been\n'{sts}'\n"
                )
            raise _error("InvalidSignatureException", message)
        return Identity(name, "sigv4")

    def _check_clock(self, amz_date: str, request_time: datetime) -> None:
        now = self.now()
        now_text = now.strftime(sigv4.AMZ_DATE_FORMAT)
        if request_time < now - CLOCK_SKEW:
            earliest = (now - CLOCK_SKEW).strftime(sigv4.AMZ_DATE_FORMAT)
            raise _error("InvalidSignatureException", f"Signature expired: {amz_date} is now earlier than {earliest} ({now_text} - 15 min.)")
        if request_time > now + CLOCK_SKEW:
            latest = (now + CLOCK_SKEW).strftime(sigv4.AMZ_DATE_FORMAT)
            raise _error("InvalidSignatureException", f"Signature not yet current: {amz_date} is still later than {latest} ({now_text} + 15 min.)")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _request_time(headers: Sequence[tuple[str, str]]) -> tuple[str, str, datetime]:
    """(header used, ISO-8601 basic time, parsed time) from X-Amz-Date, else from Date."""
    amz_dates = _values(headers, "x-amz-date")
    if len(amz_dates) > 1:
        raise _error("IncompleteSignatureException", "bedrock-balancer: the request carries more than one X-Amz-Date header")
    if amz_dates:
        amz_date = amz_dates[0].strip()
        if not _AMZ_DATE.match(amz_date):
            raise _error("IncompleteSignatureException", f"Date must be in ISO-8601 'basic format'. Got '{amz_date[:40]}'.")
        try:
            parsed = datetime.strptime(amz_date, sigv4.AMZ_DATE_FORMAT).replace(tzinfo=timezone.utc)
        except ValueError:
            raise _error("IncompleteSignatureException", f"Date must be in ISO-8601 'basic format'. Got '{amz_date}'.") from None
        return "x-amz-date", amz_date, parsed
    dates = _values(headers, "date")
    if len(dates) == 1:
        try:
            parsed = parsedate_to_datetime(dates[0])
            if parsed.tzinfo is None:
                raise ValueError("no time zone")
            parsed = parsed.astimezone(timezone.utc)
        except (TypeError, ValueError, IndexError):
            parsed = None
        if parsed is not None:
            return "date", parsed.strftime(sigv4.AMZ_DATE_FORMAT), parsed
    raise _error("IncompleteSignatureException", "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.")


# -- request hygiene -----------------------------------------------------------------------------

# Headers a request may carry once: two of them would mean two readings of one request (which one did
# the client sign? which one does the upstream see?).
SINGLETON_HEADERS = (
    "authorization",
    "host",
    "content-length",
    "content-type",
    "x-amz-date",
    "x-amz-security-token",
    "x-amz-content-sha256",
    "x-amzn-bedrock-guardrailidentifier",
    "x-amzn-bedrock-guardrailversion",
)
# SigV4 query-string authentication (presigned URLs): the relay forwards the query as it is, so
# credentials in it would travel upstream. Bedrock Runtime clients never use it.
QUERY_CREDENTIALS = frozenset(
    {"x-amz-algorithm", "x-amz-credential", "x-amz-signature", "x-amz-security-token", "x-amz-signedheaders", "x-amz-date"}
)
_TARGET_CHARS = re.compile(r"^[\x21-\x7e]*$")  # a request target is printable ASCII (RFC 3986)
_MAY_BE_IP = re.compile(r"[0-9A-Fa-f:.]+")  # the characters of IPv4 and IPv6 addresses
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Operations whose body is a JSON document by definition.
JSON_OPERATIONS = frozenset({CONVERSE, CONVERSE_STREAM, COUNT_TOKENS, APPLY_GUARDRAIL, START_ASYNC_INVOKE})
INVOKE_OPERATIONS = frozenset({INVOKE, INVOKE_STREAM})
MAX_JSON_DEPTH = 128
MALFORMED_BODY_MESSAGE = "Malformed input request, please reformat your input and try again."


def check_request(raw_path: str, raw_query: str, headers: Sequence[tuple[str, str]]) -> None:
    """Refuse a request whose target or headers are hostile or ambiguous (:class:`BedrockError`)."""
    if not _TARGET_CHARS.match(raw_path) or not _TARGET_CHARS.match(raw_query):
        raise _error("ValidationException", "bedrock-balancer: the request path must be printable ASCII, percent-encoded")
    for name, value in headers:
        if _CONTROL.search(value):
            raise _error("ValidationException", "bedrock-balancer: a header value contains control characters")
    counts: dict[str, int] = {}
    for name, _ in headers:
        lower = name.lower()
        counts[lower] = counts.get(lower, 0) + 1
    for name in SINGLETON_HEADERS:
        if counts.get(name, 0) > 1:
            error_type = "IncompleteSignatureException" if name == "authorization" else "ValidationException"
            raise _error(error_type, f"bedrock-balancer: the request carries {counts[name]} {name} headers; send one")
    for pair in raw_query.split("&") if raw_query else ():
        if pair.partition("=")[0].lower() in QUERY_CREDENTIALS:
            raise _error(
                "ValidationException",
                "bedrock-balancer: credentials in the query string (presigned requests) are not accepted; sign the "
                "Authorization header",
            )


def check_body(operation: str, headers: Sequence[tuple[str, str]], body: bytes | RequestBody) -> None:
    """A JSON operation's body must be a JSON object (so must an InvokeModel body sent as JSON)."""
    if operation in JSON_OPERATIONS:
        pass
    elif operation in INVOKE_OPERATIONS:
        content_type = (_values(headers, "content-type") or ["application/json"])[0]
        if not content_type.split(";", 1)[0].strip().lower().endswith("json"):
            return
    else:
        return
    parsed = RequestBody.of(body).json
    if not isinstance(parsed, dict) or _depth_exceeds(parsed, MAX_JSON_DEPTH):
        raise _error("ValidationException", f"bedrock-balancer: {MALFORMED_BODY_MESSAGE} (the body must be a JSON object)")


def _depth_exceeds(value: object, limit: int) -> bool:
    """Whether a parsed JSON value nests deeper than ``limit`` (iteratively: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))
    return False


# -- who is connecting ---------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether an address (or ``localhost``) is this machine's loopback, IPv4-mapped IPv6 included."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    address = _ip_address(host)
    return address is not None and address.is_loopback


def is_local_address(host: str) -> bool:
    """Whether an IP address is this machine's: loopback, unspecified (``0.0.0.0``, ``::``) or an interface's.

    An interface's address is recognised by binding a socket to it, which only works for local addresses.
    Names are not resolved here (``False``).
    """
    address = _ip_address(host.strip("[]"))
    if address is None:
        return False
    if address.is_loopback or address.is_unspecified:
        return True
    family = socket.AF_INET6 if isinstance(address, ipaddress.IPv6Address) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(address), 0))
        return True
    except OSError:
        return False


def _ip_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP address (an IPv4-mapped IPv6 one as IPv4, a zone dropped), or None for a name."""
    host = host.split("%", 1)[0]
    # Every Bedrock request asks about a host name: the ValueError of ipaddress cost more than the rest.
    if not _MAY_BE_IP.fullmatch(host):
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_local_listen_address(host: str) -> bool:
    """Whether a listen address accepts only this machine's clients (``""`` means every interface)."""
    return bool(host) and is_loopback(host)


# -- per-client limits ---------------------------------------------------------------------------


class ClientLimits:
    """Per-client ``rpm``/``tpm`` over the quota window, enforced up front (no waiting: a 429)."""

    def __init__(self, limits: Iterable[tuple[str, Budget]], window_s: float, clock: Callable[[], float] = time.monotonic):
        self._budgets = dict(limits)
        self.ledger = QuotaLedger(window_s, clock)
        self.state = None  # a shared state backend (see .state); its client_admit, if any, keeps the budgets
        self._pending: set = set()  # shared settlements under way

    def limits_tokens(self, name: str) -> bool:
        budget = self._budgets.get(name)
        return bool(budget and budget.tpm)

    def admit(self, name: str, tokens: int) -> Reservation | None:
        """Reserve one request and ``tokens`` for the client, or raise a ``ThrottlingException``."""
        budget = self._budgets.get(name)
        if budget is None:
            return None
        budgets = [((f"client:{name}", "*"), budget)]
        headroom = self.ledger.headroom(budgets, tokens)
        if headroom is not None and headroom < 0:
            requests, _ = self.ledger.usage(budgets[0][0])
            which = f"rpm limit ({budget.rpm} requests" if budget.rpm and requests + 1 > budget.rpm else f"tpm limit ({budget.tpm} tokens"
            wait = max(0.0, self.ledger.next_fit_at(budgets, tokens) - self.ledger.clock())
            raise _error(
                "ThrottlingException",
                f"bedrock-balancer: client {name!r} is over its {which} per {self.ledger.window_s:g} s); "
                f"please wait before trying again (room again in about {wait:.0f} s)",
            )
        return self.ledger.reserve(budgets, tokens)

    async def admit_shared(self, name: str, tokens: int):
        """:meth:`admit`, in the shared state when there is one (falling back to this process's ledger)."""
        budget = self._budgets.get(name)
        shared = getattr(self.state, "client_admit", None)
        if budget is None or shared is None:
            return self.admit(name, tokens)
        outcome = await shared(name, budget.rpm, budget.tpm, tokens)
        if outcome is None:  # Redis unreachable: this process's own ledger
            return self.admit(name, tokens)
        admitted, lease, wait = outcome
        if not admitted:
            which = (
                f"rpm limit ({budget.rpm} requests" if not budget.tpm
                else f"tpm limit ({budget.tpm} tokens" if not budget.rpm
                else f"rpm/tpm limit ({budget.rpm} requests, {budget.tpm} tokens"
            )
            raise _error(
                "ThrottlingException",
                f"bedrock-balancer: client {name!r} is over its {which} per {self.ledger.window_s:g} s); "
                f"please wait before trying again (room again in about {max(0.0, wait):.0f} s)",
            )
        return lease

    def settle(self, reservation, tokens: int) -> None:
        if reservation is None:
            return
        if isinstance(reservation, Reservation):
            self.ledger.settle(reservation, tokens)
            return
        import asyncio  # a shared lease: settled in the background (the hooks that settle are synchronous)

        try:
            task = asyncio.get_running_loop().create_task(self.state.settle(reservation, tokens))
        except RuntimeError:  # no running loop (shutting down): the reservation keeps its estimate until it expires
            return
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

"""Server-side AWS Signature Version 4 verification, written from the specification.

The emulator is the judge of the project's re-signing, so it must not share code with the signer
it judges: nothing here imports ``bedrock_balancer.sigv4`` or botocore's signer. The canonical
request is rebuilt from the request *as received on the wire*:

* canonical URI: the raw path (already percent-encoded by the client) with dot segments and empty
  segments removed, then percent-encoded once more, as SigV4 requires for every service but S3
  (so ``anthropic.claude-v2%3A1`` is signed as ``anthropic.claude-v2%253A1``);
* canonical query: each name and value percent-decoded, re-encoded with the RFC 3986 unreserved set,
  sorted by name then value;
* canonical headers: exactly the names listed in ``SignedHeaders``, lower-cased, values trimmed with
  inner whitespace runs collapsed, repeated headers joined with ``,`` in arrival order (a listed
  header that is absent contributes an empty value, which simply makes the signature mismatch);
* payload hash: SHA-256 of the body bytes actually received.

Correctness is pinned by the official SigV4 test suite (``shared/data/sigv4-testsuite``) and by
real boto3 clients in the tests.

Checks happen in the order a caller can act on: a malformed header first
(``IncompleteSignatureException``), then the structural rules (``host`` and the date header signed,
the credential scope's date, region, service and terminator), then the clock, then the key, the
session token, and finally the signature itself. Each failure raises :class:`AuthFailure` carrying
the AWS error type and AWS's wording.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Callable, Iterable, Sequence
from urllib.parse import quote, unquote_to_bytes

ALGORITHM = "AWS4-HMAC-SHA256"
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

SIGNATURE_MISMATCH_MESSAGE = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. "
    "Consult the service documentation for details."
)
INVALID_TOKEN_MESSAGE = "The security token included in the request is invalid."
EXPIRED_TOKEN_MESSAGE = "The security token included in the request is expired"

_AUTH_PARAM = re.compile(r"\s*([A-Za-z]+)=([^,\s]*)\s*")
_AMZ_DATE = re.compile(r"^\d{8}T\d{6}Z$")


class AuthFailure(Exception):
    """A request AWS would refuse before running it."""

    def __init__(self, error_type: str, message: str, status: int = 403) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class CredentialRecord:
    """A key pair the emulator accepts; temporary ones carry a session token and an expiry."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None
    expires_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class ParsedAuthorization:
    access_key_id: str
    scope_date: str
    scope_region: str
    scope_service: str
    scope_terminator: str
    signed_headers: tuple[str, ...]
    signature: str

    @property
    def credential_scope(self) -> str:
        return "/".join(
            (self.scope_date, self.scope_region, self.scope_service, self.scope_terminator)
        )


@dataclass(frozen=True, slots=True)
class VerifiedRequest:
    """What a successful check established about the caller."""

    access_key_id: str
    region: str
    service: str
    temporary: bool


# --------------------------------------------------------------------------------------------------
# Canonical request pieces (pure functions, exercised directly by the SigV4 test suite)


def split_target(raw_target: bytes) -> tuple[bytes, bytes]:
    """Split a request target into raw path and raw query (without the ``?``)."""
    path, _, query = raw_target.partition(b"?")
    return path, query


def remove_dot_segments(path: bytes) -> bytes:
    """Normalise ``.``/``..`` and empty segments, keeping a trailing slash (the non-S3 rule)."""
    if not path:
        return b"/"
    kept: list[bytes] = []
    for segment in path.split(b"/"):
        if segment in (b"", b"."):
            continue
        if segment == b"..":
            if kept:
                kept.pop()
            continue
        kept.append(segment)
    trailing = b"/" if path.endswith(b"/") and kept else b""
    return b"/" + b"/".join(kept) + trailing


def canonical_uri(raw_path: bytes) -> str:
    """The wire path normalised, then percent-encoded once more (``%3A`` -> ``%253A``)."""
    return quote(remove_dot_segments(raw_path), safe="/~")


def canonical_query(raw_query: bytes) -> str:
    pairs = []
    for item in raw_query.split(b"&"):
        if not item:
            continue
        name, _, value = item.partition(b"=")
        pairs.append(
            (
                quote(unquote_to_bytes(name), safe="-_.~"),
                quote(unquote_to_bytes(value), safe="-_.~"),
            )
        )
    pairs.sort()
    return "&".join(f"{name}={value}" for name, value in pairs)


def collapse_whitespace(value: str) -> str:
    return " ".join(value.split())


def canonical_headers(headers: Iterable[tuple[str, str]], signed_headers: Sequence[str]) -> str:
    wanted = {name: [] for name in signed_headers}
    for name, value in headers:
        values = wanted.get(name.lower())
        if values is not None:
            values.append(collapse_whitespace(value))
    return "".join(f"{name}:{','.join(wanted[name])}\n" for name in signed_headers)


def canonical_request(
    method: str,
    raw_target: bytes,
    headers: Iterable[tuple[str, str]],
    signed_headers: Sequence[str],
    payload_hash: str,
) -> str:
    raw_path, raw_query = split_target(raw_target)
    return "\n".join(
        (
            method.upper(),
            canonical_uri(raw_path),
            canonical_query(raw_query),
            canonical_headers(headers, signed_headers),
            ";".join(signed_headers),
            payload_hash,
        )
    )


def string_to_sign(amz_date: str, credential_scope: str, canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return "\n".join((ALGORITHM, amz_date, credential_scope, digest))


def signing_key(secret_access_key: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret_access_key).encode("utf-8")
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def compute_signature(key: bytes, to_sign: str) -> str:
    return hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------------------------------
# Authorization header


def parse_authorization(value: str) -> ParsedAuthorization:
    """Parse ``AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...``."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise AuthFailure(
            "IncompleteSignatureException",
            f"Unsupported AWS 'algorithm': '{algorithm}'. Authorization={value}",
        )
    params: dict[str, str] = {}
    for item in rest.split(","):
        match = _AUTH_PARAM.fullmatch(item)
        if not match:
            raise AuthFailure(
                "IncompleteSignatureException",
                f"'{item.strip()}' not a valid key=value pair (missing equal-sign) in "
                f"Authorization header: '{value}'.",
            )
        params[match.group(1)] = match.group(2)
    missing = [
        f"Authorization header requires '{name}' parameter."
        for name in ("Credential", "Signature", "SignedHeaders")
        if not params.get(name)
    ]
    if missing:
        raise AuthFailure("IncompleteSignatureException", " ".join(missing) + f" Authorization={value}")
    credential = params["Credential"].split("/")
    if len(credential) != 5 or not all(credential):
        raise AuthFailure(
            "IncompleteSignatureException",
            f"Authorization header credential '{params['Credential']}' is malformed; expected "
            "'<access key>/<date>/<region>/<service>/aws4_request'.",
        )
    signed_headers = tuple(params["SignedHeaders"].split(";"))
    return ParsedAuthorization(
        access_key_id=credential[0],
        scope_date=credential[1],
        scope_region=credential[2],
        scope_service=credential[3],
        scope_terminator=credential[4],
        signed_headers=signed_headers,
        signature=params["Signature"],
    )


# --------------------------------------------------------------------------------------------------
# The check


def _first_header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    for header_name, value in headers:
        if header_name.lower() == name:
            return value
    return None


def _request_time(headers: Sequence[tuple[str, str]]) -> tuple[str, str, dt.datetime]:
    """(header used, ISO-8601 basic timestamp, parsed time) from X-Amz-Date, else Date."""
    amz_date = _first_header(headers, "x-amz-date")
    if amz_date is not None:
        amz_date = amz_date.strip()
        if not _AMZ_DATE.match(amz_date):
            raise AuthFailure(
                "IncompleteSignatureException",
                f"Date must be in ISO-8601 'basic format'. Got '{amz_date}'. "
                "See http://en.wikipedia.org/wiki/ISO_8601",
            )
        parsed = dt.datetime.strptime(amz_date, AMZ_DATE_FORMAT).replace(tzinfo=dt.timezone.utc)
        return "x-amz-date", amz_date, parsed
    http_date = _first_header(headers, "date")
    if http_date is not None:
        try:
            parsed = parsedate_to_datetime(http_date).astimezone(dt.timezone.utc)
        except (TypeError, ValueError):
            parsed = None
        if parsed is not None:
            return "date", parsed.strftime(AMZ_DATE_FORMAT), parsed
    raise AuthFailure(
        "IncompleteSignatureException",
        "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.",
    )


def _format_skew(seconds: float) -> str:
    return f"{seconds / 60:g} min."


def _check_clock(amz_date: str, request_time: dt.datetime, now: dt.datetime, skew_s: float) -> None:
    skew = dt.timedelta(seconds=skew_s)
    now_text = now.strftime(AMZ_DATE_FORMAT)
    if request_time < now - skew:
        earliest = (now - skew).strftime(AMZ_DATE_FORMAT)
        raise AuthFailure(
            "InvalidSignatureException",
            f"Signature expired: {amz_date} is now earlier than {earliest} "
            f"({now_text} - {_format_skew(skew_s)})",
        )
    if request_time > now + skew:
        latest = (now + skew).strftime(AMZ_DATE_FORMAT)
        raise AuthFailure(
            "InvalidSignatureException",
            f"Signature not yet current: {amz_date} is still later than {latest} "
            f"({now_text} + {_format_skew(skew_s)})",
        )


def _check_scope(auth: ParsedAuthorization, amz_date: str, region: str | None, service: str) -> None:
    if "host" not in auth.signed_headers:
        raise AuthFailure(
            "InvalidSignatureException",
            "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.",
        )
    if auth.scope_date != amz_date[:8]:
        raise AuthFailure(
            "InvalidSignatureException",
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from "
            f"HTTP: '{auth.scope_date}' != '{amz_date[:8]}', from '{amz_date}'.",
        )
    if region is not None and auth.scope_region != region:
        raise AuthFailure("InvalidSignatureException", "Credential should be scoped to a valid region. ")
    if auth.scope_service != service:
        raise AuthFailure(
            "InvalidSignatureException", f"Credential should be scoped to correct service: '{service}'. "
        )
    if auth.scope_terminator != "aws4_request":
        raise AuthFailure(
            "InvalidSignatureException",
            "Credential should be scoped with a valid terminator: 'aws4_request', "
            f"not '{auth.scope_terminator}'. ",
        )


def _check_session_token(
    record: CredentialRecord, auth: ParsedAuthorization, headers: Sequence[tuple[str, str]], now: dt.datetime
) -> None:
    token = _first_header(headers, "x-amz-security-token")
    if record.session_token is None:
        if token is not None:
            raise AuthFailure("UnrecognizedClientException", INVALID_TOKEN_MESSAGE)
        return
    signed = "x-amz-security-token" in auth.signed_headers
    if token is None or not signed or not hmac.compare_digest(token.strip(), record.session_token):
        raise AuthFailure("UnrecognizedClientException", INVALID_TOKEN_MESSAGE)
    if record.expires_at is not None and now >= record.expires_at:
        raise AuthFailure("ExpiredTokenException", EXPIRED_TOKEN_MESSAGE)


def _payload_hash(headers: Sequence[tuple[str, str]], body: bytes) -> str:
    actual = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
    declared = _first_header(headers, "x-amz-content-sha256")
    if declared is not None and declared.strip() != actual:
        raise AuthFailure(
            "InvalidSignatureException",
            "The provided 'x-amz-content-sha256' header does not match what was computed.",
        )
    return actual


def verify_sigv4(
    *,
    method: str,
    raw_target: bytes,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    authorization: str,
    region: str | None,
    service: str,
    lookup_credentials: Callable[[str], CredentialRecord | None],
    now: dt.datetime,
    clock_skew_s: float,
) -> VerifiedRequest:
    """Judge one request exactly as AWS would; raise :class:`AuthFailure` when AWS would refuse it.

    ``region`` None accepts any region in the scope (STS is global). ``headers`` are the request
    headers in arrival order with their received names.
    """
    auth = parse_authorization(authorization)
    date_header, amz_date, request_time = _request_time(headers)
    _check_scope(auth, amz_date, region, service)
    if date_header not in auth.signed_headers:
        raise AuthFailure(
            "InvalidSignatureException",
            f"'{'X-Amz-Date' if date_header == 'x-amz-date' else 'Date'}' must be a 'SignedHeader' "
            "in the AWS Authorization.",
        )
    _check_clock(amz_date, request_time, now, clock_skew_s)
    record = lookup_credentials(auth.access_key_id)
    if record is None:
        raise AuthFailure("UnrecognizedClientException", INVALID_TOKEN_MESSAGE)
    _check_session_token(record, auth, headers, now)
    payload_hash = _payload_hash(headers, body)
    canonical = canonical_request(method, raw_target, headers, auth.signed_headers, payload_hash)
    to_sign = string_to_sign(amz_date, auth.credential_scope, canonical)
    key = signing_key(record.secret_access_key, auth.scope_date, auth.scope_region, auth.scope_service)
    expected = compute_signature(key, to_sign)
    if not hmac.compare_digest(expected, auth.signature):
        raise AuthFailure(
            "InvalidSignatureException",
            f"{SIGNATURE_MISMATCH_MESSAGE}\n\nThe Canonical String for this request should have been\n"
            f"'{canonical}'\n\nThe String-to-Sign should have been\n'{to_sign}'\n",
        )
    return VerifiedRequest(
        access_key_id=auth.access_key_id,
        region=auth.scope_region,
        service=auth.scope_service,
        temporary=record.session_token is not None,
    )

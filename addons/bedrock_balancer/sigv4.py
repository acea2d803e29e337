"""AWS Signature Version 4, the steps named as the specification names them.

    canonical request  ->  string to sign  ->  signing key  ->  signature  ->  Authorization header

The proxy signs every request it sends upstream with this module (and, with client
authentication, verifies what clients send). It works on the request *as it is on the wire*: the
path is the raw, already percent-encoded path, and the canonical URI encodes it once more, which is
what AWS services other than S3 expect (``%3A`` in a model id becomes ``%253A``).

Checked against the official AWS SigV4 test suite (``tests/test_sigv4.py``); the Bedrock emulator
judges our signatures with an independent implementation built from botocore's pieces.

Performance: the signing key depends only on (secret, date, region, service), so it is derived once
per day and region and cached; a request then costs one SHA-256 of the body and one HMAC.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"  # X-Amz-Date: ISO 8601 basic format, UTC
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

# Hop-by-hop headers (RFC 9110 7.6.1 and their common legacy forms): each hop may change them.
HOP_BY_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-authorization", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
# Headers that never take part in a signature: hop-by-hop ones, and those botocore leaves out because
# intermediaries rewrite them.
UNSIGNABLE_HEADERS = HOP_BY_HOP_HEADERS | {"authorization", "content-length", "expect", "user-agent", "x-amzn-trace-id"}

_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None

    def __repr__(self) -> str:  # never print a secret, even by accident
        return f"Credentials(access_key={self.access_key!r}, secret_key=***, token={'***' if self.token else None})"


@dataclass(frozen=True, slots=True)
class Authorization:
    """The parts of an ``Authorization: AWS4-HMAC-SHA256 ...`` header."""

    access_key: str
    date: str  # YYYYMMDD
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str

    @property
    def scope(self) -> str:
        return credential_scope(self.date, self.region, self.service)


KNOWN_AUTHORIZATION_SCHEMES = {"basic", "bearer", "digest", "negotiate", "aws", "aws4-ecdsa-p256-sha256"}
SIGV4_FIELDS = ("Credential", "SignedHeaders", "Signature")


class AuthorizationError(ValueError):
    """The Authorization header is not a well-formed SigV4 header."""


def parse_authorization(value: str) -> Authorization:
    # The errors name what is wrong but never quote the header: a client that puts an API key or a secret
    # where the scheme or a field should be would find it in the answer, the log line and the access log.
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        named = f"{algorithm!r}, not " if algorithm.lower() in KNOWN_AUTHORIZATION_SCHEMES else "not "
        raise AuthorizationError(f"unsupported authorization scheme ({named}{ALGORITHM})")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        key, sep, val = part.strip().partition("=")
        if not sep:
            raise AuthorizationError("malformed authorization field (one without '=')")
        if key in fields:
            raise AuthorizationError(f"malformed authorization: {key if key in SIGV4_FIELDS else 'a field'} is given twice")
        fields[key] = val
    try:
        credential, signed_headers, signature = fields["Credential"], fields["SignedHeaders"], fields["Signature"]
    except KeyError as missing:
        raise AuthorizationError(f"authorization header lacks {missing.args[0]}") from None
    access_key, date, region, service, terminator = (credential.split("/") + [""] * 5)[:5]
    if not (access_key and re.fullmatch(r"\d{8}", date) and region and service) or terminator != "aws4_request":
        raise AuthorizationError("malformed Credential scope")
    if not re.fullmatch(r"[0-9a-f]{64}", signature):
        raise AuthorizationError("malformed Signature")
    headers = tuple(signed_headers.split(";"))
    if not all(headers):
        raise AuthorizationError("malformed SignedHeaders")
    return Authorization(access_key, date, region, service, headers, signature)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4, plus AWS's rule that consecutive slashes collapse."""
    if not path:
        return "/"
    segments: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
        else:
            segments.append(segment)
    first = "/" if path.startswith("/") else ""
    last = "/" if path.endswith("/") and segments else ""
    return first + "/".join(segments) + last


@functools.lru_cache(maxsize=1024)  # a proxy signs the same few model paths over and over
def canonical_uri(raw_path: str) -> str:
    """The wire path, normalised and URI-encoded once more (``%3A`` -> ``%253A``)."""
    return quote(remove_dot_segments(raw_path), safe="/~")


def canonical_query_string(raw_query: str) -> str:
    if not raw_query:
        return ""
    pairs = []
    for pair in raw_query.split("&"):
        name, _, value = pair.partition("=")
        pairs.append((quote(unquote(name), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def canonical_headers(headers: list[tuple[str, str]], signed_headers: tuple[str, ...]) -> str:
    """``name:value`` lines for the signed headers; repeated headers joined by commas in order."""
    values: dict[str, list[str]] = {name: [] for name in signed_headers}
    for name, value in headers:
        name = name.lower()
        if name in values:
            values[name].append(_WHITESPACE.sub(" ", value.strip()))
    return "".join(f"{name}:{','.join(values[name])}\n" for name in signed_headers)


def canonical_request(
    method: str,
    raw_path: str,
    raw_query: str,
    headers: list[tuple[str, str]],
    signed_headers: tuple[str, ...],
    payload_hash: str,
) -> str:
    return "\n".join(
        (
            method.upper(),
            canonical_uri(raw_path),
            canonical_query_string(raw_query),
            canonical_headers(headers, signed_headers),
            ";".join(signed_headers),
            payload_hash,
        )
    )


def credential_scope(date: str, region: str, service: str) -> str:
    return f"{date}/{region}/{service}/aws4_request"


def string_to_sign(amz_date: str, scope: str, canonical_request_text: str) -> str:
    digest = hashlib.sha256(canonical_request_text.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


@functools.lru_cache(maxsize=256)
def signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    key = _hmac(("AWS4" + secret_key).encode("utf-8"), date)
    key = _hmac(key, region)
    key = _hmac(key, service)
    return _hmac(key, "aws4_request")


def signature(key: bytes, string_to_sign_text: str) -> str:
    return hmac.new(key, string_to_sign_text.encode("utf-8"), hashlib.sha256).hexdigest()


def authorization_header(access_key: str, scope: str, signed_headers: tuple[str, ...], sig: str) -> str:
    return f"{ALGORITHM} Credential={access_key}/{scope}, SignedHeaders={';'.join(signed_headers)}, Signature={sig}"


def payload_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256


def amz_date(now: datetime | None = None) -> str:
    if now is None:  # the clock, without building a datetime: a third of the cost, on every request
        return time.strftime(AMZ_DATE_FORMAT, time.gmtime())
    return now.strftime(AMZ_DATE_FORMAT)


def headers_to_sign(headers: list[tuple[str, str]]) -> tuple[str, ...]:
    return tuple(sorted({name.lower() for name, _ in headers} - UNSIGNABLE_HEADERS))


def sign(
    method: str,
    raw_path: str,
    raw_query: str,
    headers: list[tuple[str, str]],
    body_hash: str,
    region: str,
    service: str,
    credentials: Credentials,
    now: datetime | None = None,
) -> list[tuple[str, str]]:
    """Sign a request and return the headers to add to it.

    ``headers`` must already hold ``host`` and must not hold any earlier signature; every header in it
    except the unsignable ones is signed. Returns ``x-amz-date``, ``x-amz-security-token`` (temporary
    credentials only) and ``authorization``, in the order a request should carry them.
    """
    date_time = amz_date(now)
    added = [("x-amz-date", date_time)]
    if credentials.token:
        added.append(("x-amz-security-token", credentials.token))
    all_headers = headers + added
    signed = headers_to_sign(all_headers)
    scope = credential_scope(date_time[:8], region, service)
    creq = canonical_request(method, raw_path, raw_query, all_headers, signed, body_hash)
    sts = string_to_sign(date_time, scope, creq)
    sig = signature(signing_key(credentials.secret_key, date_time[:8], region, service), sts)
    added.append(("authorization", authorization_header(credentials.access_key, scope, signed, sig)))
    return added


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()

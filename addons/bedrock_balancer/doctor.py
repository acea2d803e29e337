"""``bedrock-sigv4``: the signature doctor. Why does AWS reject this request's signature?

Given one request (from a mitmproxy flow file written with ``-w`` / ``save_stream_file``, or a raw
HTTP request in a text file) and the credentials that signed it, it prints what SigV4 computes
step by step — canonical request, string to sign, credential scope, signature — and compares the
signature with the one the request carries. When they differ it recomputes the signature with one
input changed at a time (credential-scope region, service, date; the signed-header set; the path
encoded once instead of twice; the body re-serialised; ``x-amz-date`` moved in time; the ``Host``
a client addressed) and names the input whose change reproduces the request's signature, with the
canonical requests (or strings to sign) diffed.

    bedrock-sigv4 flows.mitm --index 2 --region us-east-1     # credentials from the environment / profile
    bedrock-sigv4 request.txt --access-key AKID... --secret-key ...
    bedrock-sigv4 flows.mitm --list

Exit status: 0 the signature was reproduced (and its scope fits where the request went), 1 it was
not (or the scope / clock is wrong), 2 a usage or input problem: no such flow, no SigV4
``Authorization``, no credentials, or a signature redacted by bedrock-balancer (flows saved from
the proxy show the request as the proxy sent it, ``Signature=<redacted>``: nothing to compare).

Secrets are never printed: neither the secret key nor a session token. The canonical requests it
prints (its own, the variants' and the one an AWS error quotes) show a credential header's value as
its length only; the signatures are computed over the real values.

This module does not import mitmproxy at import time (only to read flow files), so
:func:`authorization_parts` is cheap to use from the content view.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import difflib
import hmac
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import quote, unquote

from . import sigv4

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2
BEDROCK_SERVICE = "bedrock"
CLOCK_SKEW_S = 300  # AWS's allowance between x-amz-date and its clock
DATE_SEARCH_S = 900  # how far x-amz-date is searched when it may have been re-stamped
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"

_HEX64 = re.compile(r"[0-9a-f]{64}")
# A canonical request carries the session token (and, if a client signed it, the Authorization header)
# in clear; these are what :func:`printable` masks: a header line, or the token as a query parameter.
_CREDENTIAL_HEADER_LINE = re.compile(r"^(?P<key>(?:x-amz-security-token|authorization):)(?P<value>.*)$", re.IGNORECASE | re.MULTILINE)
_CREDENTIAL_QUERY_PARAMETER = re.compile(r"(?P<key>X-Amz-Security-Token=)(?P<value>[^&\n]*)", re.IGNORECASE)
_BEDROCK_HOST = re.compile(
    r"^(?:vpce-[^.]+\.)?bedrock-runtime(?:-fips)?\.(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)\.", re.IGNORECASE
)


# --------------------------------------------------------------------------------------------------
# Authorization header, leniently


def authorization_parts(value: str | None) -> dict | None:
    """The parts of a SigV4 ``Authorization`` header, tolerating a redacted or missing signature.

    Returns None for anything that is not ``AWS4-HMAC-SHA256`` with a five-part ``Credential``.
    ``signature_state`` is ``present`` (64 hex digits), ``redacted`` (``<redacted>``, as
    bedrock-balancer shows it), ``missing`` or ``malformed``.
    """
    if not value:
        return None
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != sigv4.ALGORITHM:
        return None
    fields: dict[str, str] = {}
    for part in rest.split(","):
        key, sep, val = part.strip().partition("=")
        if sep:
            fields.setdefault(key.strip(), val.strip())
    credential = fields.get("Credential", "").split("/")
    if len(credential) != 5 or not all(credential[:4]):
        return None
    signature = fields.get("Signature")
    if signature is None or signature == "":
        state = "missing"
    elif _HEX64.fullmatch(signature):
        state = "present"
    elif "redacted" in signature.lower() or set(signature) <= {"*", "<", ">", "."}:
        state = "redacted"
    else:
        state = "malformed"
    return {
        "access_key_id": credential[0],
        "date": credential[1],
        "region": credential[2],
        "service": credential[3],
        "terminator": credential[4],
        "signed_headers": tuple(h for h in fields.get("SignedHeaders", "").split(";") if h),
        "signature": signature if state == "present" else None,
        "signature_state": state,
    }


# --------------------------------------------------------------------------------------------------
# The request under examination


class InputError(Exception):
    """A problem with the input: exit status 2."""


@dataclass
class Request:
    method: str
    path: str  # raw, as on the wire, without the query
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    origin: str  # where it came from, for the report
    received_at: dt.datetime | None = None  # when a proxy captured it (flow files)
    host_candidates: list[tuple[str, str]] = field(default_factory=list)  # (host, why) the client may have signed
    response_status: int | None = None
    response_text: str | None = None
    notes: list[str] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None

    @property
    def host(self) -> str | None:
        return self.header("host")


def parse_raw_request(data: bytes, origin: str = "request") -> Request:
    """An HTTP/1.x request as text: request line, headers (folded lines allowed), blank line, body."""
    crlf, lf = data.find(b"\r\n\r\n"), data.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf <= lf):
        head, body = data[:crlf], data[crlf + 4 :]
    elif lf >= 0:
        head, body = data[:lf], data[lf + 2 :]
    else:
        head, body = data, b""
    lines = head.decode("utf-8", "surrogateescape").replace("\r\n", "\n").split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines:
        raise InputError(f"{origin}: empty request")
    request_line = lines[0]
    match = re.fullmatch(r"([A-Za-z]+) (.+?)(?: (HTTP/\d(?:\.\d)?))?", request_line.rstrip())
    if not match:
        raise InputError(f"{origin}: not an HTTP request line: {request_line[:80]!r}")
    method, target = match.group(1).upper(), match.group(2)
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line.strip():
            continue
        if line[:1] in (" ", "\t") and headers:  # obsolete line folding continues the previous value
            name, value = headers[-1]
            headers[-1] = (name, value + " " + line.strip())
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise InputError(f"{origin}: malformed header line {line[:80]!r}")
        headers.append((name.strip(), value))
    notes = []
    if re.match(r"https?://", target):  # absolute form (proxy requests)
        scheme_rest = target.split("://", 1)[1]
        authority, slash, rest = scheme_rest.partition("/")
        target = slash + rest if slash else "/"
        if not any(n.lower() == "host" for n, _ in headers):
            headers.insert(0, ("Host", authority))
    path, _, query = target.partition("?")
    length = next((v.strip() for n, v in headers if n.lower() == "content-length"), None)
    if length and length.isdigit():
        declared = int(length)
        if len(body) > declared:
            notes.append(f"the body after the headers is {len(body)} bytes, Content-Length says {declared}: using the first {declared}")
            body = body[:declared]
        elif len(body) < declared:
            notes.append(f"the body is {len(body)} bytes but Content-Length says {declared}: the file may be cut")
    return Request(method, path, query, headers, body, origin, notes=notes)


def looks_like_flow_file(data: bytes) -> bool:
    return re.match(rb"\d+:", data[:12]) is not None


def read_flows(path: Path) -> list[Any]:
    from mitmproxy import exceptions, http, io

    flows = []
    with path.open("rb") as f:
        try:
            for flow in io.FlowReader(f).stream():
                if isinstance(flow, http.HTTPFlow):
                    flows.append(flow)
        except exceptions.FlowReadException as e:
            if not flows:
                raise InputError(f"{path}: not a readable flow file: {e}") from None
    return flows


def request_from_flow(flow: Any, origin: str) -> Request:
    request = flow.request
    raw_path, _, query = request.path.partition("?")
    headers = list(request.headers.items(multi=True))
    req = Request(
        method=request.method,
        path=raw_path,
        query=query,
        headers=headers,
        body=request.raw_content or b"",
        origin=origin,
        received_at=dt.datetime.fromtimestamp(request.timestamp_start, dt.timezone.utc) if request.timestamp_start else None,
    )
    if req.host is None and request.authority:  # HTTP/2: the host travels as :authority
        req.headers.insert(0, ("host", request.authority))
        req.notes.append("HTTP/2 request: using :authority as the host header")
    elif req.host is None:
        req.headers.insert(0, ("host", request.host_header or request.host))
    # In reverse mode mitmproxy replaces Host with the upstream's unless keep_host_header is set;
    # the client signed the address it connected to.
    sockname = getattr(flow.client_conn, "sockname", None)
    if sockname:
        host, port = sockname[0], sockname[1]
        for candidate in (f"{host}:{port}", f"localhost:{port}"):
            if candidate != req.host:
                req.host_candidates.append((candidate, "the proxy address the client connected to (mitmproxy may have rewritten Host in reverse mode)"))
    client = flow.metadata.get("bedrock_balancer.client_sigv4")
    if isinstance(client, dict):
        req.notes.append(
            "bedrock-balancer flow: the client had signed with {} for {}/{}/{} (signed headers {}); the proxy re-signed it "
            "and keeps neither signature".format(
                client.get("access_key_id"), client.get("date"), client.get("region"), client.get("service"),
                ";".join(client.get("signed_headers") or []))
        )
    if flow.response is not None:
        req.response_status = flow.response.status_code
        try:
            req.response_text = flow.response.get_text(strict=False)
        except Exception:
            req.response_text = None
    return req


def describe_flow(flow: Any) -> str:
    status = flow.response.status_code if flow.response is not None else "-"
    auth = authorization_parts(flow.request.headers.get("authorization"))
    sig = auth["signature_state"] if auth else ("bearer" if (flow.request.headers.get("authorization") or "").lower().startswith("bearer") else "no sigv4")
    return f"{flow.request.method} {flow.request.pretty_url} -> {status} [{sig}]"


def select_flow(flows: list[Any], index: int | None, url: str | None, path: Path) -> tuple[Any, str]:
    if not flows:
        raise InputError(f"{path}: no HTTP flows")
    if index is not None:
        if not 0 <= index < len(flows):
            raise InputError(f"{path}: --index {index} out of range (0..{len(flows) - 1}; see --list)")
        return flows[index], f"flow {index} of {len(flows)} in {path}"
    candidates = list(enumerate(flows))
    if url:
        pattern = re.compile(url)
        candidates = [(i, f) for i, f in candidates if pattern.search(f.request.pretty_url)]
        if not candidates:
            raise InputError(f"{path}: no flow URL matches {url!r} (see --list)")
    signed = [(i, f) for i, f in candidates if authorization_parts(f.request.headers.get("authorization"))]
    i, flow = (signed or candidates)[0]
    origin = f"flow {i} of {len(flows)} in {path}"
    if len(candidates) > 1:
        origin += f" (the first of {len(candidates)} {'matching ' if url else ''}flows; pick another with --index or --url)"
    return flow, origin


# --------------------------------------------------------------------------------------------------
# Signing, with every input explicit so variants can change one


@dataclass(frozen=True)
class Inputs:
    method: str
    canonical_uri: str
    query: str
    headers: tuple[tuple[str, str], ...]
    signed_headers: tuple[str, ...]
    payload_hash: str
    amz_date: str
    date: str
    region: str
    service: str

    @property
    def scope(self) -> str:
        return sigv4.credential_scope(self.date, self.region, self.service)

    def canonical_request(self) -> str:
        return "\n".join(
            (
                self.method.upper(),
                self.canonical_uri,
                sigv4.canonical_query_string(self.query),
                sigv4.canonical_headers(list(self.headers), self.signed_headers),
                ";".join(self.signed_headers),
                self.payload_hash,
            )
        )

    def string_to_sign(self, creq: str | None = None) -> str:
        return sigv4.string_to_sign(self.amz_date, self.scope, creq if creq is not None else self.canonical_request())

    def signature(self, secret: str) -> str:
        return sigv4.signature(sigv4.signing_key(secret, self.date, self.region, self.service), self.string_to_sign())


@dataclass
class Finding:
    kind: str  # region, service, date, clock, signed-headers, path-encoding, body, host, access-key, token, ...
    message: str


@dataclass
class Variant:
    kind: str
    message: str
    inputs: Inputs


@dataclass
class Diagnosis:
    request: Request
    auth: dict
    inputs: Inputs
    canonical_request: str
    string_to_sign: str
    signature: str | None  # None without a secret
    reproduced: bool | None  # None: nothing to compare (redacted, no secret)
    findings: list[Finding] = field(default_factory=list)  # problems seen without the secret
    variants: list[Variant] = field(default_factory=list)  # single changes that reproduce the signature
    server_canonical: str | None = None  # what the server said it computed (InvalidSignatureException)

    @property
    def exit_code(self) -> int:
        if self.reproduced is None:
            return EXIT_USAGE
        if not self.reproduced:
            return EXIT_MISMATCH
        fatal = {"region", "service", "date", "clock", "signed-headers", "body"}
        return EXIT_MISMATCH if any(f.kind in fatal for f in self.findings) else EXIT_OK


@dataclass
class Credentials:
    access_key: str | None
    secret_key: str | None
    token: str | None
    source: str


def expected_scope(req: Request, region: str | None, service: str | None) -> tuple[str | None, str | None, str]:
    """The region and service the request's destination expects, and why we think so."""
    host = (req.host or "").strip()
    match = _BEDROCK_HOST.match(host)
    why = []
    if region:
        why.append("--region")
    elif match:
        region = match.group("region").lower()
        why.append(f"host {host}")
    if service:
        why.append("--service")
    elif match or region:
        service = BEDROCK_SERVICE
    return region, service, ", ".join(why) or "nothing"


def known_regions() -> list[str]:
    try:
        import botocore.session

        session = botocore.session.get_session()
        regions: set[str] = set()
        for partition in session.get_available_partitions():
            regions |= set(session.get_available_regions("bedrock-runtime", partition))
            regions |= set(session.get_available_regions("ec2", partition))
        return sorted(regions)
    except Exception:  # botocore data missing: fall back to the common ones
        return ["us-east-1", "us-east-2", "us-west-1", "us-west-2", "eu-west-1", "eu-west-2", "eu-west-3",
                "eu-central-1", "eu-north-1", "ap-northeast-1", "ap-southeast-1", "ap-southeast-2", "ap-south-1"]


def diagnose(
    req: Request,
    creds: Credentials | None,
    region: str | None = None,
    service: str | None = None,
    regions: Callable[[], list[str]] = known_regions,
) -> Diagnosis:
    authorization = req.header("authorization")
    auth = authorization_parts(authorization)
    if auth is None:
        if authorization and authorization.strip().lower().startswith("bearer"):
            raise InputError(f"{req.origin}: the request uses a bearer token (Bedrock API key), not SigV4: nothing to check")
        if "X-Amz-Signature" in req.query:
            raise InputError(f"{req.origin}: a presigned URL (X-Amz-Signature in the query) is not supported")
        raise InputError(f"{req.origin}: no SigV4 Authorization header (AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...)")

    findings: list[Finding] = []
    amz_date = req.header("x-amz-date")
    if amz_date is None and req.header("date"):
        try:
            from email.utils import parsedate_to_datetime

            amz_date = parsedate_to_datetime(req.header("date")).astimezone(dt.timezone.utc).strftime(sigv4.AMZ_DATE_FORMAT)
        except (TypeError, ValueError):
            amz_date = None
    if amz_date is None:
        findings.append(Finding("date", "the request has neither X-Amz-Date nor Date: AWS cannot tell when it was signed"))
        amz_date = auth["date"] + "T000000Z"
    amz_date = amz_date.strip()

    body_hash = sigv4.payload_hash(req.body)
    declared_hash = req.header("x-amz-content-sha256")
    payload = declared_hash.strip() if declared_hash else body_hash
    if declared_hash and payload not in (body_hash, UNSIGNED_PAYLOAD) and not payload.startswith("STREAMING-"):
        findings.append(Finding("body", f"X-Amz-Content-Sha256 is {payload} but the body hashes to {body_hash}: the body changed after signing"))

    inputs = Inputs(
        method=req.method,
        canonical_uri=sigv4.canonical_uri(req.path),
        query=req.query,
        headers=tuple(req.headers),
        signed_headers=auth["signed_headers"],
        payload_hash=payload,
        amz_date=amz_date,
        date=auth["date"],
        region=auth["region"],
        service=auth["service"],
    )
    creq = inputs.canonical_request()
    sts = inputs.string_to_sign(creq)
    findings += structural_findings(req, auth, amz_date, region, service)

    if auth["signature_state"] == "redacted":
        findings.insert(0, Finding("redacted", "the request's signature is redacted (Signature=<redacted>): this is how bedrock-balancer "
                                   "shows and saves the request it sent upstream, so there is nothing to compare. The values above "
                                   "are what the given credentials would sign. To debug a client's signature, capture the client's "
                                   "request with plain mitmdump -w (no balancer) or as a raw HTTP request."))
    if req.header("x-amz-security-token") and "redacted" in (req.header("x-amz-security-token") or "").lower():
        findings.append(Finding("token", "the session token is redacted in this request, so a canonical request that signs it cannot be rebuilt"))

    signature = None
    reproduced: bool | None = None
    if creds is not None and creds.secret_key:
        signature = inputs.signature(creds.secret_key)
        if creds.access_key and creds.access_key != auth["access_key_id"]:
            findings.append(Finding("access-key", f"the request was signed with access key {auth['access_key_id']}, the credentials given are for "
                                    f"{creds.access_key}: their secret cannot reproduce it"))
        request_token = req.header("x-amz-security-token")
        if creds.token and request_token and "redacted" not in request_token.lower() and not hmac.compare_digest(creds.token, request_token.strip()):
            findings.append(Finding("token", "the request's X-Amz-Security-Token is not the session token given (values not shown)"))
        if auth["signature_state"] == "present":
            reproduced = hmac.compare_digest(signature, auth["signature"])

    diagnosis = Diagnosis(req, auth, inputs, creq, sts, signature, reproduced, findings)
    diagnosis.server_canonical = server_canonical_request(req.response_text)
    if reproduced is False and creds is not None and creds.secret_key:
        diagnosis.variants = find_variants(req, inputs, auth["signature"], creds.secret_key, region, service, regions)
    return diagnosis


def structural_findings(req: Request, auth: dict, amz_date: str, region: str | None, service: str | None) -> list[Finding]:
    """What is wrong whatever the secret: the rules AWS checks before it compares signatures."""
    out: list[Finding] = []
    signed = auth["signed_headers"]
    present = {n.lower() for n, _ in req.headers}
    if auth["terminator"] != "aws4_request":
        out.append(Finding("scope", f"the credential scope ends in {auth['terminator']!r}, not 'aws4_request'"))
    if auth["date"] != amz_date[:8]:
        out.append(Finding("date", f"the credential scope's date {auth['date']} is not the date of X-Amz-Date {amz_date} "
                           "(AWS: Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP)"))
    exp_region, exp_service, why = expected_scope(req, region, service)
    if exp_region and auth["region"] != exp_region:
        out.append(Finding("region", f"the credential scope's region is {auth['region']} but the request went to {exp_region} ({why}); "
                           "AWS answers 'Credential should be scoped to a valid region'. Sign for the region of the endpoint."))
    if exp_service and auth["service"] != exp_service:
        hint = " (Bedrock Runtime signs as 'bedrock', not 'bedrock-runtime')" if exp_service == BEDROCK_SERVICE else ""
        out.append(Finding("service", f"the credential scope's service is {auth['service']!r}, expected {exp_service!r}{hint}; "
                           f"AWS answers \"Credential should be scoped to correct service: '{exp_service}'\""))
    if "host" not in signed:
        out.append(Finding("signed-headers", "'host' is not a signed header; AWS requires it"))
    if req.header("x-amz-date") is not None and "x-amz-date" not in signed:
        out.append(Finding("signed-headers", "'x-amz-date' is not a signed header; AWS requires the date header to be signed"))
    if req.header("x-amz-security-token") is not None and "x-amz-security-token" not in signed:
        out.append(Finding("signed-headers", "the request carries X-Amz-Security-Token but does not sign it"))
    missing = [h for h in signed if h not in present]
    if missing:
        out.append(Finding("signed-headers", "SignedHeaders lists " + ", ".join(missing) + " but the request does not carry "
                           + ("it" if len(missing) == 1 else "them") + ": removed after signing (by a proxy or the HTTP library)?"))
    if list(signed) != sorted(signed) or any(h != h.lower() for h in signed):
        out.append(Finding("signed-headers", "SignedHeaders must be lower-case and sorted: " + ";".join(signed)))
    if req.received_at is not None:
        try:
            signed_at = dt.datetime.strptime(amz_date, sigv4.AMZ_DATE_FORMAT).replace(tzinfo=dt.timezone.utc)
        except ValueError:
            out.append(Finding("date", f"X-Amz-Date {amz_date!r} is not in ISO-8601 basic format (YYYYMMDDTHHMMSSZ)"))
        else:
            skew = (signed_at - req.received_at).total_seconds()
            if abs(skew) > CLOCK_SKEW_S:
                when = "before" if skew < 0 else "after"
                out.append(Finding("clock", f"X-Amz-Date {amz_date} is {abs(skew):.0f} s {when} the time the proxy received the request "
                                   f"({req.received_at.strftime(sigv4.AMZ_DATE_FORMAT)}); AWS allows {CLOCK_SKEW_S // 60} minutes. Check the client's clock."))
    return out


# --------------------------------------------------------------------------------------------------
# Variants: change one input, see whether the request's signature appears


def find_variants(
    req: Request, base: Inputs, target: str, secret: str, region: str | None, service: str | None,
    regions: Callable[[], list[str]] = known_regions,
) -> list[Variant]:
    found: list[Variant] = []
    seen: set[Inputs] = {base}

    def attempt(kind: str, message: str, inputs: Inputs) -> bool:
        if inputs in seen:
            return False
        seen.add(inputs)
        if hmac.compare_digest(inputs.signature(secret), target):
            found.append(Variant(kind, message, inputs))
            return True
        return False

    # Credential scope: the region and service the signature was really computed for.
    exp_region, exp_service, _ = expected_scope(req, region, service)
    candidates = [r for r in dict.fromkeys([exp_region, *regions()]) if r]
    for r in candidates:
        if attempt("region", f"the signature was computed for region {r}, but the Credential scope says {base.region}: "
                   "the scope was edited after signing (a proxy that moves a request must sign it again)",
                   dataclasses.replace(base, region=r)):
            break
    host_label = (req.host or "").split(".", 1)[0].split(":", 1)[0]
    services = [s for s in dict.fromkeys([exp_service, BEDROCK_SERVICE, "bedrock-runtime", host_label, "execute-api", "sagemaker"]) if s]
    for s in services:
        attempt("service", f"the signature was computed for service {s!r}, but the Credential scope says {base.service!r}",
                dataclasses.replace(base, service=s))
    if not found:
        for r in candidates:
            for s in services:
                if attempt("region", f"the signature was computed for region {r} and service {s!r}, "
                           f"but the Credential scope says {base.region}/{base.service}", dataclasses.replace(base, region=r, service=s)):
                    break
    for d in _neighbour_days(base.date):
        attempt("date", f"the signature was computed with the scope date {d}, but the Credential scope says {base.date}",
                dataclasses.replace(base, date=d))

    # Path encoding.
    path = req.path
    normalised = sigv4.remove_dot_segments(path)
    for uri, message in (
        (normalised, "the client encoded the path once (as S3 does); every other AWS service, Bedrock included, "
                     "signs the path encoded twice (%3A becomes %253A in the canonical request)"),
        (quote(unquote(normalised), safe="/~"), "the client signed the decoded path encoded once (e.g. ':' as %3A), "
                                                "AWS signs the wire path encoded once more"),
        (unquote(normalised), "the client signed the path decoded, not encoded at all"),
        (quote(path, safe="/~"), "the client did not normalise the path (dot segments, double slashes) before signing"),
        (quote(quote(unquote(normalised), safe="/~"), safe="/~"), "the client signed a path encoded differently from the one sent "
                                                                 "(the model id's characters were encoded after signing)"),
    ):
        attempt("path-encoding", message, dataclasses.replace(base, canonical_uri=uri))

    # Signed-header set.
    signed = base.signed_headers
    present = sorted({n.lower() for n, _ in req.headers} - set(signed) - {"authorization"})
    for h in signed:
        attempt("signed-headers", f"the signature does not cover {h!r} although SignedHeaders lists it",
                dataclasses.replace(base, signed_headers=tuple(x for x in signed if x != h)))
    for h in present:
        attempt("signed-headers", f"the client signed {h!r} but SignedHeaders does not list it",
                dataclasses.replace(base, signed_headers=tuple(sorted(signed + (h,)))))
    # Header values an intermediary is known to change: Host.
    if "host" in signed:
        hosts = list(req.host_candidates)
        host = req.host or ""
        if ":" in host:
            hosts.append((host.rsplit(":", 1)[0], "without the port"))
        else:
            hosts += [(f"{host}:443", "with :443"), (f"{host}:80", "with :80")]
        for value, why in hosts:
            headers = tuple((n, value) if n.lower() == "host" else (n, v) for n, v in base.headers)
            attempt("host", f"the client signed Host: {value} ({why}), the request carries Host: {host}",
                    dataclasses.replace(base, headers=headers))

    # Body.
    for body, why in _body_variants(req.body):
        attempt("body", f"the body was changed after signing: the client signed {why}",
                dataclasses.replace(base, payload_hash=sigv4.payload_hash(body)))
    attempt("body", "the client signed with UNSIGNED-PAYLOAD as the body hash", dataclasses.replace(base, payload_hash=UNSIGNED_PAYLOAD))
    if base.payload_hash != sigv4.payload_hash(req.body):
        attempt("body", "the client signed the body as received, but X-Amz-Content-Sha256 says otherwise",
                dataclasses.replace(base, payload_hash=sigv4.payload_hash(req.body)))

    # X-Amz-Date re-stamped after signing (a retry layer that updates the date but not the signature).
    if "x-amz-date" in signed and req.header("x-amz-date"):
        try:
            stamped = dt.datetime.strptime(base.amz_date, sigv4.AMZ_DATE_FORMAT)
        except ValueError:
            stamped = None
        if stamped is not None:
            for delta in sorted(range(-DATE_SEARCH_S, DATE_SEARCH_S + 1), key=abs):
                if delta == 0:
                    continue
                when = (stamped + dt.timedelta(seconds=delta)).strftime(sigv4.AMZ_DATE_FORMAT)
                headers = tuple((n, when) if n.lower() == "x-amz-date" else (n, v) for n, v in base.headers)
                shift = f"{abs(delta)} s {'later' if delta < 0 else 'earlier'}"
                if attempt("date", f"the client signed at X-Amz-Date {when}, but the request carries {base.amz_date}, "
                           f"{shift}: the date header was changed after signing (without signing again)",
                           dataclasses.replace(base, headers=headers, amz_date=when)):
                    break
    return found


def _neighbour_days(date: str) -> list[str]:
    try:
        day = dt.datetime.strptime(date, "%Y%m%d")
    except ValueError:
        return []
    return [(day + dt.timedelta(days=d)).strftime("%Y%m%d") for d in (-1, 1)]


def _body_variants(body: bytes) -> Iterable[tuple[bytes, str]]:
    yield b"", "an empty body"
    if body.endswith(b"\n"):
        yield body.rstrip(b"\r\n"), "the body without its trailing newline"
    else:
        yield body + b"\n", "the body with a trailing newline"
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return
    for kwargs, why in (
        (dict(separators=(",", ":")), "the same JSON serialised compactly"),
        (dict(), "the same JSON serialised with spaces (Python's default)"),
        (dict(separators=(",", ":"), sort_keys=True), "the same JSON, compact with sorted keys"),
        (dict(sort_keys=True), "the same JSON with sorted keys"),
        (dict(indent=2), "the same JSON indented"),
        (dict(separators=(",", ":"), ensure_ascii=False), "the same JSON, compact, non-ASCII unescaped"),
        (dict(ensure_ascii=False), "the same JSON, non-ASCII unescaped"),
    ):
        yield json.dumps(obj, **kwargs).encode("utf-8"), why


_SERVER_CANONICAL = re.compile(r"The Canonical String for this request should have been\s*\n'(.*?)'\s*\n\s*\nThe String-to-Sign", re.S)


def server_canonical_request(text: str | None) -> str | None:
    """The canonical request an AWS error (InvalidSignatureException) says the server computed."""
    if not text:
        return None
    try:
        message = json.loads(text).get("message", "")
    except (ValueError, AttributeError):
        message = text
    match = _SERVER_CANONICAL.search(message)
    return match.group(1) if match else None


# --------------------------------------------------------------------------------------------------
# Credentials


def load_credentials(args: argparse.Namespace) -> Credentials | None:
    if args.secret_key:
        return Credentials(args.access_key, args.secret_key, args.session_token, "command line")
    if not args.profile and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return Credentials(args.access_key or os.environ.get("AWS_ACCESS_KEY_ID"), os.environ["AWS_SECRET_ACCESS_KEY"],
                           args.session_token or os.environ.get("AWS_SESSION_TOKEN"), "environment")
    try:
        import botocore.exceptions
        import botocore.session

        session = botocore.session.Session(profile=args.profile) if args.profile else botocore.session.Session()
        found = session.get_credentials()
    except botocore.exceptions.ProfileNotFound as e:
        raise InputError(str(e)) from None
    except Exception as e:  # a broken config must not hide the canonical request
        print(f"bedrock-sigv4: could not load credentials: {e}", file=sys.stderr)
        return None
    if found is None:
        return None
    frozen = found.get_frozen_credentials()
    return Credentials(frozen.access_key, frozen.secret_key, frozen.token, f"profile {args.profile}" if args.profile else "botocore's default chain")


# --------------------------------------------------------------------------------------------------
# Report


def printable(canonical_request: str) -> str:
    """A canonical request fit to print: a session token's (or a signed Authorization's) value replaced
    by its length, which still tells a token cut short from a whole one.

    relay.redacted masks header lists; the doctor prints canonical requests, including the one an AWS
    error quotes, so it masks their text. A value a proxy already redacted (``<redacted>``) is kept as
    it is: it is no secret, and it explains why the signature cannot be rebuilt.
    """

    def mask(match: re.Match) -> str:
        value = match.group("value")
        if value.strip() in ("", "<redacted>"):
            return match.group(0)
        return f"{match.group('key')}<redacted, {len(value)} chars>"

    return _CREDENTIAL_QUERY_PARAMETER.sub(mask, _CREDENTIAL_HEADER_LINE.sub(mask, canonical_request))


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line if line else prefix.rstrip() for line in text.split("\n"))


def _diff(a: str, b: str, a_name: str, b_name: str) -> str:
    """Two canonical requests (or strings to sign) diffed, credentials masked on both sides."""
    lines = difflib.unified_diff(printable(a).split("\n"), printable(b).split("\n"), a_name, b_name, lineterm="", n=1)
    return "\n".join(lines) or "(they differ only in the value of a session token or Authorization header, which is not shown)"


def report(d: Diagnosis, creds: Credentials | None, out) -> None:
    req, auth, inputs = d.request, d.auth, d.inputs
    w = lambda text="": print(text, file=out)  # noqa: E731
    w(f"request: {req.method} {req.path}{'?' + req.query if req.query else ''}  ({req.origin})")
    w(f"  host             {req.host}")
    for note in req.notes:
        w(f"  note             {note}")
    w(f"  access key       {auth['access_key_id']}")
    w(f"  credential scope {inputs.scope}")
    w(f"  x-amz-date       {inputs.amz_date}")
    w(f"  signed headers   {';'.join(inputs.signed_headers)}")
    w(f"  body             {len(req.body)} bytes, sha256 {sigv4.payload_hash(req.body)}")
    if req.response_status is not None:
        w(f"  response         {req.response_status}")
    w()
    w("canonical request:")
    w(_indent(printable(d.canonical_request)))
    w()
    w("string to sign:")
    w(_indent(d.string_to_sign))
    w()
    w(f"scope:                {inputs.scope}")
    if d.signature is not None:
        w(f"signature (computed): {d.signature}   with {creds.source if creds else '?'} ({creds.access_key or 'access key not given'})")
    else:
        w("signature (computed): - (no credentials: give --secret-key, AWS_SECRET_ACCESS_KEY or --profile)")
    sig_state = auth["signature_state"]
    w(f"signature (request):  {auth['signature'] if sig_state == 'present' else '<' + sig_state + '>'}")
    w()
    if d.server_canonical is not None:
        if d.server_canonical == d.canonical_request:
            w("the server's error quotes the same canonical request: the server received the request as captured here "
              "(nothing changed it after this capture point)")
        else:
            w("the server's error quotes a different canonical request (- ours from the capture, + the server's):")
            w(_indent(_diff(d.canonical_request, d.server_canonical, "captured", "server")))
        w()

    if d.reproduced is True:
        w("RESULT: signature reproduced")
    elif d.reproduced is None:
        w("RESULT: not checked: " + ("the request's signature is redacted" if sig_state == "redacted" else
                                     "no credentials" if d.signature is None else f"the request's signature is {sig_state}"))
    else:
        w("RESULT: signature MISMATCH")
    for f in d.findings:
        w(f"  problem: {f.kind}: {f.message}")
    if d.reproduced is False:
        if d.variants:
            for v in d.variants:
                w(f"  differs: {v.kind}: {v.message}")
                signed_creq = v.inputs.canonical_request()
                if signed_creq != d.canonical_request:
                    w("    canonical request (- as the request reads, what AWS computes; + what the client signed):")
                    w(_indent(_diff(d.canonical_request, signed_creq, "request", "signed"), "      "))
                else:
                    w("    string to sign (- as the request reads; + what the client signed):")
                    w(_indent(_diff(d.string_to_sign, v.inputs.string_to_sign(), "request", "signed"), "      "))
        else:
            causes = []
            present = {n.lower() for n, _ in req.headers}
            missing = [h for h in inputs.signed_headers if h not in present]
            if missing:
                causes.append("most likely: the signed header(s) " + ", ".join(missing) + " missing from the request (their values "
                              "are part of the signature and cannot be guessed; find what strips them)")
            if any(f.kind == "access-key" for f in d.findings):
                causes.append("the credentials given are not the ones that signed (see above)")
            else:
                causes.append("the secret key is not the one that signed")
            causes.append("a signed header's value changed after signing: " + ", ".join(inputs.signed_headers))
            causes.append("the body changed after signing in a way that cannot be undone here")
            w("  differs: unknown: no single change (region, service, date, path encoding, signed headers, host, body, "
              "x-amz-date) reproduces the signature. Remaining causes:")
            for c in causes:
                w(f"    - {c}")


# --------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bedrock-sigv4",
        description="Recompute a request's SigV4 signature step by step and say which input differs when it does not match.",
        epilog="Exit status: 0 reproduced, 1 mismatch (or wrong scope/clock), 2 usage or input problem "
               "(including a signature redacted by bedrock-balancer).",
    )
    p.add_argument("file", type=Path, help="a mitmproxy flow file (mitmdump -w, save_stream_file) or a raw HTTP request")
    p.add_argument("--index", type=int, help="which flow of a flow file (0-based; see --list)")
    p.add_argument("--url", help="the first flow whose URL matches this regular expression")
    p.add_argument("--list", action="store_true", help="list the flows of a flow file and exit")
    p.add_argument("--access-key", help="access key id (default: AWS_ACCESS_KEY_ID / the profile)")
    p.add_argument("--secret-key", help="secret access key (default: AWS_SECRET_ACCESS_KEY / the profile); never printed")
    p.add_argument("--session-token", help="session token, to check the request carries it; never printed")
    p.add_argument("--profile", help="an AWS profile to take the credentials from")
    p.add_argument("--region", help="the region the request was sent to (default: from a Bedrock host name)")
    p.add_argument("--service", help="the signing name the endpoint expects (default: bedrock for Bedrock hosts)")
    return p


def main(argv: list[str] | None = None, out=None) -> int:
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args, out)
    except InputError as e:
        print(f"bedrock-sigv4: {e}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace, out) -> int:
    try:
        data = args.file.read_bytes()
    except OSError as e:
        raise InputError(f"{args.file}: {e.strerror}") from None
    if looks_like_flow_file(data):
        flows = read_flows(args.file)
        if args.list:
            for i, flow in enumerate(flows):
                print(f"{i:4d}  {describe_flow(flow)}", file=out)
            return EXIT_OK
        flow, origin = select_flow(flows, args.index, args.url, args.file)
        req = request_from_flow(flow, origin)
    else:
        if args.list or args.index is not None or args.url:
            raise InputError(f"{args.file}: --list, --index and --url apply to flow files; this is a raw HTTP request")
        req = parse_raw_request(data, str(args.file))
    creds = load_credentials(args)
    diagnosis = diagnose(req, creds, args.region, args.service)
    report(diagnosis, creds, out)
    return diagnosis.exit_code


if __name__ == "__main__":
    sys.exit(main())

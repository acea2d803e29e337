"""The project's SigV4 code against the official AWS SigV4 test suite (tests/data/sigv4-testsuite, Apache-2.0)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from bedrock_balancer import sigv4

SUITE = Path(__file__).resolve().parent / "data" / "sigv4-testsuite"
SUITE_CREDENTIALS = dict(access_key="AKIDEXAMPLE", secret_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
CASES = sorted(p.parent for p in SUITE.rglob("*.req"))


def parse_suite_request(text: str) -> tuple[str, str, list[tuple[str, str]], bytes]:
    head, _, body = text.partition("\n\n")
    request_line, *header_lines = head.split("\n")
    method, rest = request_line.split(" ", 1)
    target = rest.rsplit(" ", 1)[0]
    headers: list[tuple[str, str]] = []
    for line in header_lines:
        if not line:
            continue
        if line[:1] in (" ", "\t"):  # obsolete line folding continues the previous value
            name, value = headers[-1]
            headers[-1] = (name, value + " " + line.strip())
        else:
            name, _, value = line.partition(":")
            headers.append((name, value))
    return method, target, headers, body.encode()


def load_case(case: Path):
    read = lambda ext: (case / f"{case.name}{ext}").read_text()  # noqa: E731
    method, target, headers, body = parse_suite_request(read(".req"))
    path, _, query = target.partition("?")
    return method, path, query, headers, body, read(".creq"), read(".sts"), read(".authz")


def test_suite_is_present():
    assert len(CASES) >= 30, f"expected the 30+ official cases under {SUITE}"


@pytest.mark.parametrize("case", CASES, ids=lambda p: str(p.relative_to(SUITE)))
def test_canonical_request_string_to_sign_and_signature_match_the_suite(case: Path):
    method, path, query, headers, body, creq, sts, authz = load_case(case)
    expected = sigv4.parse_authorization(authz)
    if "x-amz-security-token" in expected.signed_headers and not any(
        n.lower() == "x-amz-security-token" for n, _ in headers
    ):
        token = next(
            line.split(":", 1)[1]
            for line in (case / f"{case.name}.sreq").read_text().splitlines()
            if line.lower().startswith("x-amz-security-token:")
        )
        headers = headers + [("X-Amz-Security-Token", token)]

    ours = sigv4.canonical_request(method, path, query, headers, expected.signed_headers, sigv4.payload_hash(body))
    assert ours == creq
    amz_date = next(v for n, v in headers if n.lower() == "x-amz-date")
    scope = sigv4.credential_scope(amz_date[:8], "us-east-1", "service")
    assert sigv4.string_to_sign(amz_date, scope, ours) == sts
    key = sigv4.signing_key(SUITE_CREDENTIALS["secret_key"], amz_date[:8], "us-east-1", "service")
    assert sigv4.authorization_header("AKIDEXAMPLE", scope, expected.signed_headers, sigv4.signature(key, sts)) == authz


@pytest.mark.parametrize("case", CASES, ids=lambda p: str(p.relative_to(SUITE)))
def test_sign_produces_the_suites_authorization_header(case: Path):
    method, path, query, headers, body, _, _, authz = load_case(case)
    expected = sigv4.parse_authorization(authz)
    amz_date = next(v for n, v in headers if n.lower() == "x-amz-date")
    token = None
    if "x-amz-security-token" in expected.signed_headers:
        sreq = (case / f"{case.name}.sreq").read_text().splitlines()
        token = next(line.split(":", 1)[1] for line in sreq if line.lower().startswith("x-amz-security-token:"))
    unsigned = [(n, v) for n, v in headers if n.lower() not in ("x-amz-date", "x-amz-security-token")]
    now = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    added = sigv4.sign(
        method, path, query, unsigned, sigv4.payload_hash(body), "us-east-1", "service",
        sigv4.Credentials(**SUITE_CREDENTIALS, token=token), now=now,
    )
    assert dict(added)["authorization"] == authz
    assert dict(added)["x-amz-date"] == amz_date


def test_bedrock_model_id_path_is_encoded_twice_like_botocore():
    # botocore signs /model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse with %253A.
    assert sigv4.canonical_uri("/model/anthropic.claude-v2%3A1/converse") == "/model/anthropic.claude-v2%253A1/converse"


def test_signature_agrees_with_botocore_for_a_bedrock_request():
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials as BotoCredentials

    url = "https://bedrock-runtime.us-west-2.amazonaws.com/model/us.anthropic.claude-3-5-haiku-20241022-v1%3A0/converse"
    body = b'{"messages":[{"role":"user","content":[{"text":"hi"}]}]}'
    request = AWSRequest("POST", url, data=body, headers={"Content-Type": "application/json"})
    SigV4Auth(BotoCredentials("AKID", "secret", "tok"), "bedrock", "us-west-2").add_auth(request)
    now = datetime.strptime(request.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)

    ours = sigv4.sign(
        "POST", "/model/us.anthropic.claude-3-5-haiku-20241022-v1%3A0/converse", "",
        [("host", "bedrock-runtime.us-west-2.amazonaws.com"), ("content-type", "application/json")],
        sigv4.payload_hash(body), "us-west-2", "bedrock", sigv4.Credentials("AKID", "secret", "tok"), now=now,
    )
    assert dict(ours)["authorization"] == request.headers["Authorization"]


def test_credentials_repr_hides_secrets():
    text = repr(sigv4.Credentials("AKID", "supersecret", "sessiontoken"))
    assert "supersecret" not in text and "sessiontoken" not in text


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Bearer abc",
        "AWS4-HMAC-SHA256 Credential=AKID/2024/us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature=" + "0" * 64,
        "AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/bedrock/aws4_request, SignedHeaders=host",
        "AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/bedrock/aws4_request, SignedHeaders=host;;x, Signature=" + "0" * 64,
        "AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature=zz",
    ],
)
def test_malformed_authorization_headers_are_rejected(header):
    with pytest.raises(sigv4.AuthorizationError):
        sigv4.parse_authorization(header)


@pytest.mark.parametrize(
    "header",
    [
        "ABSKdGVhbS1jLWFwaS1rZXktc2VjcmV0",  # an API key with no scheme
        "AWS4-HMAC-SHA256 ABSKdGVhbS1jLWFwaS1rZXktc2VjcmV0",  # an API key under the SigV4 scheme
        "AWS4-HMAC-SHA256 Credential=ABSKdGVhbS1jLWFwaS1rZXktc2VjcmV0, Credential=ABSKdGVhbS1jLWFwaS1rZXktc2VjcmV0",
        "AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/bedrock/aws4_request, SignedHeaders=host, ABSKdGVhbS1jLWFwaS1rZXktc2VjcmV0",
    ],
)
def test_a_malformed_authorization_header_is_described_never_quoted(header):
    # The error goes to the client, the log line and the access log: a key put in the wrong place must not.
    with pytest.raises(sigv4.AuthorizationError) as raised:
        sigv4.parse_authorization(header)

    assert "ABSKdGVhbS1jLWFwaS1rZXktc2VjcmV0" not in str(raised.value)


def test_a_known_scheme_other_than_sigv4_is_named():
    with pytest.raises(sigv4.AuthorizationError, match="'Bearer', not AWS4-HMAC-SHA256"):
        sigv4.parse_authorization("Bearer abc")


@given(st.text(max_size=200))
def test_parse_authorization_never_fails_with_anything_but_authorization_error(text):
    try:
        sigv4.parse_authorization(text)
    except sigv4.AuthorizationError:
        pass


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_canonical_uri_is_ascii_and_idempotent_in_shape(path):
    uri = sigv4.canonical_uri("/" + path)
    assert uri.isascii() and uri.startswith("/")

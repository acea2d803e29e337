"""Client authentication, request hygiene and per-client limits as plain code; property tests of the
classifier, the rewriter and the signature verifier; the clients/api_keys configuration."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import botocore.auth
import pytest
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from hypothesis import HealthCheck, given, settings, strategies as st

from bedrock_balancer import classify, clientauth, config, geography, sigv4
from bedrock_balancer.config import ApiKey, ClientKey
from bedrock_balancer.errors import BedrockError
from bedrock_balancer.quota import Budget
from test_sigv4 import CASES, SUITE, SUITE_CREDENTIALS, parse_suite_request

KEY, SECRET = "AKIDVIRTUALTEAMA", "virtual-secret-of-team-a-0123456789"
API_KEY = "ABSKdGVhbS1jLWFwaS1rZXktZm9yLXRlc3Rz"
NOW = datetime(2025, 3, 4, 12, 0, 0, tzinfo=timezone.utc)
HOST = "bedrock-runtime.us-east-1.amazonaws.com"
AUTH_ERRORS = {
    "MissingAuthenticationTokenException", "IncompleteSignatureException", "InvalidSignatureException",
    "UnrecognizedClientException", "AccessDeniedException",
}


def authenticator(now: datetime = NOW, **kwargs) -> clientauth.Authenticator:
    return clientauth.Authenticator([ClientKey("team-a", KEY, SECRET)], [ApiKey("team-c", API_KEY)], now=lambda: now, **kwargs)


def botocore_signed(path: str, body: bytes = b"{}", *, method: str = "POST", region: str = "us-east-1", service: str = "bedrock",
                    key: str = KEY, secret: str = SECRET, when: datetime = NOW, token: str | None = None,
                    headers: dict | None = None, host: str = HOST):
    """A request signed by botocore's own SigV4 signer (an implementation independent of ours), as it goes on
    the wire: (method, raw path, raw query, headers with host, body)."""
    request = AWSRequest(method=method, url=f"https://{host}{path}", data=body, headers={"Content-Type": "application/json", **(headers or {})})
    original = botocore.auth.get_current_datetime
    botocore.auth.get_current_datetime = lambda: when
    try:
        botocore.auth.SigV4Auth(BotoCredentials(key, secret, token), service, region).add_auth(request)
    finally:
        botocore.auth.get_current_datetime = original
    prepared = request.prepare()
    wire = urlsplit(prepared.url)
    sent = [("host", wire.netloc)] + [(n, v.decode() if isinstance(v, bytes) else v) for n, v in prepared.headers.items()]
    return method, wire.path, wire.query, sent, body


def verify(request, auth=None):
    method, path, query, headers, body = request
    return (auth or authenticator()).authenticate(method, path, query, headers, body)


def rejected(request, auth=None) -> BedrockError:
    with pytest.raises(BedrockError) as raised:
        verify(request, auth)
    return raised.value


def replace_header(request, name: str, value: str):
    method, path, query, headers, body = request
    return method, path, query, [(n, value if n.lower() == name else v) for n, v in headers], body


# -- the official SigV4 test suite, through the verifier -------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda p: str(p.relative_to(SUITE)))
def test_official_suite_signed_requests_verify(case: Path):
    method, target, headers, body = parse_suite_request((case / f"{case.name}.sreq").read_text())
    path, _, query = target.partition("?")
    suite = clientauth.Authenticator(
        [ClientKey("suite", SUITE_CREDENTIALS["access_key"], SUITE_CREDENTIALS["secret_key"])],
        service="service", now=lambda: datetime(2015, 8, 30, 12, 36, tzinfo=timezone.utc),
    )

    if any(n.lower() == "x-amz-security-token" for n, _ in headers):
        # A virtual key is a long-term key: a request with a session token cannot be one of its own.
        assert rejected((method, path, query, headers, body), suite).error_type == "UnrecognizedClientException"
        return
    assert suite.authenticate(method, path, query, headers, body) == clientauth.Identity("suite", "sigv4")
    # and any change to what was signed breaks it
    tampered = [(n, v + "x") if n.lower() == "host" else (n, v) for n, v in headers]
    assert rejected((method, path, query, tampered, body), suite).error_type == "InvalidSignatureException"


# -- botocore-signed Bedrock requests ------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", [
    "anthropic.claude-3-5-sonnet-20240620-v1:0",
    "us.anthropic.claude-3-7-sonnet-20250219-v1:0",
    "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-v2:1",
    "arn:aws:bedrock:us-west-2:123456789012:application-inference-profile/abc123",
])
def test_botocore_signed_bedrock_requests_verify(model_id):
    path = f"/model/{quote(model_id, safe='')}/converse"  # how botocore puts a model id on the wire
    assert verify(botocore_signed(path)) == clientauth.Identity("team-a", "sigv4")
    get = botocore_signed("/async-invoke", b"", method="GET")
    assert verify(get).name == "team-a"
    listing = botocore_signed("/async-invoke?maxResults=10&statusEquals=Completed", b"", method="GET")
    assert verify(listing).name == "team-a"


@pytest.mark.parametrize("region", ["us-east-1", "eu-central-2", "ap-southeast-7", "us-gov-west-1", "cn-north-1"])
def test_any_region_may_be_in_the_scope(region):
    request = botocore_signed("/model/m/converse", region=region, host=f"bedrock-runtime.{region}.amazonaws.com")
    assert verify(request).name == "team-a"


def test_what_breaks_a_signature():
    request = botocore_signed("/model/anthropic.claude-v2%3A1/converse", b'{"messages": []}')
    method, path, query, headers, body = request
    for tampered in [
        (method, path, query, headers, body + b" "),
        (method, path.replace("v2", "v3"), query, headers, body),
        (method, path, "x=1", headers, body),
        ("PUT", path, query, headers, body),
        replace_header(request, "host", "bedrock-runtime.us-west-2.amazonaws.com"),
        replace_header(request, "content-type", "text/plain"),
        replace_header(request, "authorization", dict(headers)["Authorization"][:-4] + "0000"),
    ]:
        assert rejected(tampered).error_type == "InvalidSignatureException"
    # headers that were not signed may change (as at AWS)
    assert verify((method, path, query, headers + [("user-agent", "something else")], body)).name == "team-a"


def test_unknown_key_and_session_token_are_unrecognized():
    assert rejected(botocore_signed("/model/m/converse", key="AKIDNOBODY")).error_type == "UnrecognizedClientException"
    with_token = botocore_signed("/model/m/converse", token="FwoGZXIvYXdzEXAMPLE")
    assert rejected(with_token).message == clientauth.INVALID_TOKEN_MESSAGE


@pytest.mark.parametrize("minutes, ok", [(-14, True), (14, True), (-16, False), (16, False)])
def test_fifteen_minute_window(minutes, ok):
    request = botocore_signed("/model/m/converse", when=NOW + timedelta(minutes=minutes))
    if ok:
        assert verify(request).name == "team-a"
    else:
        error = rejected(request)
        assert error.error_type == "InvalidSignatureException"
        assert error.message.startswith("Signature expired" if minutes < 0 else "Signature not yet current")


def test_scope_rules():
    assert "correct service: 'bedrock'" in rejected(botocore_signed("/model/m/converse", service="s3")).message
    assert "valid region" in rejected(botocore_signed("/model/m/converse", region="mars")).message
    method, path, query, headers, body = botocore_signed("/model/m/converse")
    authorization = dict(headers)["Authorization"]
    no_host = authorization.replace("SignedHeaders=content-type;host;x-amz-date", "SignedHeaders=content-type;x-amz-date")
    assert "'Host'" in rejected(replace_header((method, path, query, headers, body), "authorization", no_host)).message
    no_date = authorization.replace("SignedHeaders=content-type;host;x-amz-date", "SignedHeaders=content-type;host")
    assert "'X-Amz-Date'" in rejected(replace_header((method, path, query, headers, body), "authorization", no_date)).message
    other_day = authorization.replace("/20250304/", "/20250303/")
    assert "Date in Credential scope" in rejected(replace_header((method, path, query, headers, body), "authorization", other_day)).message


def test_date_header_instead_of_x_amz_date():
    headers = [("host", HOST), ("date", "Tue, 04 Mar 2025 12:00:00 GMT")]
    scope = sigv4.credential_scope("20250304", "us-east-1", "bedrock")
    signed = ("date", "host")
    creq = sigv4.canonical_request("POST", "/model/m/converse", "", headers, signed, sigv4.payload_hash(b"{}"))
    sig = sigv4.signature(sigv4.signing_key(SECRET, "20250304", "us-east-1", "bedrock"), sigv4.string_to_sign("20250304T120000Z", scope, creq))
    headers.append(("authorization", sigv4.authorization_header(KEY, scope, signed, sig)))
    assert verify(("POST", "/model/m/converse", "", headers, b"{}")).name == "team-a"


def test_content_sha256_must_match_the_body():
    request = botocore_signed("/model/m/converse", headers={"X-Amz-Content-Sha256": sigv4.payload_hash(b"other")})
    assert "x-amz-content-sha256" in rejected(request).message


@pytest.mark.parametrize("authorization, error_type", [
    (None, "MissingAuthenticationTokenException"),
    ("", "MissingAuthenticationTokenException"),
    ("AWS4-HMAC-SHA256", "IncompleteSignatureException"),
    ("AWS4-HMAC-SHA256 Credential=AKID/20250304/us-east-1/bedrock/aws4_request", "IncompleteSignatureException"),
    ("AWS4-HMAC-SHA256 Credential=AKID/2025/us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature=" + "0" * 64, "IncompleteSignatureException"),
    ("AWS4-HMAC-SHA256 Credential=AKID/20250304/us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature=zz", "IncompleteSignatureException"),
    ("AWS4-HMAC-SHA256 Credential=AKID/20250304/us-east-1/bedrock/aws4_request, SignedHeaders=;;, Signature=" + "0" * 64, "IncompleteSignatureException"),
    ("AWS4-HMAC-SHA1 Credential=x", "IncompleteSignatureException"),
    ("Basic dXNlcjpwYXNz", "IncompleteSignatureException"),
    ("Bearer", "AccessDeniedException"),
    ("Bearer ", "AccessDeniedException"),
    ("Bearer ABSKnot-a-key-we-know", "AccessDeniedException"),
])
def test_malformed_or_missing_authorization(authorization, error_type):
    headers = [("host", HOST), ("x-amz-date", "20250304T120000Z")] + ([("authorization", authorization)] if authorization is not None else [])
    error = rejected(("POST", "/model/m/converse", "", headers, b"{}"))
    assert error.error_type == error_type
    assert error.status == (400 if error_type == "IncompleteSignatureException" else 403)


def test_two_authorization_headers_are_refused():
    method, path, query, headers, body = botocore_signed("/model/m/converse")
    twice = headers + [h for h in headers if h[0].lower() == "authorization"]
    assert rejected((method, path, query, twice, body)).error_type == "IncompleteSignatureException"


def test_bedrock_api_keys_map_to_their_client():
    headers = [("host", HOST), ("authorization", f"Bearer {API_KEY}")]
    assert verify(("POST", "/model/m/converse", "", headers, b"{}")) == clientauth.Identity("team-c", "api-key")
    headers = [("host", HOST), ("Authorization", f"bearer   {API_KEY}  ")]
    assert verify(("POST", "/model/m/converse", "", headers, b"{}")).name == "team-c"
    error = rejected(("POST", "/model/m/converse", "", [("authorization", f"Bearer {API_KEY}x")], b"{}"))
    assert (error.status, error.message) == (403, clientauth.API_KEY_INVALID_MESSAGE)


def test_debug_signatures_tell_what_the_proxy_computed():
    method, path, query, headers, body = botocore_signed("/model/anthropic.claude-v2%3A1/converse", secret="wrong-secret-0123456789")
    quiet = rejected((method, path, query, headers, body))
    loud = rejected((method, path, query, headers, body), authenticator(debug_signatures=True))
    assert quiet.message == clientauth.SIGNATURE_MISMATCH_MESSAGE
    assert "The Canonical String for this request should have been\n'POST\n/model/anthropic.claude-v2%253A1/converse\n\n" in loud.message
    assert "The String-to-Sign should have been\n'AWS4-HMAC-SHA256\n20250304T120000Z\n20250304/us-east-1/bedrock/aws4_request\n" in loud.message
    assert SECRET not in loud.message


def test_reprs_hold_no_secrets():
    parsed = config.parse({
        "targets": [{"region": "us-east-1"}],
        "clients": [{"name": "team-a", "access_key_id": KEY, "secret_access_key": SECRET}],
        "api_keys": [{"name": "team-c", "key": API_KEY}],
    })
    for text in (repr(parsed), str(parsed), repr(authenticator()), repr(parsed.clients), repr(parsed.api_keys)):
        assert SECRET not in text and API_KEY not in text


# -- property tests: the verifier ---------------------------------------------------------------------------

_MODEL_CHARS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-:/_", min_size=1, max_size=60)
_BODIES = st.binary(max_size=300)
_HEADER_VALUES = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=_MODEL_CHARS, body=_BODIES, action=st.sampled_from(sorted(classify.MODEL_ACTIONS)),
       extra=st.dictionaries(st.sampled_from(["x-amzn-bedrock-trace", "x-amzn-bedrock-guardrailversion", "accept", "x-custom"]), _HEADER_VALUES, max_size=3),
       minutes=st.integers(min_value=-14, max_value=14))
def test_property_botocore_signed_requests_verify_and_any_body_change_is_caught(model, body, action, extra, minutes):
    request = botocore_signed(f"/model/{quote(model, safe='')}/{action}", body, headers=extra, when=NOW + timedelta(minutes=minutes))
    assert verify(request).name == "team-a"
    method, path, query, headers, _ = request
    assert rejected((method, path, query, headers, body + b"!")).error_type == "InvalidSignatureException"


@settings(max_examples=300, deadline=None)
@given(authorization=st.one_of(
           st.text(max_size=200),
           st.builds(lambda *parts: "AWS4-HMAC-SHA256 " + ", ".join(parts),
                     st.text(max_size=60), st.text(max_size=60), st.text(max_size=80)),
           st.builds(lambda key, date, region, service, sig: f"AWS4-HMAC-SHA256 Credential={key}/{date}/{region}/{service}/aws4_request, SignedHeaders=host;x-amz-date, Signature={sig}",
                     st.sampled_from([KEY, "AKIDX", ""]), st.sampled_from(["20250304", "2025", "99999999"]),
                     st.text(max_size=12), st.sampled_from(["bedrock", "s3", ""]), st.text(alphabet="0123456789abcdef", min_size=60, max_size=66)),
       ),
       date=st.one_of(st.none(), st.text(max_size=20), st.just("20250304T120000Z")),
       path=st.text(max_size=60), query=st.text(max_size=30), body=_BODIES)
def test_property_the_verifier_only_ever_answers_in_aws_terms(authorization, date, path, query, body):
    headers = [("host", HOST), ("authorization", authorization)] + ([("x-amz-date", date)] if date is not None else [])
    try:
        identity = verify(("POST", "/" + path, query, headers, body))
    except BedrockError as e:
        assert e.error_type in AUTH_ERRORS and e.status in (400, 403)
    else:  # only a correct signature (or a known API key) gets through, and random text is neither
        pytest.fail(f"accepted {authorization!r} as {identity}")


# -- property tests: the classifier and the rewriter -----------------------------------------------------

_HOST_PARTS = st.sampled_from(["bedrock-runtime", "bedrock-runtime-fips", "bedrock", "vpce-1a2b.bedrock-runtime", "evilbedrock-runtime"])
_SUFFIXES = st.sampled_from(["amazonaws.com", "amazonaws.com.cn", "api.aws", "vpce.amazonaws.com", "amazonaws.com.example.net",
                             "amazonaws.com.", "amazonaws.comevil.net", "amazonaws.com:443", "amazonaws.com/x", "amazonaws.com@evil.net"])


@given(part=_HOST_PARTS, region=st.sampled_from(["us-east-1", "eu-west-3", "cn-north-1", "x", "us-east-1.evil"]), suffix=_SUFFIXES,
       noise=st.text(alphabet="abc.-@:/ ", max_size=4))
def test_property_only_bedrock_runtime_names_under_aws_domains_count_as_bedrock(part, region, suffix, noise):
    host = f"{part}.{region}.{suffix}{noise}"
    accepted = classify.is_bedrock_host(host)
    if accepted:  # a look-alike can never pass: an AWS-owned domain, a bedrock-runtime label, nothing else
        name = host.lower().rstrip(".")
        assert name.endswith((".amazonaws.com", ".amazonaws.com.cn", ".api.aws"))
        assert not set(name) & set("@:/ ") and ".." not in name
        assert {"bedrock-runtime", "bedrock-runtime-fips"} & set(name.split("."))
    genuine = (
        part in ("bedrock-runtime", "bedrock-runtime-fips", "vpce-1a2b.bedrock-runtime")
        and region in ("us-east-1", "eu-west-3", "cn-north-1")
        and suffix in ("amazonaws.com", "amazonaws.com.cn", "api.aws", "vpce.amazonaws.com")
        and noise in ("", ".")
    )
    if genuine:
        assert accepted, host


@settings(max_examples=300)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]), path=st.text(max_size=120),
       host=st.one_of(st.just(HOST), st.text(max_size=40)), authorization=st.one_of(st.none(), st.text(max_size=80)),
       guardrail=st.one_of(st.none(), st.text(max_size=10)), body=st.binary(max_size=200))
def test_property_classifier_answers_or_refuses_for_any_input(method, path, host, authorization, guardrail, body):
    try:
        request = classify.classify(method, "/" + path, host, authorization, guardrail, body=body)
    except BedrockError as e:
        assert e.error_type in {"ValidationException", "UnknownOperationException"}
        return
    if request.model_id is not None:
        # what leaves the classifier as a model id cannot steer a URL or a log line
        assert classify._MODEL_ID_CHARS.match(request.model_id) and ".." not in request.model_id.split("/")
        assert ("/model/" + request.raw_model_id + "/") in ("/" + path)


_GEOS = st.sampled_from(["", "us.", "eu.", "apac.", "jp.", "au.", "global.", "us-gov.", "ca."])
_MODELS = st.sampled_from(["anthropic.claude-3-5-sonnet-20240620-v1:0", "amazon.nova-lite-v1:0", "meta.llama3-8b-instruct-v1:0"])
_REGIONS = st.sampled_from(["us-east-1", "us-west-2", "eu-west-1", "ap-northeast-1", "ap-southeast-2", "ca-central-1", "us-gov-west-1", "cn-north-1"])


def _model_id_forms():
    plain = st.builds(lambda geo, model: geo + model, _GEOS, _MODELS)
    foundation = st.builds(lambda region, model: f"arn:aws:bedrock:{region}::foundation-model/{model}", _REGIONS, _MODELS)
    profile = st.builds(lambda region, geo, model: f"arn:aws:bedrock:{region}:123456789012:inference-profile/{geo}{model}",
                        _REGIONS, _GEOS.filter(bool), _MODELS)
    return st.one_of(plain, foundation, profile)


@settings(max_examples=300)
@given(model_id=_model_id_forms(), region=_REGIONS, cross=st.booleans(), encode=st.sampled_from(["", ":", ":/"]),
       action=st.sampled_from(["converse", "converse-stream", "invoke", "invoke-with-response-stream", "count-tokens"]))
def test_property_the_rewriter_changes_only_the_region_or_geography(model_id, region, cross, encode, action):
    from bedrock_balancer.relay import Exchange, upstream_path
    from bedrock_balancer.routing import Choice

    raw = quote(model_id, safe="".join(c for c in ":/" if c not in encode) + "-._~")
    path = f"/model/{raw}/{action}"
    request = classify.classify("POST", path, HOST, None, None)
    rewritten = geography.rewrite_for_region(request.model_id, request.raw_model_id, region, cross)
    if rewritten is None:
        return
    new_id, new_raw = rewritten
    assert unquote(new_raw) == new_id  # the raw form still says what the decoded form says
    assert classify.decode_model_id(new_raw) == new_id  # and is still a model id the classifier accepts
    exchange = Exchange(request=request, method="POST", raw_path=path, raw_query="", headers=[], body=b"")
    sent = upstream_path(exchange, Choice(target=None, model_id=new_id, raw_model_id=new_raw))
    assert sent == f"/model/{new_raw}/{action}"
    assert sigv4.remove_dot_segments(sent) == sent and "?" not in sent and "#" not in sent
    # nothing but region and geography text differs
    assert _without_region_and_geo(new_id) == _without_region_and_geo(model_id)
    if new_id != model_id:
        assert region in new_id or geography.region_geographies(region)[0] + "." in new_id


def _without_region_and_geo(model_id: str) -> str:
    text = model_id
    if text.startswith("arn:"):
        parts = text.split(":", 5)
        parts[3] = "<region>"
        text = ":".join(parts)
    for geo in sorted(geography.GEOGRAPHIES, key=len, reverse=True):
        text = text.replace(f"/{geo}.", "/<geo>.")
        if text.startswith(geo + "."):
            text = "<geo>." + text[len(geo) + 1:]
    return text


# -- request hygiene -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, query, headers, error_type", [
    ("/model/m/converse", "", [("Authorization", "a"), ("authorization", "b")], "IncompleteSignatureException"),
    ("/model/m/converse", "", [("Host", "a"), ("host", "a")], "ValidationException"),
    ("/model/m/converse", "", [("X-Amz-Date", "a"), ("x-amz-date", "a")], "ValidationException"),
    ("/model/m/converse", "", [("Content-Type", "a"), ("content-type", "b")], "ValidationException"),
    ("/model/m/converse", "", [("x-note", "a\x00b")], "ValidationException"),
    ("/model/m/converse", "", [("x-note", "a\r\nb")], "ValidationException"),
    ("/model/caf\xe9/converse", "", [], "ValidationException"),
    ("/model/m converse", "", [], "ValidationException"),
    ("/model/m/converse", "X-Amz-Signature=abc", [], "ValidationException"),
    ("/model/m/converse", "a=1&x-amz-credential=AKID%2F", [], "ValidationException"),
    ("/model/m/converse", "X-Amz-Security-Token=t", [], "ValidationException"),
])
def test_check_request_refuses_ambiguous_or_hostile_requests(path, query, headers, error_type):
    with pytest.raises(BedrockError) as raised:
        clientauth.check_request(path, query, headers)
    assert raised.value.error_type == error_type


def test_check_request_lets_ordinary_requests_through():
    clientauth.check_request("/model/anthropic.claude-v2%3A1/converse", "", [("Host", HOST), ("x-note", "tab\tis fine"), ("accept", "a"), ("Accept", "b")])
    clientauth.check_request("/async-invoke", "maxResults=10&nextToken=abc", [])


@pytest.mark.parametrize("operation, content_type, body, ok", [
    ("Converse", None, b'{"messages": []}', True),
    ("Converse", None, b"not json", False),
    ("Converse", None, b"", False),
    ("Converse", None, b"[]", False),
    ("ConverseStream", None, b'{"a": "\xff"}', False),
    ("CountTokens", None, b'{"input": {}}', True),
    ("ApplyGuardrail", None, b"{", False),
    ("StartAsyncInvoke", None, b"null", False),
    ("InvokeModel", "application/json", b"{not json", False),
    ("InvokeModel", None, b"{not json", False),
    ("InvokeModel", "application/json; charset=utf-8", b'{"prompt": "hi"}', True),
    ("InvokeModel", "image/png", b"\x89PNG", True),
    ("InvokeModelWithResponseStream", "application/json", b"[", False),
    ("GetAsyncInvoke", None, b"", True),
    ("Converse", None, b'{"a":' * 200 + b"1" + b"}" * 200, False),
    ("Converse", None, b"[" * 100000 + b"]" * 100000, False),
])
def test_check_body(operation, content_type, body, ok):
    headers = [("content-type", content_type)] if content_type else []
    if ok:
        clientauth.check_body(operation, headers, body)
    else:
        with pytest.raises(BedrockError) as raised:
            clientauth.check_body(operation, headers, body)
        assert raised.value.error_type == "ValidationException"


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("::ffff:127.0.0.1", True), ("localhost", True),
    ("LOCALHOST.", True), ("foo.localhost", True), ("192.0.2.10", False), ("0.0.0.0", False), ("", False), ("example.com", False),
    ("::ffff:192.0.2.1", False), ("fd00::1", False), ("fe80::1%lo", False), ("::1%lo", True), ("cafe.be", False), ("127.0.0.1.example", False),
])
def test_is_loopback(host, loopback):
    assert clientauth.is_loopback(host) == loopback


def test_local_addresses_are_recognised_without_resolving_names():
    assert clientauth.is_local_address("127.0.0.1") and clientauth.is_local_address("0.0.0.0") and clientauth.is_local_address("::")
    assert not clientauth.is_local_address("192.0.2.254") and not clientauth.is_local_address("localhost")
    assert clientauth.is_local_address("[::ffff:127.0.0.1]") and not clientauth.is_local_address("bedrock-runtime.us-east-1.amazonaws.com")
    assert clientauth.is_local_listen_address("127.0.0.1") and not clientauth.is_local_listen_address("")
    assert not clientauth.is_local_listen_address("0.0.0.0")


# -- per-client limits ---------------------------------------------------------------------------------------


def test_client_rpm_limit_throttles_then_the_window_makes_room():
    now = [0.0]
    limits = clientauth.ClientLimits([("team-b", Budget(rpm=2))], window_s=60, clock=lambda: now[0])
    limits.admit("team-b", 0)
    limits.admit("team-b", 0)
    with pytest.raises(BedrockError) as raised:
        limits.admit("team-b", 0)
    assert raised.value.error_type == "ThrottlingException" and raised.value.status == 429
    assert "client 'team-b' is over its rpm limit (2 requests per 60 s)" in raised.value.message
    assert "room again in about 60 s" in raised.value.message
    assert limits.admit("team-a", 10**9) is None  # no limits configured for team-a
    now[0] = 60.5
    assert limits.admit("team-b", 0) is not None


def test_client_tpm_limit_settles_to_real_usage():
    limits = clientauth.ClientLimits([("team-b", Budget(tpm=1000))], window_s=60, clock=lambda: 0.0)
    assert limits.limits_tokens("team-b") and not limits.limits_tokens("team-a")
    reservation = limits.admit("team-b", 900)
    with pytest.raises(BedrockError, match="tpm limit"):
        limits.admit("team-b", 200)
    limits.settle(reservation, 50)  # it used far less than it reserved
    limits.admit("team-b", 900)


# -- configuration: clients and api_keys ------------------------------------------------------------------


def parse(**auth):
    return config.parse({"targets": [{"region": "us-east-1"}], **auth})


def test_clients_and_api_keys_parse_with_secrets_from_config_env_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TEAM_B_SECRET", "  secret-from-the-environment  ")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "team-c.key").write_text(API_KEY + "\n")
    config_file = tmp_path / "balancer.yaml"
    config_file.write_text(json.dumps({
        "targets": [{"region": "us-east-1"}],
        "clients": [
            {"name": "team-a", "access_key_id": KEY, "secret_access_key": SECRET, "rpm": 10, "tpm": 1000},
            {"name": "team-b", "access_key_id": "AKIDTEAMB", "secret_access_key_env": "TEAM_B_SECRET"},
            {"name": "team-a", "access_key_id": "AKIDTEAMAROTATED", "secret_access_key_file": "secrets/team-c.key"},
        ],
        "api_keys": [{"name": "team-c", "key_file": "secrets/team-c.key", "rpm": 5}],
    }))

    parsed = config.load_file(str(config_file))  # relative *_file paths: from the config file's directory

    assert [(c.name, c.access_key_id, c.secret_access_key) for c in parsed.clients] == [
        ("team-a", KEY, SECRET), ("team-b", "AKIDTEAMB", "secret-from-the-environment"), ("team-a", "AKIDTEAMAROTATED", API_KEY),
    ]
    assert [(k.name, k.key) for k in parsed.api_keys] == [("team-c", API_KEY)]
    assert dict(parsed.client_limits) == {"team-a": Budget(10, 1000), "team-c": Budget(5, None)}
    assert parsed.authenticates_clients and not parse().authenticates_clients


@pytest.mark.parametrize("auth, message", [
    ({"clients": [{"name": "a", "access_key_id": KEY}]}, "clients[0].secret_access_key: missing; give exactly one of secret_access_key, secret_access_key_env"),
    ({"clients": [{"name": "a", "access_key_id": KEY, "secret_access_key": SECRET, "secret_access_key_env": "X"}]}, "clients[0].secret_access_key: given 2 ways"),
    ({"clients": [{"name": "a", "access_key_id": KEY, "secret_access_key_env": "BEDROCK_TEST_UNSET_VARIABLE"}]}, "clients[0].secret_access_key_env: environment variable BEDROCK_TEST_UNSET_VARIABLE is not set"),
    ({"clients": [{"name": "a", "access_key_id": KEY, "secret_access_key_file": "/nonexistent/secret"}]}, "clients[0].secret_access_key_file: cannot read /nonexistent/secret"),
    ({"clients": [{"name": "a", "access_key_id": KEY, "secret_access_key": "short"}]}, "clients[0].secret_access_key: the secret must be at least 16 characters"),
    ({"clients": [{"name": "a", "access_key_id": "AK/ID", "secret_access_key": SECRET}]}, "clients[0].access_key_id: must be 4 to 128"),
    ({"clients": [{"access_key_id": KEY, "secret_access_key": SECRET}]}, "clients[0].name: must be a non-empty printable string"),
    ({"clients": [{"name": "a", "access_key_id": KEY, "secret_access_key": SECRET, "rmp": 3}]}, "clients[0].rmp: unknown key"),
    ({"clients": [{"name": "a", "access_key_id": KEY, "secret_access_key": SECRET, "rpm": 0}]}, "clients[0].rpm: must be a whole number of at least 1"),
    ({"clients": [{"name": "a", "access_key_id": KEY, "secret_access_key": SECRET}] * 2}, "clients[1].access_key_id: 'AKIDVIRTUALTEAMA' appears twice"),
    ({"clients": {"name": "a"}}, "clients: must be a list of mappings"),
    ({"api_keys": [{"name": "c"}]}, "api_keys[0].key: missing; give exactly one of key, key_env (an environment variable) or key_file"),
    ({"api_keys": [{"name": "c", "key": "has white space in it"}]}, "api_keys[0].key: must not contain whitespace"),
    ({"api_keys": [{"name": "c", "key": API_KEY}, {"name": "d", "key": API_KEY}]}, "api_keys[1].key: this value appears twice"),
    ({"clients": [{"name": "a", "access_key_id": KEY, "secret_access_key": SECRET, "rpm": 1}], "api_keys": [{"name": "a", "key": API_KEY, "tpm": 5}]},
     "api_keys[0].rpm: limits for client 'a' are already given in clients[0]"),
])
def test_client_auth_config_errors_name_the_field(auth, message):
    with pytest.raises(config.ConfigError) as raised:
        parse(**auth)
    assert message in str(raised.value)
    assert SECRET not in str(raised.value) and API_KEY not in str(raised.value)


# -- the addon's connection gate, for a client on another host (defence in depth) --------------------------


def test_without_authentication_a_connection_from_another_host_is_dropped(tmp_path):
    from mitmproxy.test import taddons, tflow

    from bedrock_balancer.addon import BedrockBalancer

    (tmp_path / "c.yaml").write_text("targets:\n  - region: us-east-1\n")
    balancer = BedrockBalancer()
    with taddons.context(balancer) as context:
        context.configure(balancer, bedrock_config=str(tmp_path / "c.yaml"))
        remote, local = tflow.tclient_conn(), tflow.tclient_conn()
        remote.peername, local.peername = ("192.0.2.7", 50000), ("127.0.0.1", 50001)
        balancer.client_connected(remote)
        balancer.client_connected(local)
        assert remote.error and "only clients on this machine" in remote.error
        assert not local.error
        context.configure(balancer, bedrock_allow_unauthenticated=True)
        again = tflow.tclient_conn()
        again.peername = ("192.0.2.7", 50002)
        balancer.client_connected(again)
        assert not again.error


def test_body_limit_option_is_checked_and_backed_by_mitmproxys_own_limit():
    from mitmproxy import exceptions
    from mitmproxy.addons.proxyserver import Proxyserver
    from mitmproxy.test import taddons

    from bedrock_balancer.addon import BODY_BACKSTOP_HEADROOM, BedrockBalancer

    balancer = BedrockBalancer()
    with taddons.context(Proxyserver(), balancer) as context:
        with pytest.raises(exceptions.OptionsError, match="bedrock_max_body: must be a positive number of bytes"):
            context.configure(balancer, bedrock_max_body=0)
        context.configure(balancer, bedrock_max_body=1000)
        assert context.options.body_size_limit == str(1000 + BODY_BACKSTOP_HEADROOM)  # no body can exhaust memory
        context.configure(balancer, body_size_limit="10m")  # the operator's own choice stands
        context.configure(balancer, bedrock_max_body=2000)
        assert context.options.body_size_limit == "10m"

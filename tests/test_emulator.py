"""The Bedrock Runtime emulator judged by real clients: boto3 over TLS, raw signed requests, the
official SigV4 test suite, and botocore's own signer as a cross-check of the canonical request.

No test sleeps to synchronise: streams are paused with hold handles, stalls are observed with
``wait_for_requests``, and quotas are driven with explicit clocks or held streams.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from unittest import mock
from urllib.parse import quote

import boto3
import botocore.auth
import pytest
import urllib3
from botocore import UNSIGNED
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.utils import percent_encode_sequence
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EventStreamError,
    ResponseStreamingError,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from bedrock_balancer.emulator import DEMO_ACCESS_KEY_ID, DEMO_SECRET_ACCESS_KEY, Emulator
from bedrock_balancer.emulator.models import (
    display_model_name,
    estimate_input_tokens,
    model_id_error,
    reserved_tokens,
)
from bedrock_balancer.emulator.quota import SlidingWindowQuota
from bedrock_balancer.emulator.sigv4check import (
    AuthFailure,
    CredentialRecord,
    canonical_request,
    parse_authorization,
    verify_sigv4,
)
from bedrock_balancer.eventstream import decode_frames

REGIONS = ["us-east-1", "us-west-2", "eu-west-1"]
AKID = "AKIDPROXY"
SECRET = "proxysecret"
MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
MESSAGES = [{"role": "user", "content": [{"text": "Say hello, please."}]}]
ANTHROPIC_BODY = json.dumps(
    {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Say hello, please."}],
    }
)
NO_RETRIES = Config(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=10)
SIGV4_SUITE = Path(__file__).resolve().parent / "data" / "sigv4-testsuite"  # the official AWS suite (Apache-2.0)


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def emu():
    emulator = Emulator(
        regions=REGIONS,
        tls=True,
        credentials={AKID: SECRET},
        bearer_tokens={"ABSKtoken": "us-east-1", "ABSKanywhere": None},
        fast=True,
    )
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture(autouse=True)
def fresh_state(request):
    yield
    if "emu" in request.fixturenames:
        request.getfixturevalue("emu").reset()


@pytest.fixture(scope="module")
def pool(emu):
    manager = urllib3.PoolManager(ca_certs=emu.ca_path)
    yield manager
    manager.clear()


def bedrock(emu, region="us-east-1", endpoint_region=None, **credentials):
    """A boto3 client that signs for ``region`` and talks to ``endpoint_region``'s port."""
    credentials.setdefault("aws_access_key_id", AKID)
    credentials.setdefault("aws_secret_access_key", SECRET)
    return boto3.client(
        "bedrock-runtime",
        region_name=region,
        endpoint_url=emu.endpoint_url(endpoint_region or region),
        verify=emu.ca_path,
        config=NO_RETRIES,
        **credentials,
    )


def error_code(excinfo) -> str:
    return excinfo.value.response["Error"]["Code"]


def send_signed(
    emu,
    pool,
    method,
    path,
    body=b"",
    headers=None,
    *,
    region="us-east-1",
    service="bedrock",
    scope_region=None,
    secret=SECRET,
    after_signing=None,
):
    """Sign with botocore's SigV4Auth, optionally tamper, send with urllib3; return the response."""
    url = emu.endpoint_url(region) + path
    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers or {}))
    botocore.auth.SigV4Auth(Credentials(AKID, secret), service, scope_region or region).add_auth(request)
    sent_headers = dict(request.headers.items())
    if after_signing:
        after_signing(sent_headers)
    return pool.request(method, url, body=body, headers=sent_headers, retries=False)


def response_json(response) -> dict:
    return json.loads(response.data)


# ------------------------------------------------------------------------------------------------
# The five balanceable operations through boto3 over TLS


def test_invoke_model(emu):
    response = bedrock(emu, "us-west-2").invoke_model(modelId=MODEL, body=ANTHROPIC_BODY)
    body = json.loads(response["body"].read())
    headers = response["ResponseMetadata"]["HTTPHeaders"]
    assert body["type"] == "message" and body["role"] == "assistant"
    assert body["content"] == [{"type": "text", "text": "Hello from us-west-2"}]
    assert body["stop_reason"] == "end_turn"
    assert body["usage"]["input_tokens"] == estimate_input_tokens(json.loads(ANTHROPIC_BODY))
    assert headers["x-emulator-region"] == "us-west-2"
    assert int(headers["x-amzn-bedrock-output-token-count"]) == body["usage"]["output_tokens"]
    assert int(headers["x-amzn-bedrock-input-token-count"]) == body["usage"]["input_tokens"]
    assert "x-amzn-bedrock-invocation-latency" in headers and headers["x-amzn-requestid"]
    (record,) = emu.requests
    assert record.region == "us-west-2"
    assert record.operation == "InvokeModel"
    assert record.model_id == MODEL
    assert record.raw_path == "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/invoke"
    assert record.access_key_id == AKID and record.auth_ok and record.status == 200
    assert record.auth_method == "sigv4"
    assert record.body == ANTHROPIC_BODY.encode()
    assert record.header("X-Amz-Date") is not None
    assert any(name == "X-Amz-Date" for name, _ in record.headers), "header names are kept as sent"


def test_invoke_model_with_response_stream(emu):
    response = bedrock(emu).invoke_model_with_response_stream(modelId=MODEL, body=ANTHROPIC_BODY)
    assert response["ResponseMetadata"]["HTTPHeaders"]["content-type"] == "application/vnd.amazon.eventstream"
    assert response["ResponseMetadata"]["HTTPHeaders"]["x-amzn-bedrock-content-type"] == "application/json"
    events = [json.loads(event["chunk"]["bytes"]) for event in response["body"]]
    assert [event["type"] for event in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    text = "".join(event["delta"]["text"] for event in events if event["type"] == "content_block_delta")
    assert text == "Hello from us-east-1"
    metrics = events[-1]["amazon-bedrock-invocationMetrics"]
    assert set(metrics) == {"inputTokenCount", "outputTokenCount", "invocationLatency", "firstByteLatency"}
    assert metrics["outputTokenCount"] == events[-2]["usage"]["output_tokens"] == 3


def test_converse(emu):
    response = bedrock(emu, "eu-west-1").converse(modelId="eu." + MODEL, messages=MESSAGES)
    assert response["output"]["message"] == {"role": "assistant", "content": [{"text": "Hello from eu-west-1"}]}
    assert response["stopReason"] == "end_turn"
    usage = response["usage"]
    assert usage["totalTokens"] == usage["inputTokens"] + usage["outputTokens"]
    assert "latencyMs" in response["metrics"]
    assert emu.requests[0].model_id == "eu." + MODEL


def test_converse_stream(emu):
    response = bedrock(emu).converse_stream(modelId="us." + MODEL, messages=MESSAGES)
    events = list(response["stream"])
    kinds = [next(iter(event)) for event in events]
    assert kinds == [
        "messageStart",
        "contentBlockDelta",
        "contentBlockDelta",
        "contentBlockDelta",
        "contentBlockStop",
        "messageStop",
        "metadata",
    ]
    text = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e)
    assert text == "Hello from us-east-1"
    assert events[-1]["metadata"]["usage"]["outputTokens"] == 3
    assert events[-2]["messageStop"]["stopReason"] == "end_turn"


def test_converse_stream_frames_are_framed_like_aws(emu, pool):
    body = json.dumps({"messages": MESSAGES}).encode()
    response = send_signed(
        emu, pool, "POST", "/model/us.amazon.nova-lite-v1%3A0/converse-stream", body,
        {"Content-Type": "application/json"},
    )
    assert response.status == 200
    frames = decode_frames(response.data)
    for frame in frames:
        assert frame.headers[":message-type"] == "event"
        assert frame.headers[":content-type"] == "application/json"
        assert "p" in json.loads(frame.payload), "events carry padding"
    assert [frame.event_type for frame in frames][0] == "messageStart"


def test_count_tokens(emu):
    client = bedrock(emu)
    converse_count = client.count_tokens(modelId=MODEL, input={"converse": {"messages": MESSAGES}})
    assert converse_count["inputTokens"] == estimate_input_tokens({"messages": MESSAGES})
    invoke_count = client.count_tokens(modelId=MODEL, input={"invokeModel": {"body": ANTHROPIC_BODY}})
    assert invoke_count["inputTokens"] == estimate_input_tokens(json.loads(ANTHROPIC_BODY))


def test_plain_http_emulator():
    with Emulator(regions=["us-east-1"], tls=False, credentials={AKID: SECRET}, fast=True) as plain:
        assert plain.endpoint_url("us-east-1").startswith("http://localhost:")
        assert plain.ca_path is None
        client = boto3.client(
            "bedrock-runtime",
            region_name="us-east-1",
            endpoint_url=plain.endpoint_url("us-east-1"),
            aws_access_key_id=AKID,
            aws_secret_access_key=SECRET,
            config=NO_RETRIES,
        )
        assert client.converse(modelId=MODEL, messages=MESSAGES)["output"]["message"]["content"][0]["text"] == (
            "Hello from us-east-1"
        )
        events = list(client.converse_stream(modelId=MODEL, messages=MESSAGES)["stream"])
        assert "metadata" in events[-1]


def test_keep_alive_serves_many_requests_on_one_client(emu):
    client = bedrock(emu)
    for _ in range(5):
        client.converse(modelId=MODEL, messages=MESSAGES)
    assert [r.status for r in emu.requests] == [200] * 5


def test_chunked_request_body_is_accepted(emu, pool):
    body = json.dumps({"messages": MESSAGES}).encode()
    url = emu.endpoint_url("us-east-1") + "/model/amazon.nova-lite-v1%3A0/converse"
    request = AWSRequest(method="POST", url=url, data=body, headers={"Content-Type": "application/json"})
    botocore.auth.SigV4Auth(Credentials(AKID, SECRET), "bedrock", "us-east-1").add_auth(request)
    response = pool.request(
        "POST", url, body=iter([body[:10], body[10:]]), headers=dict(request.headers.items()), chunked=True
    )
    assert response.status == 200, response.data
    assert emu.requests[0].header("transfer-encoding") == "chunked"
    assert emu.requests[0].body == body


# ------------------------------------------------------------------------------------------------
# Model identifiers


@pytest.mark.parametrize(
    "region, model_id, valid",
    [
        ("us-east-1", MODEL, True),
        ("eu-west-1", "amazon.nova-lite-v1:0", True),
        ("us-west-2", "meta.llama3-70b-instruct-v1:0", True),
        ("us-east-1", "anthropic.claude-sonnet-4-6", True),
        ("us-east-1", "us." + MODEL, True),
        ("eu-west-1", "us." + MODEL, False),
        ("eu-west-1", "eu." + MODEL, True),
        ("us-east-1", "eu." + MODEL, False),
        ("eu-west-1", "global." + MODEL, True),
        ("ap-northeast-1", "jp." + MODEL, True),
        ("ap-south-1", "jp." + MODEL, False),
        ("ap-south-1", "apac." + MODEL, True),
        ("me-central-1", "apac." + MODEL, True),
        ("ap-southeast-2", "au." + MODEL, True),
        ("us-gov-west-1", "us-gov." + MODEL, True),
        ("us-gov-west-1", "us." + MODEL, False),
        ("us-east-1", "madeup.model-v1:0", False),
        ("us-east-1", "xx." + MODEL, False),
        ("us-east-1", "not a model", False),
        ("us-east-1", f"arn:aws:bedrock:us-east-1::foundation-model/{MODEL}", True),
        ("us-west-2", f"arn:aws:bedrock:us-east-1::foundation-model/{MODEL}", False),
        ("us-east-1", f"arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.{MODEL}", True),
        ("us-east-1", f"arn:aws:bedrock:us-east-1:123456789012:inference-profile/eu.{MODEL}", False),
        ("us-east-1", "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc123", True),
        ("us-east-1", "arn:aws:bedrock:us-east-1:123456789012:provisioned-model/abc123", True),
        ("eu-west-1", "arn:aws:bedrock:us-east-1:123456789012:provisioned-model/abc123", False),
        ("us-east-1", "arn:aws:bedrock:us-east-1:123456789012:custom-model/x/y", True),
        ("us-east-1", "arn:aws:bedrock:us-east-1:123456789012:imported-model/abc", True),
        ("us-east-1", "arn:aws:bedrock:us-east-1:123456789012:unicorn/abc", False),
        ("us-east-1", "arn:aws:s3:us-east-1:123456789012:bucket/abc", False),
    ],
)
def test_model_identifier_rules(region, model_id, valid):
    assert (model_id_error(model_id, region) is None) is valid


def test_arn_model_id_travels_percent_encoded(emu):
    arn = f"arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.{MODEL}"
    bedrock(emu).converse(modelId=arn, messages=MESSAGES)
    (record,) = emu.requests
    assert record.model_id == arn
    assert record.raw_path == "/model/" + quote(arn, safe="") + "/converse"


def test_invalid_model_ids_are_validation_errors(emu):
    client = bedrock(emu, "eu-west-1")
    for model_id in ("us." + MODEL, "madeup.model-v1:0", f"arn:aws:bedrock:us-east-1::foundation-model/{MODEL}"):
        with pytest.raises(client.exceptions.ValidationException, match="The provided model identifier is invalid."):
            client.converse(modelId=model_id, messages=MESSAGES)


def test_display_model_name():
    assert display_model_name("us." + MODEL) == "claude-3-5-sonnet-20240620"
    assert display_model_name(f"arn:aws:bedrock:us-east-1::foundation-model/{MODEL}") == "claude-3-5-sonnet-20240620"


# ------------------------------------------------------------------------------------------------
# Signature checks through boto3


def test_changed_body_byte_breaks_the_signature(emu):
    client = bedrock(emu)

    def flip_one_byte(request, **_):
        request.body = request.body.replace(b"hello", b"jello")

    client.meta.events.register("before-send.bedrock-runtime.Converse", flip_one_byte)
    with pytest.raises(ClientError) as excinfo:
        client.converse(modelId=MODEL, messages=MESSAGES)
    assert error_code(excinfo) == "InvalidSignatureException"
    assert excinfo.value.response["Error"]["Message"].startswith(
        "The request signature we calculated does not match the signature you provided. "
        "Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
    )
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert emu.requests[0].auth_ok is False


def test_wrong_secret(emu):
    with pytest.raises(ClientError) as excinfo:
        bedrock(emu, aws_secret_access_key="not-the-secret").converse(modelId=MODEL, messages=MESSAGES)
    assert error_code(excinfo) == "InvalidSignatureException"


def test_unknown_access_key(emu):
    with pytest.raises(ClientError) as excinfo:
        bedrock(emu, aws_access_key_id="AKIDUNKNOWN").converse(modelId=MODEL, messages=MESSAGES)
    assert error_code(excinfo) == "UnrecognizedClientException"
    assert excinfo.value.response["Error"]["Message"] == "The security token included in the request is invalid."
    assert emu.requests[0].access_key_id == "AKIDUNKNOWN"


def test_credential_scoped_to_another_region(emu):
    with pytest.raises(ClientError) as excinfo:
        bedrock(emu, "eu-west-1", endpoint_region="us-east-1").converse(modelId=MODEL, messages=MESSAGES)
    assert error_code(excinfo) == "InvalidSignatureException"
    assert excinfo.value.response["Error"]["Message"] == "Credential should be scoped to a valid region. "


def test_credential_scoped_to_another_service(emu, pool):
    body = json.dumps({"messages": MESSAGES}).encode()
    response = send_signed(
        emu, pool, "POST", "/model/amazon.nova-lite-v1%3A0/converse", body, service="bedrock-runtime"
    )
    assert response.status == 403
    assert response.headers["x-amzn-ErrorType"].split(":")[0] == "InvalidSignatureException"
    assert response_json(response)["message"] == "Credential should be scoped to correct service: 'bedrock'. "


@pytest.mark.parametrize(
    "offset, wording", [(-dt.timedelta(minutes=6), "Signature expired"), (dt.timedelta(minutes=6), "not yet current")]
)
def test_signature_outside_the_clock_skew(emu, offset, wording):
    signing_time = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) + offset
    with mock.patch("botocore.auth.get_current_datetime", return_value=signing_time):
        client = bedrock(emu)
        with pytest.raises(ClientError) as excinfo:
            client.converse(modelId=MODEL, messages=MESSAGES)
    assert error_code(excinfo) == "InvalidSignatureException"
    assert wording in excinfo.value.response["Error"]["Message"]
    assert "5 min." in excinfo.value.response["Error"]["Message"]


def test_signature_within_the_clock_skew_passes(emu):
    signing_time = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(minutes=4)
    with mock.patch("botocore.auth.get_current_datetime", return_value=signing_time):
        bedrock(emu).converse(modelId=MODEL, messages=MESSAGES)


def test_signed_header_missing_from_the_request(emu):
    client = bedrock(emu)

    def drop_content_type(request, **_):
        del request.headers["Content-Type"]

    client.meta.events.register("before-send.bedrock-runtime.Converse", drop_content_type)
    with pytest.raises(ClientError) as excinfo:
        client.converse(modelId=MODEL, messages=MESSAGES)
    assert error_code(excinfo) == "InvalidSignatureException"
    assert "content-type" in parse_authorization(emu.requests[0].header("authorization")).signed_headers


def test_missing_date_header(emu):
    client = bedrock(emu)

    def drop_date(request, **_):
        del request.headers["X-Amz-Date"]

    client.meta.events.register("before-send.bedrock-runtime.Converse", drop_date)
    with pytest.raises(ClientError) as excinfo:
        client.converse(modelId=MODEL, messages=MESSAGES)
    assert error_code(excinfo) == "IncompleteSignatureException"
    assert "'X-Amz-Date' or a 'Date' header" in excinfo.value.response["Error"]["Message"]


def test_host_and_date_must_be_signed(emu, pool):
    def unsign(name):
        def mutate(headers):
            headers["Authorization"] = headers["Authorization"].replace(f"{name};", "").replace(f";{name}", "")

        return mutate

    body = json.dumps({"messages": MESSAGES}).encode()
    for name, wording in (("host", "'Host' or ':authority'"), ("x-amz-date", "'X-Amz-Date'")):
        response = send_signed(
            emu, pool, "POST", "/model/amazon.nova-lite-v1%3A0/converse", body, after_signing=unsign(name)
        )
        assert response.status == 403
        assert response.headers["x-amzn-ErrorType"].startswith("InvalidSignatureException")
        assert wording in response_json(response)["message"]


def test_missing_authentication(emu):
    client = boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        endpoint_url=emu.endpoint_url("us-east-1"),
        verify=emu.ca_path,
        config=NO_RETRIES.merge(Config(signature_version=UNSIGNED)),
    )
    with pytest.raises(ClientError) as excinfo:
        client.converse(modelId=MODEL, messages=MESSAGES)
    assert error_code(excinfo) == "MissingAuthenticationTokenException"
    assert excinfo.value.response["Error"]["Message"] == "Missing Authentication Token"


@pytest.mark.parametrize(
    "authorization, wording",
    [
        ("AWS4-HMAC-SHA256 Credential=AKIDPROXY/20240101/us-east-1/bedrock/aws4_request", "requires 'Signature'"),
        ("AWS4-HMAC-SHA256 garbage", "not a valid key=value pair"),
        ("AWS4-HMAC-SHA1 Credential=x, SignedHeaders=host, Signature=00", "Unsupported AWS 'algorithm'"),
        ("AWS4-HMAC-SHA256 Credential=AKIDPROXY/x, SignedHeaders=host, Signature=00", "credential"),
    ],
)
def test_malformed_authorization(emu, pool, authorization, wording):
    def replace(headers):
        headers["Authorization"] = authorization

    response = send_signed(emu, pool, "POST", "/model/amazon.nova-lite-v1%3A0/converse", b"{}", after_signing=replace)
    assert response.status == 403
    assert response.headers["x-amzn-ErrorType"].startswith("IncompleteSignatureException")
    assert wording in response_json(response)["message"]


def test_error_wire_format(emu, pool):
    response = send_signed(emu, pool, "POST", "/model/amazon.nova-lite-v1%3A0/converse", b"{}", secret="wrong")
    assert response.status == 403
    error_type = response.headers["x-amzn-ErrorType"]
    assert error_type.split(":", 1)[0] == "InvalidSignatureException"
    assert error_type.split(":", 1)[1].startswith("http://internal.amazon.com/coral/")
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["x-amzn-RequestId"]
    assert set(response_json(response)) == {"message"}


# ------------------------------------------------------------------------------------------------
# The signature check against the official SigV4 test suite and botocore's signer


def _suite_cases():
    if not SIGV4_SUITE.is_dir():
        return []
    return sorted(path.with_suffix("") for path in SIGV4_SUITE.rglob("*.sreq"))


def _parse_suite_request(text: str):
    head, _, body = text.partition("\n\n")
    lines = head.split("\n")
    method, _, rest = lines[0].partition(" ")
    target = rest.rsplit(" ", 1)[0]
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:  # folded continuation of the previous header
            name, value = headers[-1]
            headers[-1] = (name, value + "\n" + line)
        else:
            name, _, value = line.partition(":")
            headers.append((name, value))
    return method, target.encode("utf-8"), headers, body.encode("utf-8")


SUITE_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
def _suite_verify(method, target, headers, body, token=None):
    def lookup(access_key_id):
        return CredentialRecord(access_key_id, SUITE_SECRET, token) if access_key_id == "AKIDEXAMPLE" else None

    return verify_sigv4(
        method=method,
        raw_target=target,
        headers=headers,
        body=body,
        authorization=next(v for n, v in headers if n.lower() == "authorization"),
        region="us-east-1",
        service="service",
        lookup_credentials=lookup,
        now=dt.datetime(2015, 8, 30, 12, 36, tzinfo=dt.timezone.utc),
        clock_skew_s=300,
    )


@pytest.mark.parametrize("case", _suite_cases(), ids=lambda path: path.name)
def test_official_sigv4_suite(case):
    method, target, headers, body = _parse_suite_request(case.with_suffix(".sreq").read_text("utf-8"))
    # The .authz file is the suite's answer; one .sreq (get-vanilla-with-session-token) carries a
    # stale signature copied from get-vanilla, so the Authorization header comes from .authz.
    authz = case.with_suffix(".authz").read_text("utf-8").strip()
    headers = [(n, v) for n, v in headers if n.lower() != "authorization"] + [("Authorization", authz)]
    signed = parse_authorization(next(v for n, v in headers if n.lower() == "authorization"))
    creq = canonical_request(method, target, headers, signed.signed_headers, hashlib.sha256(body).hexdigest())
    assert creq == case.with_suffix(".creq").read_text("utf-8")
    token = next((v for n, v in headers if n.lower() == "x-amz-security-token"), None)
    if case.name == "post-sts-header-after":
        # The token was added after signing: the emulator, like Bedrock, wants it signed.
        with pytest.raises(AuthFailure, match="UnrecognizedClientException"):
            _suite_verify(method, target, headers, body, token)
        return
    assert _suite_verify(method, target, headers, body, token).access_key_id == "AKIDEXAMPLE"
    tampered = body + b"x"
    with pytest.raises(AuthFailure, match="InvalidSignatureException"):
        _suite_verify(method, target, headers, tampered, token)


path_segments = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/?#", exclude_categories=("Cs", "Cc")),
    min_size=1,
    max_size=12,
).filter(lambda segment: segment not in (".", ".."))  # dot segments normalise away: a changed path could sign the same
query_items = st.lists(
    st.tuples(st.text(min_size=1, max_size=6), st.text(max_size=6)), max_size=3
)


@settings(max_examples=150, deadline=None)
@given(
    segments=st.lists(path_segments, min_size=1, max_size=4),
    query=query_items,
    header_value=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20),
    body=st.binary(max_size=64),
)
def test_verifier_agrees_with_botocore_signer(segments, query, header_value, body):
    """Whatever botocore signs (percent-encoded path, query, odd spacing), the verifier accepts, and
    any change to the path is caught."""
    path = "/" + "/".join(quote(segment, safe="") for segment in segments)
    url = "https://bedrock-runtime.us-east-1.amazonaws.com" + path
    if query:
        # Encoded as botocore's rest-json serializer puts a query on the wire.
        url += "?" + percent_encode_sequence(query)
    request = AWSRequest(method="POST", url=url, data=body, headers={"X-Custom": header_value})
    now = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
    with mock.patch("botocore.auth.get_current_datetime", return_value=now.replace(tzinfo=None)):
        botocore.auth.SigV4Auth(Credentials(AKID, SECRET), "bedrock", "us-east-1").add_auth(request)
    prepared = request.prepare()
    target = prepared.url.split("amazonaws.com", 1)[1].encode("ascii")
    headers = [(name, value) for name, value in prepared.headers.items()]
    headers.append(("Host", "bedrock-runtime.us-east-1.amazonaws.com"))

    def verify(raw_target):
        return verify_sigv4(
            method="POST",
            raw_target=raw_target,
            headers=headers,
            body=body,
            authorization=prepared.headers["Authorization"],
            region="us-east-1",
            service="bedrock",
            lookup_credentials=lambda akid: CredentialRecord(akid, SECRET),
            now=now,
            clock_skew_s=300,
        )

    assert verify(target).access_key_id == AKID
    with pytest.raises(AuthFailure, match="InvalidSignatureException"):
        verify(target.replace(b"/", b"/x", 1))


# ------------------------------------------------------------------------------------------------
# Temporary credentials (STS) and Bedrock API keys


def sts_client(emu, region="us-east-1", secret=SECRET):
    return boto3.client(
        "sts",
        region_name=region,
        endpoint_url=emu.endpoint_url(region),
        verify=emu.ca_path,
        aws_access_key_id=AKID,
        aws_secret_access_key=secret,
        config=NO_RETRIES,
    )


def test_assume_role_credentials_work_only_with_their_token(emu):
    result = sts_client(emu, "eu-west-1").assume_role(
        RoleArn="arn:aws:iam::123456789012:role/bedrock-caller", RoleSessionName="balancer", DurationSeconds=1800
    )
    credentials = result["Credentials"]
    assert credentials["AccessKeyId"].startswith("ASIA")
    lifetime = credentials["Expiration"] - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(minutes=29) < lifetime <= dt.timedelta(minutes=30)
    assert result["AssumedRoleUser"]["Arn"] == "arn:aws:sts::123456789012:assumed-role/bedrock-caller/balancer"

    temporary = bedrock(
        emu,
        aws_access_key_id=credentials["AccessKeyId"],
        aws_secret_access_key=credentials["SecretAccessKey"],
        aws_session_token=credentials["SessionToken"],
    )
    assert temporary.converse(modelId=MODEL, messages=MESSAGES)["stopReason"] == "end_turn"
    assert "x-amz-security-token" in parse_authorization(emu.requests[-1].header("authorization")).signed_headers

    without_token = bedrock(
        emu, aws_access_key_id=credentials["AccessKeyId"], aws_secret_access_key=credentials["SecretAccessKey"]
    )
    with pytest.raises(ClientError) as excinfo:
        without_token.converse(modelId=MODEL, messages=MESSAGES)
    assert error_code(excinfo) == "UnrecognizedClientException"

    token = credentials["SessionToken"]
    wrong_token = bedrock(
        emu,
        aws_access_key_id=credentials["AccessKeyId"],
        aws_secret_access_key=credentials["SecretAccessKey"],
        aws_session_token=token[:-1] + ("y" if token.endswith("x") else "x"),  # random: it may end in "x" already
    )
    with pytest.raises(ClientError) as excinfo:
        wrong_token.converse(modelId=MODEL, messages=MESSAGES)
    assert error_code(excinfo) == "UnrecognizedClientException"


def test_long_term_key_with_a_session_token_is_refused(emu):
    with pytest.raises(ClientError) as excinfo:
        bedrock(emu, aws_session_token="made-up").converse(modelId=MODEL, messages=MESSAGES)
    assert error_code(excinfo) == "UnrecognizedClientException"


def test_expired_temporary_credentials():
    record = CredentialRecord("ASIAEXPIRED", "secret", "token", dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc))
    request = AWSRequest(method="POST", url="https://h.example/", data=b"{}", headers={})
    signing_time = dt.datetime(2024, 1, 1, 0, 0, 30)
    with mock.patch("botocore.auth.get_current_datetime", return_value=signing_time):
        botocore.auth.SigV4Auth(Credentials("ASIAEXPIRED", "secret", "token"), "bedrock", "us-east-1").add_auth(request)
    headers = list(request.headers.items()) + [("Host", "h.example")]
    with pytest.raises(AuthFailure) as excinfo:
        verify_sigv4(
            method="POST",
            raw_target=b"/",
            headers=headers,
            body=b"{}",
            authorization=request.headers["Authorization"],
            region="us-east-1",
            service="bedrock",
            lookup_credentials=lambda akid: record,
            now=signing_time.replace(tzinfo=dt.timezone.utc),
            clock_skew_s=300,
        )
    assert excinfo.value.error_type == "ExpiredTokenException"


def test_sts_errors_use_sts_codes(emu):
    with pytest.raises(ClientError) as excinfo:
        sts_client(emu, secret="wrong").get_caller_identity()
    assert error_code(excinfo) == "SignatureDoesNotMatch"
    with pytest.raises(ClientError) as excinfo:
        sts_client(emu).assume_role(RoleArn="arn:aws:iam::not-an-account:role/x", RoleSessionName="s1")
    assert error_code(excinfo) == "ValidationError"
    identity = sts_client(emu).get_caller_identity()
    assert identity["Account"] == "123456789012"
    assert AKID in identity["Arn"]


def test_bedrock_api_keys(emu, monkeypatch):
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "ABSKtoken")
    assert bedrock(emu).converse(modelId=MODEL, messages=MESSAGES)["stopReason"] == "end_turn"
    record = emu.requests[-1]
    assert record.auth_method == "bearer" and record.auth_ok and record.access_key_id is None

    with pytest.raises(bedrock(emu).exceptions.AccessDeniedException, match="API Key is valid"):
        bedrock(emu, "eu-west-1").converse(modelId=MODEL, messages=MESSAGES)

    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "ABSKanywhere")
    assert bedrock(emu, "eu-west-1").converse(modelId=MODEL, messages=MESSAGES)["stopReason"] == "end_turn"

    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "ABSKunknown")
    with pytest.raises(ClientError, match="API Key is valid"):
        bedrock(emu).converse(modelId=MODEL, messages=MESSAGES)

    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "no-prefix")
    with pytest.raises(ClientError, match="Must start with pre-defined prefix"):
        bedrock(emu).converse(modelId=MODEL, messages=MESSAGES)


# ------------------------------------------------------------------------------------------------
# Injected faults


@pytest.mark.parametrize(
    "mode, exception_name, status",
    [
        ("throttle", "ThrottlingException", 429),
        ("not_ready", "ModelNotReadyException", 429),
        ("fail", "ServiceUnavailableException", 503),
        ("error500", "InternalServerException", 500),
    ],
)
def test_error_modes_raise_modeled_exceptions(emu, mode, exception_name, status):
    emu.set_mode("us-east-1", mode)
    client = bedrock(emu)
    with pytest.raises(getattr(client.exceptions, exception_name)) as excinfo:
        client.invoke_model(modelId=MODEL, body=ANTHROPIC_BODY)
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert emu.requests[0].error_type == exception_name
    # Other regions are unaffected.
    bedrock(emu, "us-west-2").invoke_model(modelId=MODEL, body=ANTHROPIC_BODY)


def test_mode_count_then_back_to_ok(emu):
    emu.set_mode("us-east-1", "throttle", count=2)
    client = bedrock(emu)
    for _ in range(2):
        with pytest.raises(client.exceptions.ThrottlingException, match="Too many requests"):
            client.converse(modelId=MODEL, messages=MESSAGES)
    client.converse(modelId=MODEL, messages=MESSAGES)
    assert [r.status for r in emu.requests] == [429, 429, 200]


def test_mode_for_one_model_only(emu):
    emu.set_mode("us-east-1", "fail", model="amazon.nova-lite-v1:0")
    client = bedrock(emu)
    client.converse(modelId=MODEL, messages=MESSAGES)
    with pytest.raises(client.exceptions.ServiceUnavailableException):
        client.converse(modelId="amazon.nova-lite-v1:0", messages=MESSAGES)


def test_faults_come_after_authentication(emu):
    emu.set_mode("us-east-1", "throttle", count=1)
    with pytest.raises(ClientError) as excinfo:
        bedrock(emu, aws_secret_access_key="wrong").converse(modelId=MODEL, messages=MESSAGES)
    assert error_code(excinfo) == "InvalidSignatureException"
    with pytest.raises(ClientError) as excinfo:
        bedrock(emu).converse(modelId=MODEL, messages=MESSAGES)
    assert error_code(excinfo) == "ThrottlingException", "the count was not used up by the refused call"


def test_drop_closes_without_answer(emu):
    emu.set_mode("us-east-1", "drop", count=1)
    client = bedrock(emu)
    with pytest.raises(ConnectionClosedError):
        client.converse(modelId=MODEL, messages=MESSAGES)
    assert emu.requests[0].status == 0 and emu.requests[0].error_type == "drop"
    client.converse(modelId=MODEL, messages=MESSAGES)


def test_stall_answers_only_after_release(emu):
    emu.set_mode("us-east-1", "stall", count=1)
    outcome = {}

    def call():
        outcome["response"] = bedrock(emu).converse(modelId=MODEL, messages=MESSAGES)

    caller = threading.Thread(target=call)
    caller.start()
    assert emu.wait_for_requests(1)
    stalled = emu.requests[0]
    assert stalled.status == 0 and stalled.error_type == "stall"
    assert caller.is_alive()
    emu.release_all()
    caller.join(timeout=10)
    assert outcome["response"]["stopReason"] == "end_turn"
    assert stalled.status == 200 and stalled.error_type is None


def test_stream_first_exception(emu):
    emu.set_mode("us-east-1", "stream_first_exception")
    client = bedrock(emu)
    stream = client.converse_stream(modelId=MODEL, messages=MESSAGES)["stream"]
    with pytest.raises(EventStreamError) as excinfo:
        list(stream)
    assert error_code(excinfo) == "throttlingException"
    body = client.invoke_model_with_response_stream(modelId=MODEL, body=ANTHROPIC_BODY)["body"]
    with pytest.raises(EventStreamError) as excinfo:
        list(body)
    assert error_code(excinfo) == "throttlingException"
    assert [r.status for r in emu.requests] == [200, 200]


def test_stream_stall_begins_the_stream_then_says_nothing_until_released(emu):
    emu.set_mode("us-east-1", "stream_stall")
    stream = iter(bedrock(emu).converse_stream(modelId=MODEL, messages=MESSAGES)["stream"])

    assert "messageStart" in next(stream)  # the stream began ...
    stalled = emu.requests[0]
    assert (stalled.status, stalled.error_type) == (200, "stream_stall")  # ... and nothing more came
    emu.release_all()
    assert "metadata" in list(stream)[-1]


def test_stream_modes_leave_non_streaming_calls_alone(emu):
    emu.set_mode("us-east-1", "stream_first_exception", count=1)
    client = bedrock(emu)
    client.converse(modelId=MODEL, messages=MESSAGES)
    with pytest.raises(EventStreamError):
        list(client.converse_stream(modelId=MODEL, messages=MESSAGES)["stream"])


def test_stream_cut_is_an_error_not_a_clean_end(emu):
    emu.set_mode("us-east-1", "stream_cut")
    client = bedrock(emu)
    received = []
    with pytest.raises((urllib3.exceptions.ProtocolError, ResponseStreamingError)):
        for event in client.converse_stream(modelId=MODEL, messages=MESSAGES)["stream"]:
            received.append(event)
    assert received and "contentBlockDelta" in received[-1], "content arrived before the cut"
    with pytest.raises((urllib3.exceptions.ProtocolError, ResponseStreamingError)):
        list(client.invoke_model_with_response_stream(modelId=MODEL, body=ANTHROPIC_BODY)["body"])
    assert {r.error_type for r in emu.requests} == {"stream_cut"}


def test_unknown_mode_and_region_are_rejected(emu):
    with pytest.raises(ValueError):
        emu.set_mode("us-east-1", "explode")
    with pytest.raises(ValueError):
        emu.set_mode("mars-north-1", "throttle")


# ------------------------------------------------------------------------------------------------
# Held streams


def test_held_stream_delivers_first_text_before_release(emu):
    client = bedrock(emu)
    with emu.hold_streams("us-east-1") as hold:
        events = iter(client.converse_stream(modelId=MODEL, messages=MESSAGES)["stream"])
        assert "messageStart" in next(events)
        assert next(events)["contentBlockDelta"]["delta"]["text"] == "Hello"
        assert hold.wait_until_held(1)
        assert emu.requests[0].status == 200
        hold.release()
        rest = list(events)
    assert "metadata" in rest[-1]
    text = "Hello" + "".join(e["contentBlockDelta"]["delta"]["text"] for e in rest if "contentBlockDelta" in e)
    assert text == "Hello from us-east-1"


def test_held_invoke_stream_and_other_regions_not_held(emu):
    hold = emu.hold_streams("us-east-1")
    # A stream in another region runs to the end while the hold is active.
    assert "metadata" in list(bedrock(emu, "eu-west-1").converse_stream(modelId=MODEL, messages=MESSAGES)["stream"])[-1]
    chunks = iter(bedrock(emu).invoke_model_with_response_stream(modelId=MODEL, body=ANTHROPIC_BODY)["body"])
    first_three = [json.loads(next(chunks)["chunk"]["bytes"])["type"] for _ in range(3)]
    assert first_three == ["message_start", "content_block_start", "content_block_delta"]
    assert hold.wait_until_held(1)
    emu.release_all()
    assert json.loads(list(chunks)[-1]["chunk"]["bytes"])["type"] == "message_stop"
    assert hold.released


# ------------------------------------------------------------------------------------------------
# Quotas


def test_requests_per_minute_quota(emu):
    emu.set_quota("us-east-1", rpm=2)
    client = bedrock(emu)
    client.converse(modelId=MODEL, messages=MESSAGES)
    client.converse(modelId=MODEL, messages=MESSAGES)
    with pytest.raises(client.exceptions.ThrottlingException, match="Too many requests, please wait before trying again."):
        client.converse(modelId=MODEL, messages=MESSAGES)
    bedrock(emu, "us-west-2").converse(modelId=MODEL, messages=MESSAGES)


def test_tokens_per_minute_quota_reserves_max_tokens_and_settles(emu):
    emu.set_quota("us-east-1", tpm=1500)
    client = bedrock(emu)
    big = {"maxTokens": 2000}
    with pytest.raises(client.exceptions.ThrottlingException, match="Too many tokens, please wait before trying again."):
        client.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig=big)
    small = {"maxTokens": 1000}
    # Settled at completion to real usage, so sequential calls fit...
    client.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig=small)
    client.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig=small)
    # ...but while a stream holds its reservation, a second one does not.
    with emu.hold_streams("us-east-1") as hold:
        events = iter(client.converse_stream(modelId=MODEL, messages=MESSAGES, inferenceConfig=small)["stream"])
        next(events)
        assert hold.wait_until_held(1)
        with pytest.raises(client.exceptions.ThrottlingException, match="Too many tokens"):
            bedrock(emu).converse(modelId=MODEL, messages=MESSAGES, inferenceConfig=small)
    list(events)
    client.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig=small)


def test_sliding_window_quota_with_explicit_clock():
    quota = SlidingWindowQuota(rpm=2, tpm=100, window_s=60)
    first = quota.admit(0.0, 40)
    assert quota.admit(10.0, 40) is not None
    assert quota.admit(20.0, 1) == "requests"
    assert quota.admit(60.5, 70) == "tokens", "the first request left the window, the second still counts"
    quota.settle(first, 5)  # settling an expired charge changes nothing in the window
    assert quota.tokens_in_window == 40
    assert quota.admit(70.5, 70) is not None
    assert quota.requests_in_window == 1


def test_reservations_follow_each_model_family():
    assert reserved_tokens({"messages": [{"role": "user", "content": "abcd" * 10}], "max_tokens": 50}) == 60
    assert reserved_tokens({"inputText": "abcd", "textGenerationConfig": {"maxTokenCount": 7}}) == 8
    assert reserved_tokens({"prompt": "abcd"}) == 1 + 1000


# ------------------------------------------------------------------------------------------------
# Other operations and routing


def test_guardrail_and_async_invocations_are_region_bound(emu):
    client = bedrock(emu)
    guard = client.apply_guardrail(
        guardrailIdentifier="abc123", guardrailVersion="1", source="INPUT", content=[{"text": {"text": "hi"}}]
    )
    assert guard["action"] == "NONE" and guard["outputs"] == [] and guard["assessments"] == []
    arn = client.start_async_invoke(
        modelId="amazon.nova-reel-v1:0",
        modelInput={"taskType": "TEXT_VIDEO"},
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": "s3://bucket/out"}},
    )["invocationArn"]
    assert arn.startswith("arn:aws:bedrock:us-east-1:123456789012:async-invoke/")
    assert client.get_async_invoke(invocationArn=arn)["invocationArn"] == arn
    assert [s["invocationArn"] for s in client.list_async_invokes()["asyncInvokeSummaries"]] == [arn]
    other = bedrock(emu, "us-west-2")
    with pytest.raises(other.exceptions.ResourceNotFoundException):
        other.get_async_invoke(invocationArn=arn)
    assert other.list_async_invokes()["asyncInvokeSummaries"] == []


def test_unknown_path_non_json_and_bidirectional(emu, pool):
    unknown = send_signed(emu, pool, "GET", "/model/amazon.nova-lite-v1%3A0/teleport")
    assert unknown.status == 404
    assert unknown.headers["x-amzn-ErrorType"].startswith("UnknownOperationException")

    not_json = send_signed(emu, pool, "POST", "/model/amazon.nova-lite-v1%3A0/invoke", b"not json")
    assert not_json.status == 400
    assert not_json.headers["x-amzn-ErrorType"].startswith("ValidationException")

    bidi = send_signed(emu, pool, "POST", "/model/amazon.nova-sonic-v1%3A0/invoke-with-bidirectional-stream", b"{}")
    assert bidi.status == 400
    assert "HTTP/2" in response_json(bidi)["message"]
    assert [r.operation for r in emu.requests] == [None, "InvokeModel", "InvokeModelWithBidirectionalStream"]


# ------------------------------------------------------------------------------------------------
# Control API and command line


def control(pool, emu, method, action, payload=None, region="us-east-1"):
    body = json.dumps(payload).encode() if payload is not None else None
    response = pool.request(method, f"{emu.endpoint_url(region)}/_emulator/{action}", body=body)
    return response.status, json.loads(response.data)


def test_control_api(emu, pool):
    assert control(pool, emu, "GET", "health")[1]["region"] == "us-east-1"
    assert control(pool, emu, "POST", "mode", {"mode": "throttle", "model": None, "count": 1}) == (200, {"ok": True})
    client = bedrock(emu)
    with pytest.raises(client.exceptions.ThrottlingException):
        client.converse(modelId=MODEL, messages=MESSAGES)
    client.converse(modelId=MODEL, messages=MESSAGES)
    control(pool, emu, "POST", "quota", {"rpm": 1, "window_s": 60}, region="us-west-2")
    west = bedrock(emu, "us-west-2")
    west.converse(modelId=MODEL, messages=MESSAGES)
    with pytest.raises(west.exceptions.ThrottlingException):
        west.converse(modelId=MODEL, messages=MESSAGES)
    status, summary = control(pool, emu, "GET", "requests")
    assert status == 200 and summary["total"] == 4
    assert [r["status"] for r in summary["requests"]] == [429, 200, 200, 429]
    assert "body" not in summary["requests"][0]
    assert control(pool, emu, "GET", "requests?since=3")[1]["requests"][0]["region"] == "us-west-2"
    assert control(pool, emu, "POST", "mode", {"mode": "nonsense"})[0] == 400
    assert control(pool, emu, "POST", "reset", {}) == (200, {"ok": True})
    assert emu.requests == []
    west.converse(modelId=MODEL, messages=MESSAGES)  # the quota is gone


def test_control_api_hold_and_release(emu, pool):
    hold_id = control(pool, emu, "POST", "hold", {})[1]["hold_id"]
    events = iter(bedrock(emu).converse_stream(modelId=MODEL, messages=MESSAGES)["stream"])
    next(events)
    assert control(pool, emu, "POST", "release", {"hold_id": hold_id}) == (200, {"ok": True})
    assert "metadata" in list(events)[-1]


def test_command_line_emulator(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "bedrock_balancer.emulator.cli", "--regions", "us-east-1,eu-west-1",
         "--tls", "--cert-dir", str(tmp_path), "--fast"],
        stdout=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
    )
    try:
        lines = [process.stdout.readline().strip() for _ in range(4)]
        urls = dict(line.split(" ", 1) for line in lines[:2])
        assert set(urls) == {"us-east-1", "eu-west-1"}
        assert lines[2] == f"CA {tmp_path / 'emulator-ca.pem'}"
        assert DEMO_ACCESS_KEY_ID in lines[3]
        client = boto3.client(
            "bedrock-runtime",
            region_name="eu-west-1",
            endpoint_url=urls["eu-west-1"],
            verify=str(tmp_path / "emulator-ca.pem"),
            aws_access_key_id=DEMO_ACCESS_KEY_ID,
            aws_secret_access_key=DEMO_SECRET_ACCESS_KEY,
            config=NO_RETRIES,
        )
        response = client.converse(modelId=MODEL, messages=MESSAGES)
        assert response["output"]["message"]["content"][0]["text"] == "Hello from eu-west-1"
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
        process.stdout.close()


def test_certificates_are_cached_in_cert_dir(tmp_path):
    with Emulator(regions=["us-east-1"], cert_dir=str(tmp_path), fast=True) as first:
        ca = Path(first.ca_path).read_bytes()
    with Emulator(regions=["us-east-1"], cert_dir=str(tmp_path), fast=True) as second:
        assert Path(second.ca_path).read_bytes() == ca


def test_stream_default_pacing_still_streams(tmp_path):
    """Without fast=True events are paced (a few ms each) but the content is the same."""
    with Emulator(regions=["us-east-1"], credentials={AKID: SECRET}, cert_dir=str(tmp_path)) as paced:
        assert paced.event_delay_s > 0
        client = bedrock(paced)
        events = list(client.converse_stream(modelId=MODEL, messages=MESSAGES)["stream"])
        assert "metadata" in events[-1]


def test_invoke_stream_chunks_are_base64_json_on_the_wire(emu, pool):
    response = send_signed(
        emu, pool, "POST", "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/invoke-with-response-stream",
        ANTHROPIC_BODY.encode(), {"Content-Type": "application/json"},
    )
    assert response.headers["Transfer-Encoding"] == "chunked"
    frames = decode_frames(response.data)
    assert {frame.event_type for frame in frames} == {"chunk"}
    payloads = [json.loads(frame.payload) for frame in frames]
    assert all(set(payload) == {"bytes", "p"} for payload in payloads)
    types = [json.loads(base64.b64decode(payload["bytes"]))["type"] for payload in payloads]
    assert types[0] == "message_start" and types[-1] == "message_stop"


def test_record_limit_keeps_the_newest_with_absolute_indexes():
    with Emulator(regions=["us-east-1"], tls=False, credentials={AKID: SECRET}, fast=True, record_limit=2) as small:
        client = boto3.client(
            "bedrock-runtime",
            region_name="us-east-1",
            endpoint_url=small.endpoint_url("us-east-1"),
            aws_access_key_id=AKID,
            aws_secret_access_key=SECRET,
            config=NO_RETRIES,
        )
        for _ in range(3):
            client.count_tokens(modelId=MODEL, input={"converse": {"messages": MESSAGES}})
        assert len(small.requests) == 2
        total, newest = small.requests_since(2)
        assert total == 3 and newest == small.requests[1:]
        assert small.wait_for_requests(3, timeout=0)

"""Classifying requests: operations, model ids, region-bound requests, Bedrock host names."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from bedrock_balancer import classify
from bedrock_balancer.errors import BedrockError

AUTH_WEST = "AWS4-HMAC-SHA256 Credential=AKID/20260101/us-west-2/bedrock/aws4_request, SignedHeaders=host;x-amz-date, Signature=" + "a" * 64


@pytest.mark.parametrize(
    "host, region",
    [
        ("bedrock-runtime.us-east-1.amazonaws.com", "us-east-1"),
        ("bedrock-runtime-fips.us-gov-west-1.amazonaws.com", "us-gov-west-1"),
        ("bedrock-runtime.eu-central-1.api.aws", "eu-central-1"),
        ("bedrock-runtime.cn-north-1.amazonaws.com.cn", "cn-north-1"),
        ("vpce-0abc123-xyz.bedrock-runtime.ap-northeast-1.vpce.amazonaws.com", "ap-northeast-1"),
        ("BEDROCK-RUNTIME.US-WEST-2.AMAZONAWS.COM", "us-west-2"),
        ("bedrock-runtime.us-east-1.amazonaws.com.example.net", None),
        ("evil-bedrock-runtime.us-east-1.amazonaws.com", None),
        ("bedrock.us-east-1.amazonaws.com", None),  # the control plane is not ours
        ("s3.amazonaws.com", None),
        ("example.com", None),
    ],
)
def test_bedrock_hosts_are_recognised(host, region):
    assert classify.host_region(host) == region


def test_allow_hosts_pattern_matches_host_and_port_only_for_bedrock():
    import re

    pattern = re.compile(classify.BEDROCK_HOST_PATTERN, re.I)
    assert pattern.search("bedrock-runtime.us-east-1.amazonaws.com:443")
    assert not pattern.search("bedrock-runtime.us-east-1.amazonaws.com.evil.com:443")
    assert not pattern.search("example.com:443")


@pytest.mark.parametrize(
    "path, operation",
    [
        ("/model/anthropic.claude-v2%3A1/invoke", classify.INVOKE),
        ("/model/anthropic.claude-v2%3A1/invoke-with-response-stream", classify.INVOKE_STREAM),
        ("/model/anthropic.claude-v2%3A1/converse", classify.CONVERSE),
        ("/model/anthropic.claude-v2%3A1/converse-stream", classify.CONVERSE_STREAM),
        ("/model/anthropic.claude-v2%3A1/count-tokens", classify.COUNT_TOKENS),
    ],
)
def test_balanceable_operations(path, operation):
    request = classify.classify("POST", path, "bedrock-runtime.us-east-1.amazonaws.com", None, None)
    assert request.operation == operation
    assert request.model_id == "anthropic.claude-v2:1"
    assert request.raw_model_id == "anthropic.claude-v2%3A1"
    assert request.client_region == "us-east-1"
    assert request.balanceable


@pytest.mark.parametrize(
    "method, path, guardrail, operation",
    [
        ("POST", "/guardrail/gr-1/version/1/apply", None, classify.APPLY_GUARDRAIL),
        ("POST", "/async-invoke", None, classify.START_ASYNC_INVOKE),
        ("GET", "/async-invoke", None, classify.LIST_ASYNC_INVOKES),
        ("GET", "/async-invoke/arn%3Aaws%3Abedrock%3Aus-west-2%3A1%3Aasync-invoke%2Fx", None, classify.GET_ASYNC_INVOKE),
        ("POST", "/model/arn%3Aaws%3Abedrock%3Aus-west-2%3A123%3Aprovisioned-model%2Fabc/invoke", None, classify.INVOKE),
        ("POST", "/model/arn%3Aaws%3Abedrock%3Aus-west-2%3A123%3Aapplication-inference-profile%2Fabc/converse", None, classify.CONVERSE),
        ("POST", "/model/arn%3Aaws%3Abedrock%3Aus-west-2%3A123%3Acustom-model%2Fabc/converse", None, classify.CONVERSE),
        ("POST", "/model/arn%3Aaws%3Abedrock%3Aus-west-2%3A123%3Aimported-model%2Fabc/invoke", None, classify.INVOKE),
        ("POST", "/model/anthropic.claude-v2%3A1/invoke", "gr-1", classify.INVOKE),
    ],
)
def test_region_bound_requests_keep_the_clients_region(method, path, guardrail, operation):
    request = classify.classify(method, path, "", AUTH_WEST, guardrail)
    assert request.operation == operation
    assert not request.balanceable and request.region_bound_reason
    assert request.client_region == "us-west-2"  # from the credential scope, as in reverse mode


def test_foundation_model_and_system_profile_arns_may_move():
    for arn in (
        "arn%3Aaws%3Abedrock%3Aus-east-1%3A%3Afoundation-model%2Fanthropic.claude-v2",
        "arn%3Aaws%3Abedrock%3Aus-east-1%3A123%3Ainference-profile%2Fus.anthropic.claude-v2",
    ):
        assert classify.classify("POST", f"/model/{arn}/converse", "", None, None).balanceable


def test_host_region_wins_over_scope_and_fallback_is_last():
    assert classify.classify("POST", "/model/m/converse", "bedrock-runtime.eu-west-1.amazonaws.com", AUTH_WEST, None).client_region == "eu-west-1"
    assert classify.classify("POST", "/model/m/converse", "", None, None, fallback_region="ap-south-1").client_region == "ap-south-1"


@pytest.mark.parametrize(
    "method, path, error_type",
    [
        ("POST", "/model/m/invoke-with-bidirectional-stream", "ValidationException"),
        ("GET", "/model/m/converse", "UnknownOperationException"),
        ("POST", "/model/m/delete", "UnknownOperationException"),
        ("POST", "/admin", "UnknownOperationException"),
        ("DELETE", "/async-invoke/x", "UnknownOperationException"),
        ("POST", "/model/..%2F..%2Fetc/converse", "ValidationException"),
        ("POST", "/model/a%0Ab/converse", "ValidationException"),
        ("POST", "/model/a%20b/converse", "ValidationException"),
        ("POST", "/model/%FF%FE/converse", "ValidationException"),
    ],
)
def test_requests_the_proxy_refuses(method, path, error_type):
    with pytest.raises(BedrockError) as caught:
        classify.classify(method, path, "bedrock-runtime.us-east-1.amazonaws.com", None, None)
    assert caught.value.error_type == error_type


@given(st.sampled_from(["GET", "POST", "PUT"]), st.text(max_size=120))
def test_classify_answers_or_refuses_in_bedrock_terms_for_any_path(method, path):
    try:
        request = classify.classify(method, "/" + path, "bedrock-runtime.us-east-1.amazonaws.com", None, None)
    except BedrockError as e:
        assert e.status in (400, 404)
    else:
        assert request.operation
        if request.model_id is not None:
            assert all(c.isprintable() and c not in " %" for c in request.model_id)


def test_converse_with_a_guardrail_in_the_body_is_region_bound():
    body = b'{"messages": [], "guardrailConfig": {"guardrailIdentifier": "gr-1", "guardrailVersion": "1"}}'
    request = classify.classify("POST", "/model/m/converse", "bedrock-runtime.us-west-2.amazonaws.com", None, None, body=body)
    assert not request.balanceable and "guardrail" in request.region_bound_reason
    assert classify.classify("POST", "/model/m/converse", "", None, None, body=b'{"messages": []}').balanceable

"""End to end: unmodified boto3 clients -> the real proxy -> the emulated Bedrock regions over TLS."""

from __future__ import annotations

import gc
from collections import Counter

import pytest
from botocore.exceptions import ClientError, EventStreamError

from proxyharness import CLIENT_KEY, PROXY_KEY, targets_for

CLAUDE = "anthropic.claude-3-5-sonnet-20240620-v1:0"
MESSAGES = [{"role": "user", "content": [{"text": "Which region are you in?"}]}]
INVOKE_BODY = b'{"anthropic_version":"bedrock-2023-05-31","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}'


def served_region(response) -> str:
    return response["ResponseMetadata"]["HTTPHeaders"]["x-bedrock-balancer-region"]


def call_every_operation(client) -> dict[str, str]:
    """Call the five balanceable operations; return the region that served each."""
    served = {}
    r = client.converse(modelId=CLAUDE, messages=MESSAGES)
    assert "Hello from" in r["output"]["message"]["content"][0]["text"]
    served["converse"] = served_region(r)

    r = client.invoke_model(modelId=CLAUDE, body=INVOKE_BODY, contentType="application/json")
    assert b"Hello from" in r["body"].read()
    served["invoke"] = served_region(r)

    r = client.converse_stream(modelId=CLAUDE, messages=MESSAGES)
    events = list(r["stream"])
    assert any("contentBlockDelta" in e for e in events) and "metadata" in events[-1]
    served["converse-stream"] = served_region(r)

    r = client.invoke_model_with_response_stream(modelId=CLAUDE, body=INVOKE_BODY, contentType="application/json")
    chunks = [e["chunk"]["bytes"] for e in r["body"]]
    assert chunks and b"message_stop" in chunks[-1]
    served["invoke-with-response-stream"] = served_region(r)

    r = client.count_tokens(modelId=CLAUDE, input={"converse": {"messages": MESSAGES}})
    assert r["inputTokens"] > 0
    served["count-tokens"] = served_region(r)
    return served


def assert_only_proxy_credentials_went_upstream(emu):
    assert emu.requests, "nothing reached the emulator"
    for recorded in emu.requests:
        assert recorded.auth_ok, f"emulator rejected the proxy's signature: {recorded.error_type}"
        assert recorded.access_key_id == PROXY_KEY
        assert all(CLIENT_KEY not in value for _, value in recorded.headers)


def test_regular_mode_all_operations_spread_over_targets_with_valid_signatures(emu, proxy_factory, client_via_proxy):
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1", "us-west-2"])})
    client = client_via_proxy(proxy, "us-east-1")

    served = call_every_operation(client) | {f"{k}#2": v for k, v in call_every_operation(client).items()}

    assert Counter(served.values()) == {"us-east-1": 5, "us-west-2": 5}
    assert Counter(r.region for r in emu.requests) == {"us-east-1": 5, "us-west-2": 5}
    assert_only_proxy_credentials_went_upstream(emu)


def test_reverse_mode_with_endpoint_url(emu, proxy_factory, client_via_endpoint):
    proxy = proxy_factory(
        {"targets": targets_for(emu, ["us-east-1", "us-west-2"])},
        mode="reverse:https://bedrock-runtime.us-east-1.amazonaws.com",
    )
    client = client_via_endpoint(proxy, "us-east-1")

    served = call_every_operation(client)

    assert set(served.values()) == {"us-east-1", "us-west-2"}
    assert_only_proxy_credentials_went_upstream(emu)


def test_the_start_up_heap_is_left_out_of_garbage_collections(emu, proxy_factory, client_via_proxy):
    # mitmproxy makes cyclic garbage on every request; a full collection that also walked everything
    # start-up built (botocore's models among it) stopped the proxy for about 50 ms (scripts/bench).
    gc.unfreeze()
    try:
        proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])})
        assert gc.get_freeze_count() > 10_000
        assert served_region(client_via_proxy(proxy).converse(modelId=CLAUDE, messages=MESSAGES)) == "us-east-1"
    finally:
        gc.unfreeze()


def test_weighted_round_robin_follows_weights(emu, proxy_factory, client_via_proxy):
    targets = targets_for(emu, ["us-east-1", "us-west-2"], **{"us-west-2": {"weight": 3}})
    client = client_via_proxy(proxy_factory({"targets": targets}))

    regions = Counter(served_region(client.converse(modelId=CLAUDE, messages=MESSAGES)) for _ in range(8))

    assert regions == {"us-east-1": 2, "us-west-2": 6}


def test_least_outstanding_sends_to_the_idle_target(emu, proxy_factory, client_via_proxy):
    proxy = proxy_factory({"strategy": "least-outstanding", "targets": targets_for(emu, ["us-east-1", "us-west-2"])})
    client = client_via_proxy(proxy)
    held = emu.hold_streams()
    first = client.converse_stream(modelId=CLAUDE, messages=MESSAGES)
    busy_region = served_region(first)
    next(iter(first["stream"]))  # the held stream is now in flight at busy_region

    regions = {served_region(client.converse(modelId=CLAUDE, messages=MESSAGES)) for _ in range(3)}

    held.release()
    list(first["stream"])
    assert regions == {"us-east-1", "us-west-2"} - {busy_region}


def test_stream_events_reach_the_client_while_the_upstream_is_still_sending(emu, proxy_factory, client_via_proxy):
    client = client_via_proxy(proxy_factory({"targets": targets_for(emu, ["us-west-2"])}))
    held = emu.hold_streams()
    try:
        response = client.converse_stream(modelId=CLAUDE, messages=MESSAGES)
        stream = iter(response["stream"])
        received_while_held = []
        for event in stream:  # the emulator sends the rest only after release(), so these came first
            received_while_held.append(event)
            if "contentBlockDelta" in event:
                break
        assert "messageStart" in received_while_held[0]
        assert not held.released
    finally:
        held.release()
    rest = list(stream)
    assert "messageStop" in rest[-2] and "metadata" in rest[-1]


def test_streamed_answers_carry_the_upstreams_headers_not_the_relays(emu, proxy_factory, client_via_proxy):
    # Streams come to mitmproxy through the relay's loopback server (aiohttp); none of its own headers
    # may reach the client. A stream, and a streaming request that ends in an error, both come that way.
    client = client_via_proxy(proxy_factory({"targets": targets_for(emu, ["us-west-2"]), "retry": {"max_attempts": 1}}))
    streamed = client.converse_stream(modelId=CLAUDE, messages=MESSAGES)
    list(streamed["stream"])
    emu.set_mode("us-west-2", "fail")
    with pytest.raises(ClientError) as failed:
        client.converse_stream(modelId=CLAUDE, messages=MESSAGES)

    for headers in (streamed["ResponseMetadata"]["HTTPHeaders"], failed.value.response["ResponseMetadata"]["HTTPHeaders"]):
        assert headers["x-bedrock-balancer-region"] == "us-west-2"
        assert "server" not in headers  # the emulator, like Bedrock, sends none
        assert not [value for value in headers.values() if "aiohttp" in value.lower()]
        assert "x-bedrock-balancer-provisional" not in headers  # the relay's provisional head stays in the proxy
    assert failed.value.response["Error"]["Code"] == "ServiceUnavailableException"
    assert failed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503


def test_mitmproxys_request_editors_run_before_the_balancer_sends_the_request(emu, proxy_factory, client_via_proxy):
    # modify_body (like map_remote and map_local) must edit a request before the balancer sends it on; the
    # balancer runs just ahead of mitmproxy's save, not where -s scripts run, for that.
    proxy = proxy_factory({"targets": targets_for(emu, ["us-west-2"])}, modify_body=["/~q/MARKERXYZ/edited-by-modify-body"])
    client = client_via_proxy(proxy)
    marked = [{"role": "user", "content": [{"text": "MARKERXYZ"}]}]

    client.converse(modelId=CLAUDE, messages=marked)
    list(client.converse_stream(modelId=CLAUDE, messages=marked)["stream"])

    assert [(b"edited-by-modify-body" in r.body, b"MARKERXYZ" in r.body) for r in emu.requests] == [(True, False)] * 2
    assert all(r.auth_ok for r in emu.requests)  # signed as edited


def test_a_streaming_request_of_several_megabytes_streams(emu, proxy_factory, client_via_proxy):
    # An image or a document makes a body of several MB; streams pass through the relay's loopback server.
    client = client_via_proxy(proxy_factory({"targets": targets_for(emu, ["us-west-2"])}))
    document = [{"role": "user", "content": [{"text": "words " * 500_000}]}]  # 3 MB

    response = client.converse_stream(modelId=CLAUDE, messages=document)

    events = list(response["stream"])
    assert "contentBlockDelta" in events[1] and "metadata" in events[-1]
    assert served_region(response) == "us-west-2"


def test_invoke_stream_chunks_arrive_while_the_upstream_is_still_sending(emu, proxy_factory, client_via_endpoint):
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])}, mode="reverse:https://bedrock-runtime.us-east-1.amazonaws.com")
    client = client_via_endpoint(proxy)
    held = emu.hold_streams()
    try:
        response = client.invoke_model_with_response_stream(modelId=CLAUDE, body=INVOKE_BODY)
        first = next(iter(response["body"]))
        assert b"message_start" in first["chunk"]["bytes"]
        assert not held.released
    finally:
        held.release()


def test_region_bound_requests_stay_in_the_clients_region(emu, proxy_factory, client_via_proxy):
    client = client_via_proxy(proxy_factory({"targets": targets_for(emu, ["us-east-1", "us-west-2"])}), "us-west-2")
    app_profile = "arn:aws:bedrock:us-west-2:123456789012:application-inference-profile/abc123"

    regions = [served_region(client.apply_guardrail(
        guardrailIdentifier="gr-1", guardrailVersion="1", source="INPUT", content=[{"text": {"text": "hello"}}]
    )) for _ in range(3)]
    regions += [served_region(client.converse(modelId=app_profile, messages=MESSAGES)) for _ in range(3)]
    regions += [served_region(client.converse(
        modelId=CLAUDE, messages=MESSAGES, guardrailConfig={"guardrailIdentifier": "gr-1", "guardrailVersion": "1"}
    )) for _ in range(1)]
    regions += [served_region(client.invoke_model(
        modelId=CLAUDE, body=INVOKE_BODY, guardrailIdentifier="gr-1", guardrailVersion="1"
    )) for _ in range(3)]
    arn = client.start_async_invoke(
        modelId=CLAUDE, modelInput={"prompt": "hi"}, outputDataConfig={"s3OutputDataConfig": {"s3Uri": "s3://b/k"}}
    )["invocationArn"]
    assert client.get_async_invoke(invocationArn=arn)["invocationArn"] == arn

    assert set(regions) == {"us-west-2"}
    assert {r.region for r in emu.requests} == {"us-west-2"}
    assert_only_proxy_credentials_went_upstream(emu)


def test_inference_profiles_only_reach_their_geography(emu, proxy_factory, client_via_proxy):
    client = client_via_proxy(proxy_factory({"targets": targets_for(emu, ["us-east-1", "us-west-2", "eu-west-1"])}))

    us = {served_region(client.converse(modelId="us." + CLAUDE, messages=MESSAGES)) for _ in range(4)}
    eu = {served_region(client.converse(modelId="eu." + CLAUDE, messages=MESSAGES)) for _ in range(3)}
    plain = {served_region(client.converse(modelId=CLAUDE, messages=MESSAGES)) for _ in range(3)}

    assert us == {"us-east-1", "us-west-2"}
    assert eu == {"eu-west-1"}
    assert plain == {"us-east-1", "us-west-2", "eu-west-1"}


def test_crossing_geographies_rewrites_the_profile_when_allowed(emu, proxy_factory, client_via_proxy):
    proxy = proxy_factory({"cross_geography": True, "targets": targets_for(emu, ["eu-west-1"])})
    client = client_via_proxy(proxy)

    response = client.converse(modelId="us." + CLAUDE, messages=MESSAGES)

    assert served_region(response) == "eu-west-1"
    assert emu.requests[-1].model_id == "eu." + CLAUDE
    record = proxy.access_records()[-1]
    assert record["model"] == "eu." + CLAUDE and record["client_model"] == "us." + CLAUDE


def test_foundation_model_arn_region_is_rewritten(emu, proxy_factory, client_via_proxy):
    client = client_via_proxy(proxy_factory({"targets": targets_for(emu, ["us-west-2"])}))

    response = client.converse(modelId=f"arn:aws:bedrock:us-east-1::foundation-model/{CLAUDE}", messages=MESSAGES)

    assert served_region(response) == "us-west-2"
    assert emu.requests[-1].model_id == f"arn:aws:bedrock:us-west-2::foundation-model/{CLAUDE}"


def test_no_eligible_target_is_a_validation_exception(emu, proxy_factory, client_via_proxy):
    client = client_via_proxy(proxy_factory({"targets": targets_for(emu, ["us-east-1"])}))

    with pytest.raises(client.exceptions.ValidationException, match="no configured target"):
        client.converse(modelId="eu." + CLAUDE, messages=MESSAGES)
    assert emu.requests == []


def test_a_request_to_a_fips_endpoint_is_not_sent_to_a_plain_one(emu, proxy_factory, client_via_proxy):
    from botocore.config import Config

    client = client_via_proxy(proxy_factory({"targets": targets_for(emu, ["us-east-1"])}),
                              config=Config(use_fips_endpoint=True, retries={"total_max_attempts": 1}))

    with pytest.raises(client.exceptions.ValidationException, match="sent to a FIPS endpoint, and no configured target is one"):
        client.converse(modelId=CLAUDE, messages=MESSAGES)
    assert emu.requests == []


def test_models_allow_list_restricts_targets(emu, proxy_factory, client_via_proxy):
    targets = targets_for(emu, ["us-east-1", "us-west-2"], **{"us-west-2": {"models": ["amazon.*"]}})
    client = client_via_proxy(proxy_factory({"targets": targets}))

    claude = {served_region(client.converse(modelId=CLAUDE, messages=MESSAGES)) for _ in range(4)}
    nova = {served_region(client.converse(modelId="amazon.nova-lite-v1:0", messages=MESSAGES)) for _ in range(4)}

    assert claude == {"us-east-1"}
    assert nova == {"us-east-1", "us-west-2"}


def test_bidirectional_stream_is_refused_with_a_clear_error(emu, proxy_factory, client_via_proxy):
    import urllib3

    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])})
    url = f"https://bedrock-runtime.us-east-1.amazonaws.com/model/{CLAUDE.replace(':', '%3A')}/invoke-with-bidirectional-stream"
    http = urllib3.ProxyManager(proxy.url, ca_certs=proxy.ca_cert)

    response = http.request("POST", url, body=b"{}")

    assert response.status == 400
    assert response.headers["x-amzn-ErrorType"] == "ValidationException"
    assert b"InvokeModelWithBidirectionalStream" in response.data
    assert emu.requests == []


def test_unreachable_target_is_a_service_unavailable_exception(emu, proxy_factory, client_via_proxy):
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = f"https://localhost:{s.getsockname()[1]}"
    proxy = proxy_factory({
        "retry": {"max_attempts": 2, "cooldown_base_s": 0.05},
        "targets": [{"region": "us-east-1", "endpoint_url": dead, "profile": "proxy"}],
    })
    client = client_via_proxy(proxy)

    with pytest.raises(client.exceptions.ServiceUnavailableException, match="no target answered after 2 attempts"):
        client.converse(modelId=CLAUDE, messages=MESSAGES)
    record = proxy.access_records()[-1]
    assert record["status"] == 503
    assert [a["error"].split(":")[0] for a in record["attempts"]] == ["UpstreamConnectError"] * 2
    assert "cannot connect to localhost" in record["attempts"][0]["error"]


def test_an_internal_error_is_answered_and_logged_never_forwarded(emu, proxy_factory, client_via_proxy, monkeypatch):
    from bedrock_balancer import classify

    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])})
    client = client_via_proxy(proxy)

    def a_bug(*args):
        raise RuntimeError("a bug in the classification")

    monkeypatch.setattr(classify, "with_body", a_bug)
    with pytest.raises(client.exceptions.InternalServerException, match="internal error"):
        client.converse(modelId=CLAUDE, messages=MESSAGES)

    assert emu.requests == []
    record = proxy.wait_for_records(1)[-1]
    assert record["status"] == 500 and "internal error" in record["error"]


@pytest.mark.parametrize("after_content", [False, True])
def test_an_internal_error_in_a_stream_is_answered_never_the_provisional_head(emu, proxy_factory, client_via_proxy, monkeypatch, after_content):
    from bedrock_balancer import relay, usage

    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])})
    client = client_via_proxy(proxy)
    if after_content:  # the head has been decided and content sent: the stream ends with an error event
        feed = usage.StreamMeter.feed

        def a_bug(meter, data):
            if meter.content_seen:
                raise RuntimeError("a bug in the relay")
            feed(meter, data)

        monkeypatch.setattr(usage.StreamMeter, "feed", a_bug)
        response = client.converse_stream(modelId=CLAUDE, messages=MESSAGES)
        with pytest.raises(EventStreamError, match="internal error"):
            list(response["stream"])
        assert "x-bedrock-balancer-provisional" not in response["ResponseMetadata"]["HTTPHeaders"]
        assert proxy.wait_for_records(1)[-1]["stream"] == "truncated"
        return

    async def a_bug(*args):
        raise RuntimeError("a bug in the relay")

    monkeypatch.setattr(relay.Relay, "_attempt", a_bug)
    with pytest.raises(client.exceptions.InternalServerException, match="internal error") as raised:
        client.converse_stream(modelId=CLAUDE, messages=MESSAGES)
    assert "x-bedrock-balancer-provisional" not in raised.value.response["ResponseMetadata"]["HTTPHeaders"]
    record = proxy.wait_for_records(1)[-1]
    assert record["status"] == 500 and "internal error" in record["error"]


def test_a_streaming_requests_error_is_kept_in_the_flow_without_a_stream_copy(emu, proxy_factory, client_via_proxy):
    from mitmproxy import http as mhttp

    kept = []

    class Recorder:
        def response(self, flow: mhttp.HTTPFlow) -> None:
            kept.append((flow.response.status_code, flow.response.content))

    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"]), "retry": {"max_attempts": 1}}, bedrock_stream_copy=0)
    proxy.master.addons.add(Recorder())
    client = client_via_proxy(proxy)
    emu.set_mode("us-east-1", "throttle")

    with pytest.raises(client.exceptions.ThrottlingException):
        client.converse_stream(modelId=CLAUDE, messages=MESSAGES)

    (status, body), = kept
    assert status == 429 and b"message" in body  # mitmweb and saved flows show the error, as for any answer


def test_client_errors_from_upstream_reach_the_client_unchanged(emu, proxy_factory, client_via_proxy):
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1", "us-west-2"])})
    client = client_via_proxy(proxy)

    with pytest.raises(client.exceptions.ValidationException) as raised:
        client.converse(modelId="madeup.model-v1", messages=MESSAGES)

    assert "x-bedrock-balancer-error" not in raised.value.response["ResponseMetadata"]["HTTPHeaders"]
    assert len(emu.requests) == 1  # a client error is not retried elsewhere
    assert [a["status"] for a in proxy.access_records()[-1]["attempts"]] == [400]


def test_access_log_names_the_region_for_every_request(emu, proxy_factory, client_via_proxy):
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1", "us-west-2"])})
    client = client_via_proxy(proxy, "us-east-1")
    client.converse(modelId=CLAUDE, messages=MESSAGES)
    list(client.converse_stream(modelId=CLAUDE, messages=MESSAGES)["stream"])
    client.invoke_model(modelId=CLAUDE, body=INVOKE_BODY)
    with pytest.raises(client.exceptions.ValidationException):
        client.converse(modelId="eu." + CLAUDE, messages=MESSAGES)

    records = proxy.access_records()

    assert [r["operation"] for r in records] == ["Converse", "ConverseStream", "InvokeModel", "Converse"]
    for record in records:
        assert {"ts", "client_region", "region", "operation", "model", "status", "latency_ms", "attempts", "input_tokens", "output_tokens"} <= record.keys()
        assert record["client_region"] == "us-east-1"
    assert [r["region"] for r in records[:3]] == ["us-east-1", "us-west-2", "us-east-1"]
    assert all(r["status"] == 200 and r["input_tokens"] > 0 and r["output_tokens"] > 0 for r in records[:3])
    assert records[0]["attempts"][0]["region"] == "us-east-1" and records[0]["attempts"][0]["status"] == 200
    assert records[3]["status"] == 400 and records[3]["region"] is None and "no configured target" in records[3]["error"]
    text = proxy.access_log.read_text()
    assert PROXY_KEY not in text and CLIENT_KEY not in text and "Signature=" not in text


def test_flows_show_the_chosen_region_for_mitmweb(emu, proxy_factory, client_via_proxy):
    from mitmproxy import http as mhttp

    shown = []

    class Recorder:
        def response(self, flow: mhttp.HTTPFlow) -> None:
            shown.append((flow.comment, flow.marked, flow.request.pretty_url, flow.request.headers.get("authorization", "")))

    proxy = proxy_factory({"retry": {"max_attempts": 2, "cooldown_base_s": 0.01}, "targets": targets_for(emu, ["us-west-2"])})
    proxy.master.addons.add(Recorder())
    client = client_via_proxy(proxy, "us-east-1")
    client.converse(modelId=CLAUDE, messages=MESSAGES)
    emu.set_mode("us-west-2", "fail")
    with pytest.raises(client.exceptions.ServiceUnavailableException):
        client.converse(modelId=CLAUDE, messages=MESSAGES)

    (ok_comment, ok_marked, ok_url, ok_auth), (bad_comment, bad_marked, _, _) = shown
    assert ok_comment == "us-east-1 → us-west-2" and not ok_marked
    assert ok_url.startswith(emu.endpoint_url("us-west-2") + "/model/")
    assert "/us-west-2/bedrock/aws4_request" in ok_auth and ok_auth.endswith("Signature=<redacted>")
    assert bad_marked and "us-west-2" in bad_comment

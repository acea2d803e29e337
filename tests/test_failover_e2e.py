"""Never surface a throttle: failover, cooldowns, stream errors and quotas, through the real proxy."""

from __future__ import annotations

import concurrent.futures
from collections import Counter

import pytest
from botocore.exceptions import EventStreamError, ReadTimeoutError

from proxyharness import run_in_proxy, targets_for, wait_for

CLAUDE = "anthropic.claude-3-5-sonnet-20240620-v1:0"
MESSAGES = [{"role": "user", "content": [{"text": "Which region are you in?"}]}]
FAST_RETRY = {"max_attempts": 4, "deadline_s": 10, "stall_timeout_s": 1, "cooldown_base_s": 0.05, "cooldown_max_s": 0.2}


def served_region(response) -> str:
    return response["ResponseMetadata"]["HTTPHeaders"]["x-bedrock-balancer-region"]


def attempts_header(response) -> list[tuple[str, str]]:
    header = response["ResponseMetadata"]["HTTPHeaders"]["x-bedrock-balancer-attempts"]
    parts = [dict(kv.split("=") for kv in attempt.split(";")) for attempt in header.split(", ")]
    return [(p["region"], p["status"]) for p in parts]


def two_regions(emu, strategy="round-robin", retry=FAST_RETRY, **extra):
    return {"strategy": strategy, "retry": retry, "targets": targets_for(emu, ["us-east-1", "us-west-2"]), **extra}


@pytest.mark.parametrize("mode, status", [("throttle", "429"), ("not_ready", "429"), ("fail", "503"), ("error500", "500"), ("drop", "0")])
def test_failing_region_is_invisible_to_the_client(emu, proxy_factory, client_via_proxy, mode, status):
    proxy = proxy_factory(two_regions(emu, retry={**FAST_RETRY, "cooldown_base_s": 5, "cooldown_max_s": 10}))
    client = client_via_proxy(proxy)
    emu.set_mode("us-east-1", mode)

    responses = [client.converse(modelId=CLAUDE, messages=MESSAGES) for _ in range(4)]

    assert {served_region(r) for r in responses} == {"us-west-2"}
    # Round-robin tries us-east-1 first once; then it cools down and is not asked again meanwhile.
    assert [attempts_header(r) for r in responses] == [[("us-east-1", status), ("us-west-2", "200")]] + [[("us-west-2", "200")]] * 3
    record = next(r for r in proxy.access_records() if len(r["attempts"]) > 1)
    assert record["status"] == 200 and record["attempts"][0]["region"] == "us-east-1"


def test_timeout_fails_over(emu, proxy_factory, client_via_proxy):
    proxy = proxy_factory(two_regions(emu, timeouts={"read_s": 0.5}))
    client = client_via_proxy(proxy)
    emu.set_mode("us-east-1", "stall")

    regions = [served_region(client.converse(modelId=CLAUDE, messages=MESSAGES)) for _ in range(2)]

    assert regions == ["us-west-2", "us-west-2"]
    assert proxy.wait_for_records(1)[0]["attempts"][0]["error"] == "timed out"


def test_stalled_stream_is_abandoned_and_the_healthy_one_still_streams(emu, proxy_factory, client_via_proxy):
    proxy = proxy_factory(two_regions(emu, retry={**FAST_RETRY, "stall_timeout_s": 0.5}))
    client = client_via_proxy(proxy)
    emu.set_mode("us-east-1", "stall")
    held = emu.hold_streams("us-west-2")
    try:
        response = client.converse_stream(modelId=CLAUDE, messages=MESSAGES)
        stream = iter(response["stream"])
        first_events = [next(stream), next(stream)]  # messageStart, then the first delta: while us-west-2 is held
        assert not held.released
    finally:
        held.release()
    rest = list(stream)

    assert "messageStart" in first_events[0] and "contentBlockDelta" in first_events[1]
    assert "metadata" in rest[-1]
    assert attempts_header(response) == [("us-east-1", "0"), ("us-west-2", "200")]
    assert proxy.wait_for_records(1)[0]["attempts"][0]["error"] == "stalled before its first event"


def test_a_stream_that_begins_then_stalls_is_failed_over(emu, proxy_factory, client_via_proxy):
    # us-east-1 answers 200 and messageStart, then nothing: the client must see us-west-2's answer whole,
    # with us-west-2's headers, and a single messageStart.
    proxy = proxy_factory(two_regions(emu, retry={**FAST_RETRY, "stall_timeout_s": 0.5}))
    client = client_via_proxy(proxy)
    emu.set_mode("us-east-1", "stream_stall")

    response = client.converse_stream(modelId=CLAUDE, messages=MESSAGES)
    events = list(response["stream"])

    assert [name for e in events for name in e if name == "messageStart"] == ["messageStart"]
    assert "contentBlockDelta" in events[1] and "metadata" in events[-1]
    assert served_region(response) == "us-west-2"
    assert response["ResponseMetadata"]["HTTPHeaders"]["x-emulator-region"] == "us-west-2"
    # us-east-1's head said 200, but that attempt brought no answer: it does not read as a success.
    assert attempts_header(response) == [("us-east-1", "0"), ("us-west-2", "200")]
    assert proxy.wait_for_records(1)[0]["attempts"][0]["error"] == "stalled before its first event"


def test_an_invoke_stream_that_opens_then_stalls_is_failed_over(emu, proxy_factory, client_via_proxy):
    # Anthropic models open a streamed InvokeModel answer with message_start and content_block_start
    # chunks; us-east-1 sends those, then nothing. The client must get us-west-2's answer, opened once.
    import json

    proxy = proxy_factory(two_regions(emu, retry={**FAST_RETRY, "stall_timeout_s": 0.5}))
    client = client_via_proxy(proxy)
    emu.set_mode("us-east-1", "stream_stall")
    body = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]})

    response = client.invoke_model_with_response_stream(modelId=CLAUDE, body=body)
    types = [json.loads(event["chunk"]["bytes"])["type"] for event in response["body"]]

    assert types.count("message_start") == 1 and types[-1] == "message_stop" and "content_block_delta" in types
    assert served_region(response) == "us-west-2"
    assert attempts_header(response) == [("us-east-1", "0"), ("us-west-2", "200")]
    assert proxy.wait_for_records(1)[0]["attempts"][0]["error"] == "stalled before its first event"


def test_a_client_that_leaves_before_its_stream_begins_costs_nothing_more(emu, proxy_factory, client_via_proxy):
    from botocore.config import Config

    from mitmproxy import http as mhttp

    answers = []

    class Recorder:
        def error(self, flow: mhttp.HTTPFlow) -> None:
            answers.append(flow.response)

    proxy = proxy_factory(two_regions(emu, retry={**FAST_RETRY, "stall_timeout_s": 30}))
    proxy.master.addons.add(Recorder())
    client = client_via_proxy(proxy, config=Config(retries={"total_max_attempts": 1}, read_timeout=0.5))
    emu.set_mode("us-east-1", "stream_stall")

    with pytest.raises(ReadTimeoutError):  # the app gives up while the proxy waits for the first event
        client.converse_stream(modelId=CLAUDE, messages=MESSAGES)
    (record,) = proxy.wait_for_records(1)
    # The proxy holds the stream's head until its first event: the client watch notices the app leave.
    assert record["region"] == "us-east-1" and "the client went away after 1 attempts" in record["error"]
    assert record["status"] is None and record["stream"] == "client-gone"
    assert answers == [None]  # mitmweb and saved flows show no answer: there was none
    (attempt,) = record["attempts"]
    assert attempt["error"] == "abandoned" and attempt["ms"] >= 400  # the app waited 0.5 s for it

    # The proxy stops working for it at once: nothing in flight, although us-east-1 would stall for 30 s ...
    in_flight = lambda: run_in_proxy(proxy, lambda: sum(proxy.balancer.router.outstanding.values()))  # noqa: E731
    wait_for(lambda: in_flight() == 0, 5, "the proxy to stop waiting upstream for a client that left")
    emu.release_all()
    served = served_region(client_via_proxy(proxy).converse(modelId=CLAUDE, messages=MESSAGES))
    # ... asks no other region on its behalf, and blames none for the lost connection.
    assert [r.region for r in emu.requests] == ["us-east-1", served]
    assert proxy.balancer.router.cooldowns.snapshot() == []


def test_no_region_is_tried_for_a_client_that_has_left(emu, proxy_factory, client_via_proxy, monkeypatch):
    from botocore.config import Config

    from bedrock_balancer import addon

    # An attempt that fails just after its client left, before the client watch looks again.
    monkeypatch.setattr(addon, "CLIENT_WATCH_INTERVAL_S", 60)
    proxy = proxy_factory(two_regions(emu, timeouts={"read_s": 1}))
    client = client_via_proxy(proxy, config=Config(retries={"total_max_attempts": 1}, read_timeout=0.3))
    emu.set_mode("us-east-1", "stall")

    with pytest.raises(ReadTimeoutError):  # the app gives up before us-east-1 times out
        client.converse(modelId=CLAUDE, messages=MESSAGES)
    (record,) = proxy.wait_for_records(1)  # once the proxy is done with it

    assert [r.region for r in emu.requests] == ["us-east-1"]  # us-west-2 was not asked for nobody
    assert "the client went away after 1 attempts" in record["error"]
    assert [a["error"] for a in record["attempts"]] == ["timed out"]


def test_a_client_that_leaves_abandons_the_attempt_in_flight(emu, proxy_factory, client_via_proxy):
    from botocore.config import Config

    # us-east-1 would keep the proxy waiting for 30 s; the app gives up after 0.3 s.
    proxy = proxy_factory(two_regions(emu, timeouts={"read_s": 30}))
    client = client_via_proxy(proxy, config=Config(retries={"total_max_attempts": 1}, read_timeout=0.3))
    emu.set_mode("us-east-1", "stall")

    with pytest.raises(ReadTimeoutError):
        client.converse(modelId=CLAUDE, messages=MESSAGES)
    (record,) = proxy.wait_for_records(1, timeout=10)  # the proxy stopped waiting long before us-east-1's 30 s

    assert record["status"] is None and "the client went away after 1 attempts" in record["error"]
    assert [(a["region"], a["error"]) for a in record["attempts"]] == [("us-east-1", "abandoned")]
    assert run_in_proxy(proxy, lambda: sum(proxy.balancer.router.outstanding.values())) == 0
    emu.release_all()
    # No other region was asked on its behalf, and us-east-1 is not blamed for the client's leaving.
    assert [r.region for r in emu.requests] == ["us-east-1"]
    assert proxy.balancer.router.cooldowns.snapshot() == []


def test_a_client_that_leaves_while_every_region_cools_down_is_not_served_later(emu, proxy_factory, client_via_proxy):
    from botocore.config import Config

    proxy = proxy_factory(two_regions(emu, retry={**FAST_RETRY, "cooldown_base_s": 1.5, "cooldown_max_s": 1.5}))
    client = client_via_proxy(proxy, config=Config(retries={"total_max_attempts": 1}, read_timeout=0.5))
    emu.set_mode("us-east-1", "throttle", count=1)
    emu.set_mode("us-west-2", "throttle", count=1)

    with pytest.raises(ReadTimeoutError):  # both throttled; the app gives up while the proxy waits
        client.converse(modelId=CLAUDE, messages=MESSAGES)
    (record,) = proxy.wait_for_records(1)

    assert [r.status for r in emu.requests] == [429, 429]  # no third attempt once a region recovered
    assert "the client went away after 2 attempts" in record["error"]


@pytest.mark.parametrize("operation", ["converse_stream", "invoke_model_with_response_stream"])
def test_exception_as_first_frame_fails_over_like_a_429(emu, proxy_factory, client_via_proxy, operation):
    proxy = proxy_factory(two_regions(emu))
    client = client_via_proxy(proxy)
    emu.set_mode("us-east-1", "stream_first_exception")

    if operation == "converse_stream":
        response = client.converse_stream(modelId=CLAUDE, messages=MESSAGES)
        events = list(response["stream"])
        assert "metadata" in events[-1]
    else:
        response = client.invoke_model_with_response_stream(modelId=CLAUDE, body=b'{"max_tokens": 20, "messages": []}')
        chunks = [e["chunk"]["bytes"] for e in response["body"]]
        assert b"message_stop" in chunks[-1]

    assert served_region(response) == "us-west-2"
    # The 200 head of us-east-1's stream carried a throttling exception: the attempt shows as the 429 it amounts to,
    # in the header, the access log and the flow's comment.
    assert attempts_header(response) == [("us-east-1", "429"), ("us-west-2", "200")]
    (record,) = proxy.wait_for_records(1)
    assert [(a["region"], a["status"], a["error"]) for a in record["attempts"][:1]] == [("us-east-1", 429, "stream throttlingException")]


@pytest.mark.parametrize("operation", ["converse_stream", "invoke_model_with_response_stream"])
def test_when_every_region_throttles_a_stream_the_client_gets_the_throttling_exception_as_aws_sends_it(
    emu, proxy_factory, client_via_proxy, operation
):
    # Each region begins the stream (200), then sends a throttlingException event: no region has an answer, and
    # the client gets the last one as it was, so the SDK raises what it would raise without the proxy.
    proxy = proxy_factory(two_regions(emu), bedrock_admin="127.0.0.1:0")  # metrics are kept for the admin listener
    client = client_via_proxy(proxy)
    emu.set_mode("us-east-1", "stream_first_exception")
    emu.set_mode("us-west-2", "stream_first_exception")

    if operation == "converse_stream":
        response = client.converse_stream(modelId=CLAUDE, messages=MESSAGES)
        events = response["stream"]
    else:
        response = client.invoke_model_with_response_stream(modelId=CLAUDE, body=b'{"max_tokens": 20, "messages": []}')
        events = response["body"]
    with pytest.raises(EventStreamError) as raised:
        list(events)

    assert raised.value.response["Error"]["Code"] == "throttlingException"
    assert [status for _, status in attempts_header(response)] == ["429"] * FAST_RETRY["max_attempts"]
    (record,) = proxy.wait_for_records(1)
    assert record["status"] == 200 and record["stream"] == "exception:throttlingException"
    assert record["error"].startswith(f"gave up after {FAST_RETRY['max_attempts']} attempts")
    operation = "ConverseStream" if operation == "converse_stream" else "InvokeModelWithResponseStream"
    assert proxy.balancer.metrics.client_throttles.labels(operation)._value.get() == 1  # a throttle the client saw


def test_when_no_region_answers_the_client_gets_the_last_answer_not_a_later_stall(emu, proxy_factory, client_via_proxy):
    # us-east-1 throttles, us-west-2 begins streams and then stalls: whichever region is tried last, the client
    # gets the throttle (an answer), as it would from us-east-1 alone, not the proxy's 503 for a stall.
    from botocore.exceptions import ClientError

    proxy = proxy_factory(two_regions(emu, retry={**FAST_RETRY, "max_attempts": 2, "stall_timeout_s": 0.3}))
    client = client_via_proxy(proxy)
    emu.set_mode("us-east-1", "throttle")
    emu.set_mode("us-west-2", "stream_stall")

    with pytest.raises(ClientError) as raised:
        client.converse_stream(modelId=CLAUDE, messages=MESSAGES)

    assert raised.value.response["Error"]["Code"] == "ThrottlingException"
    (record,) = proxy.wait_for_records(1)
    assert [a["region"] for a in record["attempts"]] == ["us-east-1", "us-west-2"]  # the stall came last
    assert record["status"] == 429


def test_failed_over_stream_delivers_events_while_the_healthy_target_produces_them(emu, proxy_factory, client_via_proxy):
    proxy = proxy_factory(two_regions(emu))
    client = client_via_proxy(proxy)
    emu.set_mode("us-east-1", "throttle")
    held = emu.hold_streams("us-west-2")
    try:
        response = client.converse_stream(modelId=CLAUDE, messages=MESSAGES)
        stream = iter(response["stream"])
        assert "messageStart" in next(stream) and "contentBlockDelta" in next(stream)
        assert not held.released
    finally:
        held.release()
    assert "metadata" in list(stream)[-1]
    assert attempts_header(response) == [("us-east-1", "429"), ("us-west-2", "200")]


def test_a_stream_cut_after_content_ends_with_an_error_never_a_clean_end(emu, proxy_factory, client_via_proxy):
    proxy = proxy_factory(two_regions(emu))
    client = client_via_proxy(proxy)
    emu.set_mode("us-east-1", "stream_cut")
    emu.set_mode("us-west-2", "stream_cut")

    response = client.converse_stream(modelId=CLAUDE, messages=MESSAGES)
    received = []
    with pytest.raises(EventStreamError) as raised:
        for event in response["stream"]:
            received.append(event)

    assert raised.value.response["Error"]["Code"] == "serviceUnavailableException"
    assert "incomplete" in str(raised.value)
    assert any("contentBlockDelta" in e for e in received)  # content had reached the client: no retry
    record = proxy.wait_for_records(1)[0]
    assert record["stream"] == "truncated" and len(record["attempts"]) == 1 and "broke" in record["error"]
    assert record["attempts"][0]["error"] == "stream broke off"


def test_a_region_whose_streams_break_off_is_cooled_down(emu, proxy_factory, client_via_proxy):
    proxy = proxy_factory(two_regions(emu, retry={**FAST_RETRY, "cooldown_base_s": 30, "cooldown_max_s": 30}))
    client = client_via_proxy(proxy)
    emu.set_mode("us-east-1", "stream_cut")

    with pytest.raises(EventStreamError):  # round-robin starts with us-east-1, whose stream breaks off
        list(client.converse_stream(modelId=CLAUDE, messages=MESSAGES)["stream"])
    # The next streams go to us-west-2 while us-east-1 cools down, although round-robin would alternate.
    served = [served_region(client.converse_stream(modelId=CLAUDE, messages=MESSAGES)) for _ in range(2)]

    assert served == ["us-west-2", "us-west-2"]
    (cooling,) = proxy.balancer.router.cooldowns.snapshot()
    assert cooling["model"] == CLAUDE and "stream broke off" in cooling["reason"]


def test_a_target_without_access_to_the_model_is_failed_over_and_its_message_stays_in_the_log(emu, proxy_factory, client_via_proxy):
    proxy = proxy_factory(two_regions(emu))
    client = client_via_proxy(proxy)
    emu.set_mode("us-east-1", "access_denied")

    assert served_region(client.converse(modelId=CLAUDE, messages=MESSAGES)) == "us-west-2"
    assert proxy.balancer.router.cooldowns.snapshot() == []  # access is no cooldown: nothing to wait for

    emu.set_mode("us-west-2", "access_denied")
    with pytest.raises(client.exceptions.AccessDeniedException, match="has no access to this request") as raised:
        client.converse(modelId=CLAUDE, messages=MESSAGES)
    assert "arn:aws:sts" not in str(raised.value)  # AWS's message names the proxy's role: it stays in the log


@pytest.mark.parametrize("strategy", ["priority", "quota", "round-robin", "least-outstanding", "latency"])
def test_every_strategy_fails_over_from_a_target_without_access_to_the_model(emu, proxy_factory, client_via_proxy, strategy):
    # Access is no cooldown, so nothing else keeps a strategy that prefers us-east-1 from choosing it again.
    config = two_regions(emu, strategy=strategy)
    config["targets"][1]["priority"] = 1
    proxy = proxy_factory(config)
    client = client_via_proxy(proxy)
    emu.set_mode("us-east-1", "access_denied")

    for _ in range(3):
        response = client.converse(modelId=CLAUDE, messages=MESSAGES)
        assert served_region(response) == "us-west-2"
        assert attempts_header(response)[-1] == ("us-west-2", "200")


def test_when_every_target_cools_down_the_request_waits_for_the_first_to_recover(emu, proxy_factory, client_via_proxy):
    proxy = proxy_factory(two_regions(emu, retry={**FAST_RETRY, "cooldown_base_s": 0.3}))
    client = client_via_proxy(proxy)
    emu.set_mode("us-east-1", "throttle", count=1)
    emu.set_mode("us-west-2", "throttle", count=1)

    response = client.converse(modelId=CLAUDE, messages=MESSAGES)

    statuses = [status for _, status in attempts_header(response)]
    assert statuses == ["429", "429", "200"]  # the third attempt came after waiting for a cooldown to end


def test_when_nothing_recovers_before_the_deadline_the_client_gets_a_throttling_exception(emu, proxy_factory, client_via_proxy):
    retry = {"max_attempts": 10, "deadline_s": 1.0, "cooldown_base_s": 0.2, "cooldown_max_s": 0.4}
    proxy = proxy_factory(two_regions(emu, retry=retry))
    client = client_via_proxy(proxy)
    emu.set_mode("us-east-1", "throttle")
    emu.set_mode("us-west-2", "throttle")

    with pytest.raises(client.exceptions.ThrottlingException):
        client.converse(modelId=CLAUDE, messages=MESSAGES)

    record = proxy.wait_for_records(1)[0]
    assert record["status"] == 429
    assert len(record["attempts"]) > 2  # it waited for cooldowns and tried again before giving up


def test_priority_keeps_the_preferred_region_and_spills_when_it_throttles(emu, proxy_factory, client_via_proxy):
    targets = targets_for(emu, ["us-east-1", "us-west-2"], **{"us-west-2": {"priority": 1}})
    proxy = proxy_factory({"strategy": "priority", "retry": FAST_RETRY, "targets": targets})
    client = client_via_proxy(proxy)

    before = {served_region(client.converse(modelId=CLAUDE, messages=MESSAGES)) for _ in range(3)}
    emu.set_mode("us-east-1", "throttle")
    during = served_region(client.converse(modelId=CLAUDE, messages=MESSAGES))

    assert before == {"us-east-1"} and during == "us-west-2"


def test_affinity_keeps_a_conversation_in_one_region(emu, proxy_factory, client_via_proxy):
    proxy = proxy_factory(two_regions(emu, affinity=True))
    client = client_via_proxy(proxy)
    conversation = [{"role": "user", "content": [{"text": "Remember the number 7."}]}]

    regions = []
    for turn in range(4):
        response = client.converse(modelId=CLAUDE, messages=conversation, system=[{"text": "be brief"}])
        regions.append(served_region(response))
        conversation += [response["output"]["message"], {"role": "user", "content": [{"text": f"turn {turn}"}]}]
    other = {served_region(client.converse(modelId=CLAUDE, messages=[{"role": "user", "content": [{"text": f"new {i}"}]}])) for i in range(4)}

    assert len(set(regions)) == 1
    assert other == {"us-east-1", "us-west-2"}


def test_uneven_quotas_under_concurrent_load_never_throttle_the_client(emu, proxy_factory, client_via_proxy):
    limits = {"us-east-1": 3, "us-west-2": 9, "eu-west-1": 6}
    for region, rpm in limits.items():
        emu.set_quota(region, rpm=rpm)
    targets = targets_for(emu, list(limits), **{r: {"rpm": rpm} for r, rpm in limits.items()})
    proxy = proxy_factory({"strategy": "quota", "retry": FAST_RETRY, "targets": targets})
    client = client_via_proxy(proxy)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        regions = list(pool.map(lambda _: served_region(client.converse(modelId=CLAUDE, messages=MESSAGES)), range(16)))

    assert len(regions) == 16
    served = Counter(regions)
    assert all(served[r] <= limits[r] for r in limits), served
    assert [r.status for r in emu.requests].count(429) == 0  # the proxy never even sent one over a budget


def test_a_request_no_budget_can_take_in_time_is_refused_at_once_and_told_why(emu, proxy_factory, client_via_proxy):
    targets = targets_for(emu, ["us-east-1"], **{"us-east-1": {"rpm": 1, "tpm": 2000}})
    client = client_via_proxy(proxy_factory({"retry": {**FAST_RETRY, "deadline_s": 5}, "targets": targets}))
    client.converse(modelId=CLAUDE, messages=MESSAGES)

    # The window (60 s) frees room after the deadline: no waiting, and the message says so.
    with pytest.raises(client.exceptions.ThrottlingException) as raised:
        client.converse(modelId=CLAUDE, messages=MESSAGES)
    assert "waited" not in str(raised.value) and "none will be before the request's deadline (retry.deadline_s: 5 s)" in str(raised.value)
    # One that no budget could ever take is a ValidationException saying what to change.
    with pytest.raises(client.exceptions.ValidationException, match="more than the tpm budget of any target"):
        client.converse(modelId=CLAUDE, messages=MESSAGES, inferenceConfig={"maxTokens": 5000})
    assert len(emu.requests) == 1


def test_reservations_settle_to_real_usage(emu, proxy_factory, client_via_proxy):
    targets = targets_for(emu, ["us-east-1"], **{"us-east-1": {"rpm": 100, "tpm": 100_000}})
    proxy = proxy_factory({"targets": targets})
    client = client_via_proxy(proxy)

    converse = client.converse(modelId=CLAUDE, messages=MESSAGES, inferenceConfig={"maxTokens": 4000})
    stream = client.converse_stream(modelId=CLAUDE, messages=MESSAGES, inferenceConfig={"maxTokens": 4000})
    metadata = list(stream["stream"])[-1]["metadata"]

    used = converse["usage"]["inputTokens"] + converse["usage"]["outputTokens"]
    used += metadata["usage"]["inputTokens"] + metadata["usage"]["outputTokens"]
    requests, tokens = proxy.balancer.router.ledger.usage(("us-east-1", "*"))
    assert requests == 2 and tokens == used  # not the 8000+ reserved while the requests ran


def test_failed_over_flows_are_marked_for_mitmweb(emu, proxy_factory, client_via_proxy):
    from mitmproxy import http as mhttp

    shown = []

    class Recorder:
        def response(self, flow: mhttp.HTTPFlow) -> None:
            shown.append((flow.marked, flow.comment))

    proxy = proxy_factory(two_regions(emu))
    proxy.master.addons.add(Recorder())
    client = client_via_proxy(proxy)
    emu.set_mode("us-east-1", "throttle", count=1)

    client.converse(modelId=CLAUDE, messages=MESSAGES)

    assert shown == [(":repeat:", "us-east-1 → us-west-2 after 2 attempts (us-east-1 429)")]


def test_flows_saved_with_w_carry_where_they_went(emu, proxy_factory, client_via_proxy, tmp_path):
    # mitmproxy's save addon (-w) writes a flow in its response hook: the balancer's runs before it.
    from mitmproxy import io as mio

    flow_file = tmp_path / "flows.mitm"
    proxy = proxy_factory(two_regions(emu), save_stream_file=str(flow_file))
    client = client_via_proxy(proxy)
    emu.set_mode("us-east-1", "throttle", count=1)

    client.converse(modelId=CLAUDE, messages=MESSAGES)
    proxy.wait_for_records(1)
    proxy.stop()  # flushes the flow file
    proxy.stop = lambda: None  # already stopped; the fixture would stop it again

    (saved,) = mio.FlowReader(flow_file.open("rb")).stream()
    assert (saved.marked, saved.comment) == (":repeat:", "us-east-1 → us-west-2 after 2 attempts (us-east-1 429)")


def test_a_client_that_leaves_mid_stream_is_logged_and_cools_nothing_down(emu, proxy_factory, client_via_proxy):
    proxy = proxy_factory(two_regions(emu))
    client = client_via_proxy(proxy)
    held = emu.hold_streams("us-east-1")
    response = client.converse_stream(modelId=CLAUDE, messages=MESSAGES)
    stream = iter(response["stream"])
    next(stream), next(stream)  # content is flowing; the rest is held upstream
    response["stream"]._raw_stream.close()  # the app goes away mid-answer
    held.release()

    (record,) = proxy.wait_for_records(1)

    assert record["stream"] == "client-gone" and record["region"] == "us-east-1"
    assert "client disconnected" in record["error"].lower()
    assert proxy.balancer.router.cooldowns.snapshot() == []  # the region did nothing wrong

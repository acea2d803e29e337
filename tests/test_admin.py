"""Metrics and status: /metrics (Prometheus) and /status (JSON) reflect a run with throttles and failovers."""

from __future__ import annotations

import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bedrock_balancer.admin import parse_listen_address
from proxyharness import targets_for

CLAUDE = "anthropic.claude-3-5-sonnet-20240620-v1:0"
MESSAGES = [{"role": "user", "content": [{"text": "hi"}]}]


def fetch(address, path: str) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{address[0]}:{address[1]}{path}", timeout=10) as response:
        return response.read()


def samples(text: str) -> dict[tuple, float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in found.items() if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))


def test_metrics_and_status_reflect_throttles_failovers_and_cooldowns(emu, proxy_factory, client_via_proxy):
    targets = targets_for(emu, ["us-east-1", "us-west-2"], **{"us-west-2": {"rpm": 100, "tpm": 100000}})
    proxy = proxy_factory(
        {"strategy": "round-robin", "retry": {"cooldown_base_s": 30, "cooldown_max_s": 60, "max_attempts": 2, "deadline_s": 2}, "targets": targets},
        bedrock_admin="127.0.0.1:0",
    )
    client = client_via_proxy(proxy)
    emu.set_mode("us-east-1", "throttle")
    for _ in range(3):
        client.converse(modelId=CLAUDE, messages=MESSAGES)
    list(client.converse_stream(modelId=CLAUDE, messages=MESSAGES)["stream"])
    emu.set_mode("us-west-2", "throttle")
    with pytest.raises(client.exceptions.ThrottlingException):
        client.converse(modelId=CLAUDE, messages=MESSAGES)

    address = proxy.balancer.admin.address
    found = samples(fetch(address, "/metrics").decode())
    state = json.loads(fetch(address, "/status"))

    assert value(found, "bedrock_balancer_requests_total", target="us-west-2", status="200") == 4
    assert value(found, "bedrock_balancer_attempts_total", target="us-east-1", status="429") == 1
    assert value(found, "bedrock_balancer_failovers_total") == 1
    assert value(found, "bedrock_balancer_client_throttles_total") == 1
    assert value(found, "bedrock_balancer_time_to_first_event_seconds_count", target="us-west-2") == 1
    assert value(found, "bedrock_balancer_tokens_total", target="us-west-2", direction="output") > 0
    assert value(found, "bedrock_balancer_target_cooling_down", target="us-east-1") == 1
    assert value(found, "bedrock_balancer_target_cooling_down", target="us-west-2") == 1
    assert 0 < value(found, "bedrock_balancer_quota_headroom_ratio", target="us-west-2", kind="rpm") < 1

    by_name = {t["name"]: t for t in state["targets"]}
    assert by_name["us-east-1"]["cooling_down"] and by_name["us-west-2"]["cooling_down"]
    east = next(c for c in state["cooldowns"] if c["target"] == "us-east-1")
    assert east["model"] == CLAUDE and "429" in east["reason"] and east["until"] > 0 and east["seconds_left"] > 10
    assert by_name["us-west-2"]["budgets"][0]["requests"] == 5 and by_name["us-west-2"]["latency_ewma_ms"] is not None


def test_bedrock_status_command(emu, proxy_factory, client_via_proxy):
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])})
    client_via_proxy(proxy).converse(modelId=CLAUDE, messages=MESSAGES)

    text = proxy.master.commands.call("bedrock.status")

    state = json.loads(text)
    assert state["targets"][0]["name"] == "us-east-1" and state["cooldowns"] == []
    assert "note" not in state


def test_bedrock_status_command_says_whose_view_it_shows_under_shared_state(emu, proxy_factory, redis_server):
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])}, bedrock_state=redis_server.url)

    state = json.loads(proxy.master.commands.call("bedrock.status"))

    assert state["state"]["mode"] == "shared"
    assert "as this instance sees them" in state["note"] and "/status" in state["note"]


@pytest.mark.parametrize("text, expected", [("127.0.0.1:9090", ("127.0.0.1", 9090)), ("9090", ("127.0.0.1", 9090)), ("[::1]:9", ("::1", 9))])
def test_admin_address_forms(text, expected):
    assert parse_listen_address(text) == expected


def test_bad_admin_address_is_refused():
    with pytest.raises(ValueError):
        parse_listen_address("localhost:http")

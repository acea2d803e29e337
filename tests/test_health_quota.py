"""Cooldowns and quota budgets, driven by a fake clock (no sleeping)."""

from __future__ import annotations

import random

import pytest

from bedrock_balancer import config
from bedrock_balancer.affinity import conversation_key
from bedrock_balancer.classify import classify
from bedrock_balancer.health import Cooldowns, parse_retry_after
from bedrock_balancer.quota import Budget, QuotaLedger, budgets_for, estimate_tokens
from bedrock_balancer.errors import BedrockError
from bedrock_balancer.routing import NotYet, Router


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cooldown_grows_exponentially_with_jitter_and_is_per_model():
    clock = Clock()
    cooldowns = Cooldowns(base_s=1, max_s=8, rng=random.Random(1), clock=clock)
    lengths = [cooldowns.failed("use1", "m1", "429") for _ in range(6)]
    assert all(0.5 * b <= l <= b for l, b in zip(lengths, [1, 2, 4, 8, 8, 8]))
    assert not cooldowns.available("use1", "m1")
    assert cooldowns.available("use1", "m2")  # another model on the same target is unaffected
    assert cooldowns.available("usw2", "m1")


def test_connection_failures_cool_the_whole_target():
    cooldowns = Cooldowns(clock=Clock())
    cooldowns.failed("use1", "m1", "connection refused", whole_target=True)
    assert not cooldowns.available("use1", "m2")


def test_half_open_admits_one_probe_then_closes_on_success():
    clock = Clock()
    cooldowns = Cooldowns(base_s=1, max_s=1, rng=random.Random(0), clock=clock)
    cooldowns.failed("use1", "m", "503")
    clock.now += 1.01
    assert cooldowns.available("use1", "m")
    assert cooldowns.begin("use1", "m") is True  # the probe
    assert not cooldowns.available("use1", "m")  # others wait for its verdict
    cooldowns.succeeded("use1", "m")
    assert cooldowns.available("use1", "m") and cooldowns.snapshot() == []


def test_failed_probe_opens_the_circuit_longer():
    clock = Clock()
    cooldowns = Cooldowns(base_s=1, max_s=100, rng=random.Random(0), clock=clock)
    cooldowns.failed("use1", "m", "503")
    clock.now += 1.01
    cooldowns.begin("use1", "m")
    second = cooldowns.failed("use1", "m", "503")
    assert second >= 1.0 and cooldowns.snapshot()[0]["failures"] == 2


def test_a_throttle_on_the_target_wide_probe_closes_that_circuit_and_cools_the_model():
    clock = Clock()
    cooldowns = Cooldowns(base_s=1, max_s=1, rng=random.Random(0), clock=clock)
    cooldowns.failed("use1", "m", "connection refused", whole_target=True)
    clock.now += 1.01
    assert cooldowns.begin("use1", "m") is True  # the target-wide probe ...
    cooldowns.failed("use1", "m", "429 ThrottlingException")  # ... is answered: the target is reachable
    assert cooldowns.available("use1", "other-model")  # not stuck behind a probe that has had its verdict
    assert not cooldowns.available("use1", "m")
    clock.now += 1.01
    assert cooldowns.available("use1", "m")
    assert [c["model"] for c in cooldowns.snapshot()] == ["m"]


def test_a_model_failure_leaves_a_running_target_wide_cooldown_alone():
    clock = Clock()
    cooldowns = Cooldowns(base_s=10, max_s=10, rng=random.Random(0), clock=clock)
    cooldowns.failed("use1", None, "connection refused", whole_target=True)  # the region is down ...
    cooldowns.failed("use1", "m", "stream broke off")  # ... and a stream begun before then breaks off
    assert not cooldowns.available("use1", "other-model")


def test_a_connection_failure_on_a_model_probe_ends_that_probe():
    clock = Clock()
    cooldowns = Cooldowns(base_s=1, max_s=1, rng=random.Random(0), clock=clock)
    cooldowns.failed("use1", "m", "429 ThrottlingException")
    clock.now += 1.01
    assert cooldowns.begin("use1", "m") is True  # the model's probe ...
    cooldowns.failed("use1", "m", "connection refused", whole_target=True)  # ... finds the whole target down
    assert not cooldowns.available("use1", "m") and not cooldowns.available("use1", "other-model")
    clock.now += 1.01
    assert cooldowns.available("use1", "m")  # the next request may probe again
    assert cooldowns.begin("use1", "m") is True


def test_retry_after_wins_over_backoff():
    clock = Clock()
    cooldowns = Cooldowns(base_s=1, clock=clock)
    assert cooldowns.failed("use1", "m", "429", retry_after_s=7.5) == 7.5
    assert cooldowns.next_available_at("use1", "m") == pytest.approx(clock.now + 7.5)
    headers = {"x-amz-retry-after": "1500"}
    assert parse_retry_after(headers.get) == 1.5
    assert parse_retry_after({"retry-after": "3"}.get) == 3.0
    assert parse_retry_after({}.get) is None


def test_ledger_reserves_then_settles_and_slides():
    clock = Clock()
    ledger = QuotaLedger(window_s=60, clock=clock)
    budgets = [(("use1", "*"), Budget(rpm=2, tpm=1000))]
    assert ledger.headroom(budgets, 400) == pytest.approx(0.5)  # rpm: (2-0-1)/2; tpm: (1000-400)/1000
    reservation = ledger.reserve(budgets, 400)
    assert ledger.usage(("use1", "*")) == (1, 400)
    ledger.settle(reservation, 120)
    assert ledger.usage(("use1", "*")) == (1, 120)
    ledger.reserve(budgets, 100)
    assert ledger.headroom(budgets, 100) < 0  # a third request would exceed rpm 2
    assert ledger.next_fit_at(budgets, 100) == pytest.approx(clock.now + 60)
    clock.now += 60.01
    assert ledger.usage(("use1", "*")) == (0, 0)


def test_next_fit_for_tokens_waits_for_enough_to_expire():
    clock = Clock()
    ledger = QuotaLedger(window_s=10, clock=clock)
    budgets = [(("t", "*"), Budget(tpm=1000))]
    ledger.reserve(budgets, 300)
    clock.now += 1
    ledger.reserve(budgets, 600)
    assert ledger.next_fit_at(budgets, 300) == pytest.approx(1000.0 + 10)  # the first entry's expiry frees enough
    assert ledger.next_fit_at(budgets, 900) == pytest.approx(1001.0 + 10)


def test_budgets_include_the_first_matching_model_quota():
    parsed = config.parse({"targets": [{"region": "us-east-1", "rpm": 10, "model_quotas": {"anthropic.*": {"tpm": 500}, "*": {"rpm": 1}}}]})
    target = parsed.targets[0]
    assert budgets_for(target, "anthropic.claude-v2") == [(("us-east-1", "*"), Budget(10, None)), (("us-east-1", "anthropic.*"), Budget(None, 500))]
    assert budgets_for(target, "amazon.nova") == [(("us-east-1", "*"), Budget(10, None)), (("us-east-1", "*"), Budget(1, None))]


def test_token_estimate_is_text_over_four_plus_max_tokens():
    converse = b'{"messages":[{"role":"user","content":[{"text":"' + b"x" * 400 + b'"}]}],"inferenceConfig":{"maxTokens":256}}'
    assert estimate_tokens(converse) == 100 + 256
    anthropic = b'{"max_tokens":50,"system":"abcd","messages":[{"role":"user","content":"' + b"y" * 40 + b'"}]}'
    assert estimate_tokens(anthropic) == 11 + 50
    image = b'{"messages":[{"role":"user","content":[{"image":{"source":{"bytes":"' + b"A" * 100000 + b'"}}}]}]}'
    assert estimate_tokens(image) == 1000  # image bytes are not text; the default max tokens remain
    assert estimate_tokens(b"not json") == 2 + 1000


def test_quota_strategy_picks_most_headroom_and_waits_when_all_are_spent():
    clock = Clock()
    parsed = config.parse({"strategy": "quota", "targets": [{"region": "us-east-1", "rpm": 2}, {"region": "us-west-2", "rpm": 4}]})
    router = Router(parsed, clock=clock)
    request = classify("POST", "/model/m.x/converse", "", None, None)
    picks = []
    for _ in range(6):
        choice = router.choose(request)
        router.ledger.reserve(budgets_for(choice.target, choice.model_id), 0)
        picks.append(choice.target.region)
    assert picks.count("us-east-1") == 2 and picks.count("us-west-2") == 4
    with pytest.raises(NotYet) as not_yet:
        router.choose(request)
    assert not_yet.value.retry_at == pytest.approx(clock.now + 60)


def test_a_request_larger_than_every_tpm_budget_is_refused_at_once_saying_why():
    parsed = config.parse({"targets": [{"region": "us-east-1", "tpm": 2000}, {"region": "us-west-2", "tpm": 1000}, {"region": "eu-west-1"}]})
    router = Router(parsed, clock=Clock())
    request = classify("POST", "/model/m.x/converse", "bedrock-runtime.us-east-1.amazonaws.com", None, None)
    assert router.choose(request, tokens=5000).target.region == "eu-west-1"  # a target without a tpm budget fits
    bounded = Router(config.parse({"targets": [{"region": "us-east-1", "tpm": 2000}, {"region": "us-west-2", "tpm": 1000}]}), clock=Clock())
    with pytest.raises(BedrockError, match="reserves about 5000 tokens .*the largest: 2000"):
        bounded.choose(request, tokens=5000)
    assert bounded.choose(request, tokens=1500).target.region == "us-east-1"


def test_latency_strategy_prefers_the_fastest_after_trying_each():
    parsed = config.parse({"strategy": "latency", "targets": [{"region": "us-east-1"}, {"region": "us-west-2"}]})
    router = Router(parsed, clock=Clock())
    request = classify("POST", "/model/m.x/converse", "", None, None)
    first, second = router.choose(request).target, None
    router.observe_latency(first, 500)
    second = router.choose(request).target
    assert second is not first  # never measured: tried next
    router.observe_latency(second, 50)
    assert router.choose(request).target is second
    for _ in range(10):
        router.observe_latency(second, 900)  # it got slow: the moving average follows
    assert router.choose(request).target is first


def test_latency_strategy_spreads_unmeasured_targets_and_measures_stale_ones_again():
    clock = Clock()
    parsed = config.parse({"strategy": "latency", "targets": [{"region": "us-east-1"}, {"region": "us-west-2"}, {"region": "eu-west-1"}]})
    router = Router(parsed, clock=clock)
    request = classify("POST", "/model/m.x/converse", "", None, None)
    # Requests that start together, before any answer: one to each target, not all to the first.
    assert {router.choose(request).target.region for _ in range(3)} == {"us-east-1", "us-west-2", "eu-west-1"}
    for region, ms in (("us-east-1", 900), ("us-west-2", 50), ("eu-west-1", 60)):
        router.observe_latency(next(t for t in parsed.targets if t.region == region), ms)
    assert router.choose(request).target.region == "us-west-2"
    clock.now += 30
    router.observe_latency(next(t for t in parsed.targets if t.region == "us-west-2"), 50)
    router.observe_latency(next(t for t in parsed.targets if t.region == "eu-west-1"), 60)
    clock.now += 31  # us-east-1's slow spell is over a minute old: it is measured again, by one request
    assert router.choose(request).target.region == "us-east-1"
    assert router.choose(request).target.region == "us-west-2"


def test_conversation_key_follows_the_conversation_not_its_latest_turn():
    turn1 = b'{"system":[{"text":"s"}],"messages":[{"role":"user","content":[{"text":"a"}]}]}'
    turn2 = b'{"system":[{"text":"s"}],"messages":[{"role":"user","content":[{"text":"a"}]},{"role":"assistant","content":[{"text":"b"}]}]}'
    other = b'{"system":[{"text":"s"}],"messages":[{"role":"user","content":[{"text":"z"}]}]}'
    assert conversation_key("m", turn1) == conversation_key("m", turn2) != conversation_key("m", other)
    assert conversation_key("m", turn1) != conversation_key("n", turn1)
    assert conversation_key("m", b"{}") is None and conversation_key("m", b"nope") is None

"""The Redis state backend against a real redis-server: two routers (as two proxy instances would have)
share budgets, cooldowns and probes; Redis trouble falls back to local state and recovers."""

from __future__ import annotations

import asyncio
import random

import benchutil as bu
import pytest
import redis

from bedrock_balancer import config, state
from bedrock_balancer.classify import classify
from bedrock_balancer.routing import NotYet, Router

HOST = "bedrock-runtime.us-east-1.amazonaws.com"
MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
OTHER_MODEL = "amazon.nova-lite-v1:0"


def converse(model: str = MODEL):
    return classify("POST", f"/model/{model}/converse", HOST, None, None)


def instance(url: str, targets: list[dict], **top) -> state.RedisState:
    router = Router(config.parse({"targets": targets, **top}))
    return state.RedisState(router, url, rng=random.Random(0), recheck_s=0.0)


def run(coro):
    return asyncio.run(coro)


async def _closing(states, body):
    try:
        return await body()
    finally:
        for s in states:
            await s.close()


def test_state_option_validation():
    assert state.validate_state_url("memory") is None
    assert state.validate_state_url("redis://127.0.0.1:6379/0") is None
    for bad in ("redis", "http://x:1/0", "redis://:6379/0", "redis://h:notaport/0", "redis://h:1/x"):
        problem = state.validate_state_url(bad)
        assert problem and problem.startswith("bedrock_state:"), bad


@pytest.mark.parametrize("bad", [
    "redis://admin:SuperSecretRedisPw@127.0.0.1:6379/abc",  # database not a number
    "redis://admin:SuperSecretRedisPw@127.0.0.1:99999/0",  # invalid port
    "http://admin:SuperSecretRedisPw@127.0.0.1:6379/0",  # not redis://
    "redis://admin:SuperSecretRedisPw@:6379/0",  # no host
    "admin:SuperSecretRedisPw@127.0.0.1:6379",  # redis:// forgotten
])
def test_a_bad_state_url_is_reported_without_its_password(bad):
    problem = state.validate_state_url(bad)
    assert problem.startswith("bedrock_state:")
    assert "SuperSecretRedisPw" not in problem and "admin:***@" in problem


def test_shared_state_keeps_a_requests_excluded_targets_out(redis_server):
    targets = [{"region": "us-east-1", "priority": 0}, {"region": "us-west-2", "priority": 1}]
    a = instance(redis_server.url, targets, strategy="priority")

    async def body():
        first, _ = await a.acquire(converse(), 10, None)
        other, lease = await a.acquire(converse(), 10, None, {"us-east-1"})
        assert (first.target.region, other.target.region, lease.local) == ("us-east-1", "us-west-2", False)

    run(_closing([a], body))


def test_budgets_are_shared_across_instances(redis_server):
    targets = [{"region": "us-east-1", "rpm": 3}]
    a, b = instance(redis_server.url, targets), instance(redis_server.url, targets)

    async def body():
        leases = []
        for s in (a, b, a):
            choice, lease = await s.acquire(converse(), 10, None)
            assert not lease.local
            leases.append(lease)
        with pytest.raises(NotYet) as refused:
            await b.acquire(converse(), 10, None)
        assert refused.value.retry_at > asyncio.get_running_loop().time() + 50  # the window must slide (60 s)
        for lease in leases:
            await a.settle(lease, 5)
        with pytest.raises(NotYet):  # settling does not give requests back
            await a.acquire(converse(), 10, None)

    run(_closing([a, b], body))
    assert a.status()["shared"] and b.status()["shared"]


def test_token_budget_counts_settled_usage_across_instances(redis_server):
    targets = [{"region": "us-east-1", "tpm": 1000}]
    a, b = instance(redis_server.url, targets), instance(redis_server.url, targets)

    async def body():
        _, lease = await a.acquire(converse(), 900, None)
        with pytest.raises(NotYet):
            await b.acquire(converse(), 200, None)  # 900 reserved + 200 > 1000
        await a.settle(lease, 100)  # it really used 100
        _, second = await b.acquire(converse(), 800, None)
        assert not second.local

    run(_closing([a, b], body))


def test_quota_strategy_spreads_by_shared_headroom(redis_server):
    targets = [{"region": "us-east-1", "rpm": 10}, {"region": "us-west-2", "rpm": 10}]
    a, b = instance(redis_server.url, targets), instance(redis_server.url, targets)

    async def body():
        picks = []
        for i in range(20):
            choice, _ = await (a if i % 2 else b).acquire(converse(), 1, None)
            picks.append(choice.target.region)
        with pytest.raises(NotYet):
            await a.acquire(converse(), 1, None)
        return picks

    picks = run(_closing([a, b], body))
    assert picks.count("us-east-1") == 10 and picks.count("us-west-2") == 10


def test_a_cooldown_learnt_by_one_instance_is_honoured_by_the_other(redis_server):
    targets = [{"region": "us-east-1"}, {"region": "us-west-2"}]
    a, b = instance(redis_server.url, targets), instance(redis_server.url, targets)

    async def body():
        choice, lease = await a.acquire(converse(), 1, None)
        cooldown = await a.failed(lease, "429 ThrottlingException")
        assert 0.5 <= cooldown <= 1.0
        for _ in range(4):
            other, lease_b = await b.acquire(converse(), 1, None)
            assert other.target.name != choice.target.name
            await b.settle(lease_b, 1)
        return choice

    run(_closing([a, b], body))


def test_half_open_probe_is_shared_and_success_closes_the_circuit(redis_server):
    targets = [{"region": "us-east-1"}]
    a, b = instance(redis_server.url, targets), instance(redis_server.url, targets)

    async def body():
        _, lease = await a.acquire(converse(), 1, None)
        await a.failed(lease, "503", retry_after_s=0)  # open for 0 s: half-open at once
        _, probe = await a.acquire(converse(), 1, None)
        assert probe.probe and probe.had_circuit
        with pytest.raises(NotYet):  # the other instance waits for the probe's verdict
            await b.acquire(converse(), 1, None)
        await a.succeeded(probe)
        _, after = await b.acquire(converse(), 1, None)
        assert not after.probe and not after.had_circuit

    run(_closing([a, b], body))


def test_whole_target_failure_cools_every_model(redis_server):
    targets = [{"region": "us-east-1"}]
    a, b = instance(redis_server.url, targets), instance(redis_server.url, targets)
    other_model = converse(OTHER_MODEL)

    async def body():
        _, lease = await a.acquire(converse(), 1, None)
        await a.failed(lease, "connection refused", whole_target=True)
        with pytest.raises(NotYet):
            await b.acquire(other_model, 1, None)

    run(_closing([a, b], body))


def test_a_probe_that_fails_for_another_reason_does_not_wedge_the_target(redis_server):
    targets = [{"region": "us-east-1"}]
    a, b = instance(redis_server.url, targets), instance(redis_server.url, targets)
    other_model = converse(OTHER_MODEL)

    async def body():
        _, lease = await a.acquire(converse(), 1, None)
        await a.failed(lease, "connection refused", whole_target=True, retry_after_s=0)
        _, probe = await a.acquire(converse(), 1, None)  # the target-wide probe, answered by a throttle
        assert probe.probe
        await a.failed(probe, "429 ThrottlingException", retry_after_s=60)
        _, lease = await b.acquire(other_model, 1, None)  # the target answered: other models go at once
        assert not lease.probe
        with pytest.raises(NotYet):
            await b.acquire(converse(), 1, None)  # the throttled model cools down

        _, lease = await a.acquire(other_model, 1, None)
        await a.failed(lease, "429 ThrottlingException", retry_after_s=0)
        _, probe = await a.acquire(other_model, 1, None)  # that model's probe finds the target down
        assert probe.probe
        await a.failed(probe, "connection refused", whole_target=True, retry_after_s=0)
        _, again = await b.acquire(other_model, 1, None)  # a new probe, at once: the old one has had its verdict
        assert again.probe

    run(_closing([a, b], body))


def test_a_model_failure_leaves_a_running_target_wide_cooldown_alone(redis_server):
    targets = [{"region": "us-east-1"}]
    a, b = instance(redis_server.url, targets), instance(redis_server.url, targets)

    async def body():
        _, streaming = await a.acquire(converse(), 1, None)  # begun before the region went down
        _, lease = await a.acquire(converse(), 1, None)
        await a.failed(lease, "connection refused", whole_target=True, retry_after_s=60)
        await a.failed(streaming, "stream broke off")
        with pytest.raises(NotYet):
            await b.acquire(converse(OTHER_MODEL), 1, None)

    run(_closing([a, b], body))


def test_every_key_expires_and_a_request_costs_two_round_trips(redis_server):
    targets = [{"region": "us-east-1", "rpm": 100, "tpm": 100000, "model_quotas": {"anthropic.*": {"rpm": 50}}}, {"region": "us-west-2", "rpm": 100}]
    a = instance(redis_server.url, targets)

    async def body():
        _, lease = await a.acquire(converse(), 10, None)  # the first: one look, one reservation
        await a.settle(lease, 5)
        first = a.round_trips
        for _ in range(10):
            _, lease = await a.acquire(converse(), 10, None)
            await a.settle(lease, 5)
        _, lease = await a.acquire(converse(), 10, None)
        await a.failed(lease, "503")
        return first, a.round_trips

    first, total = run(_closing([a], body))
    assert first == 3
    assert total - first == 10 * 2 + 2  # steady state: 1 to choose+reserve, 1 to settle; a failure: 1 (+1 to acquire)
    client = redis.Redis(port=redis_server.port)
    keys = client.keys("bb:*")
    assert keys and all(client.pttl(k) > 0 for k in keys)


def test_a_failed_attempt_leaving_the_window_keeps_the_state_shared(redis_server):
    # A failed attempt's reservation is settled to 0 tokens; when it leaves the window, trimming it must not
    # break the scripts (Lua sent -0 as "-0", which HINCRBY refused, and every instance fell back to local state).
    targets = [{"region": "us-east-1", "rpm": 10, "tpm": 10000}]
    a = instance(redis_server.url, targets, quota_window_s=0.2)

    async def body():
        _, lease = await a.acquire(converse(), 100, None)
        await a.failed(lease, "503", retry_after_s=0)
        await asyncio.sleep(0.3)  # the quota window is time itself: the entry must have left it
        _, after = await a.acquire(converse(), 100, None)
        return after

    after = run(_closing([a], body))
    assert not after.local and a.status()["mode"] == "shared"


def test_redis_down_falls_back_to_local_state_then_recovers(redis_server):
    targets = [{"region": "us-east-1", "rpm": 2}]
    a = instance(redis_server.url, targets)

    async def body():
        _, lease = await a.acquire(converse(), 1, None)
        assert not lease.local
        redis_server.stop()
        _, fallback = await a.acquire(converse(), 1, None)  # no error: local state
        assert fallback.local and a.status()["mode"] == "local-fallback"
        await a.settle(fallback, 1)
        await a.settle(lease, 1)  # a shared lease settled while Redis is down: dropped, no error
        redis_server.start()
        _, back = await a.acquire(converse(), 1, None)
        assert not back.local and a.status()["mode"] == "shared"

    run(_closing([a], body))


def test_an_unreachable_redis_is_reported_by_the_start_up_check(redis_server, caplog):
    reachable = instance(redis_server.url, [{"region": "us-east-1"}])
    unreachable = instance(f"redis://127.0.0.1:{bu.free_port()}/0", [{"region": "us-east-1"}])

    async def body():
        assert await reachable.check() is True
        assert await unreachable.check() is False

    with caplog.at_level("WARNING"):
        run(_closing([reachable, unreachable], body))
    assert [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()] != []
    assert unreachable.status()["mode"] == "local-fallback" and reachable.status()["mode"] == "shared"


def test_shared_client_limits_across_instances(redis_server):
    from bedrock_balancer.clientauth import ClientLimits
    from bedrock_balancer.errors import BedrockError
    from bedrock_balancer.quota import Budget

    targets = [{"region": "us-east-1"}]
    a, b = instance(redis_server.url, targets), instance(redis_server.url, targets)
    limits_a = ClientLimits([("team-a", Budget(rpm=2))], 60.0)
    limits_b = ClientLimits([("team-a", Budget(rpm=2))], 60.0)
    limits_a.state, limits_b.state = a, b

    async def body():
        first = await limits_a.admit_shared("team-a", 10)
        second = await limits_b.admit_shared("team-a", 10)
        assert not first.local and not second.local
        with pytest.raises(BedrockError, match="over its rpm limit") as refused:
            await limits_a.admit_shared("team-a", 10)
        assert refused.value.error_type == "ThrottlingException"
        assert await limits_a.admit_shared("team-b", 10) is None  # no limits configured for team-b
        limits_a.settle(first, 3)
        await asyncio.gather(*limits_a._pending)

    run(_closing([a, b], body))


def test_bedrock_state_option_is_checked_in_configure(redis_server):
    from mitmproxy import exceptions
    from mitmproxy.addons.proxyserver import Proxyserver
    from mitmproxy.test import taddons

    from bedrock_balancer.addon import BedrockBalancer

    balancer = BedrockBalancer()
    with taddons.context(Proxyserver(), balancer) as context:
        context.configure(balancer, bedrock_regions="us-east-1,us-west-2")
        assert balancer.state.name == "memory" and balancer.relay is None
        with pytest.raises(exceptions.OptionsError, match="^bedrock_state: 'mysql://x' is neither"):
            context.configure(balancer, bedrock_state="mysql://x")
        context.configure(balancer, bedrock_state=redis_server.url)
        assert balancer.state.name == "redis" and balancer.router.shared_state is balancer.state
        context.configure(balancer, bedrock_state="memory")
        assert balancer.state.name == "memory"


def test_round_robin_positions_are_shared(redis_server):
    targets = [{"region": "us-east-1", "weight": 2}, {"region": "us-west-2"}]
    a, b = instance(redis_server.url, targets, strategy="round-robin"), instance(redis_server.url, targets, strategy="round-robin")

    async def body():
        alone = [(await a.acquire(converse(), 1, None))[0].target.region for _ in range(6)]
        together = [(await (a if i % 2 else b).acquire(converse(), 1, None))[0].target.region for i in range(30)]
        return alone, together

    alone, together = run(_closing([a, b], body))
    assert alone == ["us-east-1", "us-west-2", "us-east-1"] * 2  # smooth weighted round-robin, as in memory
    # Two instances taking turns continue the one shared sequence, as one proxy would.
    assert together == ["us-east-1", "us-west-2", "us-east-1"] * 10
    client = redis.Redis(port=redis_server.port)
    assert sum(int(v) for v in client.hvals("bb:rr")) == 0  # every step kept the weights balanced


def test_shared_status_shows_every_instances_budgets_and_cooldowns(redis_server):
    from bedrock_balancer import admin

    targets = [{"region": "us-east-1", "rpm": 10, "model_quotas": {"anthropic.*": {"tpm": 5000}}}, {"region": "us-west-2", "priority": 1}]
    a, b = instance(redis_server.url, targets, strategy="priority"), instance(redis_server.url, targets, strategy="priority")

    async def body():
        _, lease = await a.acquire(converse(), 100, None)
        await a.settle(lease, 40)
        _, lease = await a.acquire(converse(), 100, None)
        await a.failed(lease, "429 ThrottlingException", retry_after_s=30)
        return await b.shared_status()

    shared = run(_closing([a, b], body))
    page = admin.status(b.router, shared=shared)
    east = next(t for t in page["targets"] if t["region"] == "us-east-1")
    assert [(u["budget"], u["requests"], u["tokens"]) for u in east["budgets"]] == [("*", 2, 40), ("anthropic.*", 2, 40)]
    assert east["cooling_down"] is True
    (cooldown,) = page["cooldowns"]
    assert cooldown["target"] == east["name"] and cooldown["model"] == MODEL and cooldown["reason"] == "429 ThrottlingException"
    assert 29 < cooldown["seconds_left"] <= 30

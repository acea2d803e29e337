"""The proxy's own credentials: profiles, assumed roles, refresh, and never blocking the event loop."""

from __future__ import annotations

import asyncio
import threading
from urllib.parse import parse_qs
from datetime import datetime, timedelta, timezone

import pytest

from bedrock_balancer import credentials as credentials_module
from bedrock_balancer.credentials import CredentialSource, CredentialsUnavailable
from bedrock_balancer.sigv4 import Credentials
from proxyharness import PROXY_KEY, targets_for

CLAUDE = "anthropic.claude-3-5-sonnet-20240620-v1:0"
MESSAGES = [{"role": "user", "content": [{"text": "hi"}]}]


def test_role_arn_is_assumed_and_its_temporary_credentials_sign(emu, proxy_factory, client_via_proxy, monkeypatch):
    # botocore's STS client for the role goes to the emulator's STS (AWS_ENDPOINT_URL_STS) and trusts its CA.
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", emu.endpoint_url("us-east-1"))
    monkeypatch.setenv("AWS_CA_BUNDLE", emu.ca_path)
    role = "arn:aws:iam::123456789012:role/bedrock-balancer"
    proxy = proxy_factory({"targets": targets_for(emu, ["us-west-2"], **{"us-west-2": {"role_arn": role}})})
    client = client_via_proxy(proxy)

    client.converse(modelId=CLAUDE, messages=MESSAGES)

    assume, invoke = emu.requests[0], emu.requests[-1]
    form = parse_qs(assume.body.decode())
    assert assume.access_key_id == PROXY_KEY and form["Action"] == ["AssumeRole"] and form["RoleArn"] == [role]
    assert invoke.region == "us-west-2" and invoke.auth_ok
    assert invoke.access_key_id.startswith("ASIA") and invoke.header("x-amz-security-token")


class FakeRefreshable:
    """Stands in for botocore's refreshable credentials: a blocking refresh we control."""

    def __init__(self, expires_in_s: float):
        self.expires_in_s = expires_in_s
        self.gate = threading.Event()
        self.calls = 0

    @property
    def _expiry_time(self):
        return datetime.now(timezone.utc) + timedelta(seconds=self.expires_in_s)

    def get_frozen_credentials(self):
        self.calls += 1
        self.gate.wait(10)  # blocking I/O, as botocore's STS or SSO calls are
        return Credentials(f"ASIA{self.calls}", "secret", "token")


def source_with(fake) -> CredentialSource:
    source = CredentialSource(None, None, "us-east-1")
    source._create_blocking = lambda: fake
    return source


def test_a_slow_credential_lookup_does_not_block_the_event_loop():
    fake = FakeRefreshable(expires_in_s=3600)

    async def scenario():
        source = source_with(fake)
        lookup = asyncio.create_task(source.get())
        ticks = 0
        while not lookup.done() and ticks < 5:  # the loop keeps running while botocore blocks in a thread
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 5 and not lookup.done()
        fake.gate.set()
        return await lookup

    assert asyncio.run(scenario()).access_key == "ASIA1"


def test_credentials_near_expiry_refresh_in_the_background():
    fake = FakeRefreshable(expires_in_s=credentials_module.ADVISORY_REFRESH_S - 60)
    fake.gate.set()

    async def scenario():
        source = source_with(fake)
        first = await source.get()
        second = await source.get()  # still valid: answered at once, a refresh starts behind it
        assert second is first
        await source._refreshing
        return await source.get()

    assert asyncio.run(scenario()).access_key == "ASIA2"


def test_missing_credentials_are_a_clear_error(monkeypatch):
    async def scenario():
        source = CredentialSource("no-such-profile", None, "us-east-1")
        with pytest.raises(CredentialsUnavailable, match=r"no AWS credentials for profile no-such-profile \(check the profile") as raised:
            await source.get()
        assert "give the target a profile" not in str(raised.value)  # it has one: that advice would mislead

    asyncio.run(scenario())


def test_missing_credentials_reach_the_client_as_service_unavailable(emu, proxy_factory, client_via_proxy):
    targets = targets_for(emu, ["us-east-1"], **{"us-east-1": {"profile": "no-such-profile"}})
    client = client_via_proxy(proxy_factory({"retry": {"max_attempts": 1}, "targets": targets}))

    with pytest.raises(client.exceptions.ServiceUnavailableException, match="the proxy has no usable AWS credentials") as raised:
        client.converse(modelId=CLAUDE, messages=MESSAGES)
    assert emu.requests == []
    assert "no-such-profile" not in str(raised.value)  # the proxy's configuration stays in its own log


def test_a_target_without_credentials_is_cooled_down_and_the_others_serve(emu, proxy_factory, client_via_proxy):
    targets = targets_for(emu, ["us-east-1", "us-west-2"], **{"us-east-1": {"profile": "no-such-profile"}})
    proxy = proxy_factory({"strategy": "round-robin", "targets": targets})
    client = client_via_proxy(proxy)

    served = [client.converse(modelId=CLAUDE, messages=MESSAGES)["ResponseMetadata"]["HTTPHeaders"]["x-bedrock-balancer-region"] for _ in range(3)]

    assert served == ["us-west-2"] * 3
    # Only the first request tried us-east-1: it cools down instead of costing every request an attempt.
    assert [[a["error"] if "error" in a else a["region"] for a in r["attempts"]] for r in proxy.wait_for_records(3)] == [
        ["credentials", "us-west-2"], ["us-west-2"], ["us-west-2"]]


def test_a_target_refusing_the_proxys_signature_is_failed_over_never_blamed_on_the_client(emu, proxy_factory, client_via_proxy):
    targets = targets_for(emu, ["us-east-1", "us-west-2"], **{"us-east-1": {"profile": "wrong-secret"}})
    proxy = proxy_factory({"strategy": "round-robin", "targets": targets})
    client = client_via_proxy(proxy)

    response = client.converse(modelId=CLAUDE, messages=MESSAGES)

    assert response["ResponseMetadata"]["HTTPHeaders"]["x-bedrock-balancer-region"] == "us-west-2"
    assert [(r.region, r.status) for r in emu.requests] == [("us-east-1", 403), ("us-west-2", 200)]
    (cooling,) = proxy.balancer.router.cooldowns.snapshot()
    assert cooling["model"] is None and "InvalidSignatureException" in cooling["reason"]  # the whole target


def test_when_every_target_refuses_the_proxys_signature_the_client_is_told_it_is_the_proxys(emu, proxy_factory, client_via_proxy):
    targets = targets_for(emu, ["us-east-1"], **{"us-east-1": {"profile": "wrong-secret"}})
    client = client_via_proxy(proxy_factory({"targets": targets}))

    with pytest.raises(client.exceptions.ServiceUnavailableException, match="refused the proxy's credentials: 403 InvalidSignatureException"):
        client.converse(modelId=CLAUDE, messages=MESSAGES)
    assert len(emu.requests) == 1  # no waiting for the same target to cool down, for a signature it will refuse again

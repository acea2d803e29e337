"""Security through the real proxy: client authentication, where credentials may go, hostile input.

Every test runs real clients (boto3, the AWS CLI, curl, raw sockets for what no SDK would send) through
the real proxy to the emulator. Attacks that try to make the proxy sign for the wrong host aim at a
*decoy* server that records what reaches it: the proxy's access key id appears in every signature the
proxy makes, so ``decoy.saw(PROXY_KEY)`` would reveal a leaked signed request. Where the proxy forwards a
client's own bytes (a loopback client's tunnel to another host), the decoy seeing the client's key is
the proof that the decoy was reachable, so its not seeing the proxy's key means something.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import boto3
import pytest
import yaml
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from proxyharness import (
    API_KEY,
    CLIENT_KEY,
    CLIENT_SECRET,
    OTHER_VIRTUAL_KEY,
    OTHER_VIRTUAL_SECRET,
    PROXY_KEY,
    PROXY_SECRET,
    VIRTUAL_KEY,
    VIRTUAL_SECRET,
    Decoy,
    RouteToDecoy,
    local_non_loopback_address,
    raw_request,
    run_in_proxy,
    signed_request,
    targets_for,
    wait_for,
    write_config,
)

CLAUDE = "anthropic.claude-3-5-sonnet-20240620-v1:0"
TITAN = "amazon.titan-text-express-v1"  # no ':' (curl 7.88 signs ':' in paths differently from AWS)
MESSAGES = [{"role": "user", "content": [{"text": "hi"}]}]
CONVERSE_BODY = json.dumps({"messages": MESSAGES}).encode()
BEDROCK_HOST = "bedrock-runtime.us-east-1.amazonaws.com"
CONVERSE_PATH = f"/model/{TITAN}/converse"
NO_RETRIES = BotoConfig(retries={"total_max_attempts": 1}, read_timeout=30, connect_timeout=10)


def auth_config(emu, regions=("us-east-1", "us-west-2"), **extra) -> dict:
    return {
        "targets": targets_for(emu, list(regions)),
        "clients": [
            {"name": "team-a", "access_key_id": VIRTUAL_KEY, "secret_access_key": VIRTUAL_SECRET},
            {"name": "team-b", "access_key_id": OTHER_VIRTUAL_KEY, "secret_access_key_env": "TEAM_B_SECRET", "rpm": 2},
        ],
        "api_keys": [{"name": "team-c", "key": API_KEY}],
        **extra,
    }


@pytest.fixture
def authed_proxy(emu, proxy_factory, monkeypatch):
    """A proxy that requires client authentication (virtual keys team-a, team-b; API key team-c)."""

    def start(config: dict | None = None, mode: str = "regular", **options):
        monkeypatch.setenv("TEAM_B_SECRET", OTHER_VIRTUAL_SECRET)
        return proxy_factory(config or auth_config(emu), mode=mode, **options)

    return start


@pytest.fixture
def boto(monkeypatch):
    """An unmodified boto3 bedrock-runtime client using the given credentials, through the proxy."""

    def make(proxy, key=VIRTUAL_KEY, secret=VIRTUAL_SECRET, region="us-east-1", **kwargs):
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("AWS_CA_BUNDLE", proxy.ca_cert)
        return boto3.client("bedrock-runtime", region_name=region, aws_access_key_id=key, aws_secret_access_key=secret,
                            config=kwargs.pop("config", NO_RETRIES), **kwargs)

    return make


def error_of(raised) -> tuple[int, str]:
    response = raised.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"]


def served_region(response) -> str:
    return response["ResponseMetadata"]["HTTPHeaders"]["x-bedrock-balancer-region"]


def assert_upstream_saw_only_the_proxy(emu):
    for recorded in emu.requests:
        assert recorded.auth_ok and recorded.access_key_id == PROXY_KEY
        text = repr(recorded.headers) + recorded.raw_path
        for secret in (VIRTUAL_KEY, OTHER_VIRTUAL_KEY, API_KEY, CLIENT_KEY, "Bearer"):
            assert secret not in text


# -- client authentication: virtual SigV4 keys -------------------------------------------------------


def test_boto3_with_a_virtual_key_is_served_and_logged_under_its_name(emu, authed_proxy, boto):
    proxy = authed_proxy()
    client = boto(proxy)

    regions = {served_region(client.converse(modelId=CLAUDE, messages=MESSAGES)) for _ in range(2)}
    list(client.converse_stream(modelId=CLAUDE, messages=MESSAGES)["stream"])

    assert regions == {"us-east-1", "us-west-2"}
    assert len(emu.requests) == 3
    assert_upstream_saw_only_the_proxy(emu)
    records = proxy.access_records()
    assert [(r["client_name"], r["status"]) for r in records] == [("team-a", 200)] * 3
    assert all(r["client"].startswith("127.0.0.1:") for r in records)


@pytest.mark.parametrize(
    "key, secret, expected",
    [
        (VIRTUAL_KEY, "not-the-secret-of-team-a-000", "InvalidSignatureException"),
        ("AKIDNOBODYKNOWS", VIRTUAL_SECRET, "UnrecognizedClientException"),
        (PROXY_KEY, PROXY_SECRET, "UnrecognizedClientException"),  # the proxy's own AWS key is no client key
    ],
    ids=["wrong-secret", "unknown-key", "proxy-key"],
)
def test_boto3_with_bad_credentials_gets_403_and_nothing_goes_upstream(emu, authed_proxy, boto, key, secret, expected):
    proxy = authed_proxy()
    client = boto(proxy, key=key, secret=secret)

    with pytest.raises(ClientError) as raised:
        client.converse(modelId=CLAUDE, messages=MESSAGES)

    assert error_of(raised) == (403, expected)
    assert emu.requests == []
    record = proxy.access_records()[-1]
    assert record["status"] == 403 and record["client_name"] is None and record["error"].startswith(expected)


def test_unsigned_request_is_missing_authentication_token(emu, authed_proxy, boto):
    client = boto(authed_proxy(), config=BotoConfig(signature_version=UNSIGNED, retries={"total_max_attempts": 1}))

    with pytest.raises(ClientError) as raised:
        client.converse(modelId=CLAUDE, messages=MESSAGES)

    assert error_of(raised) == (403, "MissingAuthenticationTokenException")
    assert emu.requests == []


def test_session_token_with_a_virtual_key_is_unrecognized(emu, authed_proxy, boto):
    client = boto(authed_proxy(), aws_session_token="FwoGZXIvYXdzEXAMPLETOKEN")

    with pytest.raises(ClientError) as raised:
        client.converse(modelId=CLAUDE, messages=MESSAGES)

    assert error_of(raised) == (403, "UnrecognizedClientException")
    assert emu.requests == []


def test_any_scope_region_is_accepted_and_served_by_the_targets(emu, authed_proxy, boto):
    proxy = authed_proxy(auth_config(emu, regions=["us-east-1"], cross_geography=True))

    # The client signs for (and addresses) a region the proxy has no target in; the scope region is
    # the client's business, the proxy moves the request anyway.
    response = boto(proxy, region="ap-southeast-2").converse(modelId=CLAUDE, messages=MESSAGES)

    assert served_region(response) == "us-east-1"
    assert proxy.access_records()[-1]["client_region"] == "ap-southeast-2"


@pytest.mark.parametrize(
    "shift, service, expected",
    [
        (timedelta(minutes=-16), "bedrock", "Signature expired"),
        (timedelta(minutes=16), "bedrock", "Signature not yet current"),
        (timedelta(minutes=-14), "s3", "Credential should be scoped to correct service: 'bedrock'"),
    ],
    ids=["16-min-old", "16-min-ahead", "wrong-service"],
)
def test_date_window_and_service_are_checked(emu, authed_proxy, shift, service, expected):
    proxy = authed_proxy()
    request = signed_request("POST", BEDROCK_HOST, CONVERSE_PATH, CONVERSE_BODY, key=VIRTUAL_KEY, secret=VIRTUAL_SECRET,
                             service=service, now=datetime.now(timezone.utc) + shift)

    _, response = raw_request(("127.0.0.1", proxy.port), request, connect=f"{BEDROCK_HOST}:443", tls_host=BEDROCK_HOST, ca_cert=proxy.ca_cert)

    assert (response.status, response.error_type) == (403, "InvalidSignatureException")
    assert expected in response.json()["message"]
    assert emu.requests == []


def test_fourteen_minutes_of_clock_skew_is_fine(emu, authed_proxy):
    proxy = authed_proxy()
    request = signed_request("POST", BEDROCK_HOST, CONVERSE_PATH, CONVERSE_BODY, key=VIRTUAL_KEY, secret=VIRTUAL_SECRET,
                             now=datetime.now(timezone.utc) - timedelta(minutes=14))

    _, response = raw_request(("127.0.0.1", proxy.port), request, connect=f"{BEDROCK_HOST}:443", tls_host=BEDROCK_HOST, ca_cert=proxy.ca_cert)

    assert response.status == 200, response.body
    assert len(emu.requests) == 1


def test_reverse_mode_verifies_the_host_the_client_signed(emu, authed_proxy):
    proxy = authed_proxy(mode=f"reverse:https://{BEDROCK_HOST}")
    client = boto3.client("bedrock-runtime", region_name="us-east-1", endpoint_url=proxy.url, aws_access_key_id=VIRTUAL_KEY,
                          aws_secret_access_key=VIRTUAL_SECRET, config=NO_RETRIES)

    response = client.converse(modelId=CLAUDE, messages=MESSAGES)
    with pytest.raises(ClientError) as raised:
        boto3.client("bedrock-runtime", region_name="us-east-1", endpoint_url=proxy.url, aws_access_key_id=VIRTUAL_KEY,
                     aws_secret_access_key="wrong-secret-wrong-secret", config=NO_RETRIES).converse(modelId=CLAUDE, messages=MESSAGES)

    assert "Hello from" in response["output"]["message"]["content"][0]["text"]
    assert error_of(raised) == (403, "InvalidSignatureException")
    assert len(emu.requests) == 1
    assert_upstream_saw_only_the_proxy(emu)


def test_reverse_mode_takes_tls_from_clients_so_keys_need_not_cross_the_network_in_clear(emu, authed_proxy):
    proxy = authed_proxy(mode=f"reverse:https://{BEDROCK_HOST}")
    client = boto3.client("bedrock-runtime", region_name="us-east-1", endpoint_url=f"https://localhost:{proxy.port}", verify=proxy.ca_cert,
                          aws_access_key_id=VIRTUAL_KEY, aws_secret_access_key=VIRTUAL_SECRET, config=NO_RETRIES)

    response = client.converse(modelId=CLAUDE, messages=MESSAGES)

    assert "Hello from" in response["output"]["message"]["content"][0]["text"]
    assert proxy.access_records()[-1]["client_name"] == "team-a"


def test_debug_signatures_shows_the_canonical_request_to_the_client_only(emu, authed_proxy, boto, caplog):
    caplog.set_level(logging.INFO)
    proxy = authed_proxy(bedrock_debug_signatures=True)
    client = boto(proxy, secret="not-the-secret-of-team-a-000")

    with pytest.raises(ClientError) as raised:
        client.converse(modelId=CLAUDE, messages=MESSAGES)

    message = raised.value.response["Error"]["Message"]
    assert message.startswith("The request signature we calculated does not match")
    assert "The Canonical String for this request should have been\n'POST\n/model/anthropic.claude-3-5-sonnet-20240620-v1%253A0/converse\n" in message
    assert "The String-to-Sign should have been\n'AWS4-HMAC-SHA256\n" in message and "/us-east-1/bedrock/aws4_request\n" in message
    assert "Canonical String" not in caplog.text and "Canonical String" not in proxy.access_log.read_text()


def test_without_debug_signatures_the_403_does_not_explain(emu, authed_proxy, boto):
    client = boto(authed_proxy(), secret="not-the-secret-of-team-a-000")

    with pytest.raises(ClientError) as raised:
        client.converse(modelId=CLAUDE, messages=MESSAGES)

    assert "Canonical String" not in raised.value.response["Error"]["Message"]


# -- Bedrock API keys -----------------------------------------------------------------------------------


def test_bedrock_api_key_is_mapped_to_its_client_and_never_forwarded(emu, authed_proxy, monkeypatch):
    proxy = authed_proxy()
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("AWS_CA_BUNDLE", proxy.ca_cert)
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", API_KEY)  # boto3 then sends Authorization: Bearer <key>
    client = boto3.client("bedrock-runtime", region_name="us-east-1", config=NO_RETRIES)

    response = client.converse(modelId=CLAUDE, messages=MESSAGES)

    assert "Hello from" in response["output"]["message"]["content"][0]["text"]
    assert emu.requests[0].auth_method == "sigv4"
    assert_upstream_saw_only_the_proxy(emu)
    assert proxy.access_records()[-1]["client_name"] == "team-c"


def test_unknown_bedrock_api_key_is_refused_as_bedrock_refuses_it(emu, authed_proxy, monkeypatch):
    proxy = authed_proxy()
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("AWS_CA_BUNDLE", proxy.ca_cert)
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "ABSKbm90LWEta2V5LXRoZS1wcm94eS1rbm93cw==")
    client = boto3.client("bedrock-runtime", region_name="us-east-1", config=NO_RETRIES)

    with pytest.raises(client.exceptions.AccessDeniedException, match="Please make sure your API Key is valid"):
        client.converse(modelId=CLAUDE, messages=MESSAGES)
    assert emu.requests == []


# -- per-client limits -------------------------------------------------------------------------------


def test_per_client_rpm_limit_is_a_throttling_exception_for_that_client_only(emu, authed_proxy, boto):
    proxy = authed_proxy()
    limited, unlimited = boto(proxy, key=OTHER_VIRTUAL_KEY, secret=OTHER_VIRTUAL_SECRET), boto(proxy)

    for _ in range(2):
        limited.converse(modelId=CLAUDE, messages=MESSAGES)
    with pytest.raises(limited.exceptions.ThrottlingException, match="client 'team-b' is over its rpm limit"):
        limited.converse(modelId=CLAUDE, messages=MESSAGES)
    unlimited.converse(modelId=CLAUDE, messages=MESSAGES)

    assert len(emu.requests) == 3
    records = proxy.access_records()
    assert [(r["client_name"], r["status"]) for r in records] == [("team-b", 200)] * 2 + [("team-b", 429), ("team-a", 200)]
    refused = records[2]  # logged as what it was, although it went nowhere
    assert (refused["operation"], refused["model"], refused["region"], refused["attempts"]) == ("Converse", CLAUDE, None, [])


def test_per_client_tpm_limit_counts_the_request_as_bedrock_reserves_it(emu, authed_proxy, boto):
    config = auth_config(emu)
    config["clients"][0]["tpm"] = 1500
    client = boto(authed_proxy(config))

    client.converse(modelId=CLAUDE, messages=MESSAGES, inferenceConfig={"maxTokens": 100})  # reserves ~100, uses less
    with pytest.raises(client.exceptions.ThrottlingException, match="tpm limit"):
        client.converse(modelId=CLAUDE, messages=MESSAGES, inferenceConfig={"maxTokens": 2000})
    client.converse(modelId=CLAUDE, messages=MESSAGES, inferenceConfig={"maxTokens": 100})

    assert len(emu.requests) == 2


def test_a_request_no_region_answered_costs_its_client_no_tokens(emu, authed_proxy, boto):
    # Every region throttles it: the model produced nothing, and AWS bills nothing. What it reserved in the
    # client's own budget is given back, or an outage would use up the client's limit for requests that failed.
    config = auth_config(emu, retry={"max_attempts": 2, "cooldown_base_s": 0.05, "cooldown_max_s": 0.1})
    config["clients"][0]["tpm"] = 1500
    client = boto(authed_proxy(config))
    emu.set_mode("us-east-1", "throttle", count=1)
    emu.set_mode("us-west-2", "throttle", count=1)

    with pytest.raises(client.exceptions.ThrottlingException, match="(?i)too many"):  # the regions' own 429
        client.converse(modelId=CLAUDE, messages=MESSAGES, inferenceConfig={"maxTokens": 1000})
    client.converse(modelId=CLAUDE, messages=MESSAGES, inferenceConfig={"maxTokens": 1000})  # within the limit

    assert [r.status for r in emu.requests] == [429, 429, 200]


# -- other real clients: the AWS CLI and curl --aws-sigv4 ---------------------------------------------


def aws_cli() -> str:
    from pathlib import Path
    import shutil

    beside_python = Path(sys.executable).with_name("aws")
    return str(beside_python) if beside_python.exists() else shutil.which("aws")


def test_aws_cli_with_a_virtual_key_and_with_a_wrong_secret(emu, authed_proxy):
    proxy = authed_proxy()
    env = {**os.environ, "HTTPS_PROXY": proxy.url, "AWS_CA_BUNDLE": proxy.ca_cert, "AWS_ACCESS_KEY_ID": VIRTUAL_KEY,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}
    args = [aws_cli(), "bedrock-runtime", "converse", "--model-id", CLAUDE, "--messages", json.dumps(MESSAGES)]

    good = subprocess.run(args, env={**env, "AWS_SECRET_ACCESS_KEY": VIRTUAL_SECRET}, capture_output=True, timeout=60)
    bad = subprocess.run(args, env={**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret-wrong-secret"}, capture_output=True, timeout=60)

    assert good.returncode == 0, good.stderr.decode()
    assert "Hello from" in json.loads(good.stdout)["output"]["message"]["content"][0]["text"]
    assert bad.returncode != 0 and b"(InvalidSignatureException)" in bad.stderr
    assert len(emu.requests) == 1
    assert [r["client_name"] for r in proxy.access_records()] == ["team-a", None]


def curl(proxy, secret: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--aws-sigv4", "aws:amz:us-east-1:bedrock", "--user", f"{VIRTUAL_KEY}:{secret}",
         "-H", "content-type: application/json", "-w", "\n%{http_code}", "-d", CONVERSE_BODY.decode(), *args],
        capture_output=True, timeout=60,
    )


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])  # over HTTP/2 the signed host is the :authority
def test_curl_aws_sigv4_with_a_virtual_key_through_https_proxy(emu, authed_proxy, http):
    proxy = authed_proxy()
    url = f"https://{BEDROCK_HOST}/model/{TITAN}/converse"

    good = curl(proxy, VIRTUAL_SECRET, http, "-x", proxy.url, "--cacert", proxy.ca_cert, url)
    bad = curl(proxy, "wrong-secret-wrong-secret", http, "-x", proxy.url, "--cacert", proxy.ca_cert, url)

    body, status = good.stdout.rsplit(b"\n", 1)
    assert status == b"200", good.stdout + good.stderr
    assert json.loads(body)["output"]["message"]["content"][0]["text"].startswith("Hello from")
    body, status = bad.stdout.rsplit(b"\n", 1)
    assert status == b"403" and b"does not match" in body
    assert len(emu.requests) == 1


def test_curl_aws_sigv4_with_a_virtual_key_in_reverse_mode(emu, authed_proxy):
    proxy = authed_proxy(mode=f"reverse:https://{BEDROCK_HOST}")

    good = curl(proxy, VIRTUAL_SECRET, f"{proxy.url}/model/{TITAN}/converse")
    bad = curl(proxy, "wrong-secret-wrong-secret", f"{proxy.url}/model/{TITAN}/converse")

    assert good.stdout.endswith(b"\n200"), good.stdout + good.stderr
    assert bad.stdout.endswith(b"\n403")
    assert [r.access_key_id for r in emu.requests] == [PROXY_KEY]


# -- who may connect: the loopback default, exposure only on purpose ----------------------------------


def seen_from(remote: str, proxy):
    """The proxy as a client on "another host" uses it: at this machine's non-loopback address."""
    from types import SimpleNamespace

    return SimpleNamespace(url=f"http://{remote}:{proxy.port}", ca_cert=proxy.ca_cert)


def start_console_script(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from bedrock_balancer.cli import main; main()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("listen", [["--set", "listen_host=0.0.0.0"], ["--listen-host", "0.0.0.0"], ["--listen-host", ""],
                                    ["--mode", "regular@0.0.0.0:0"]],
                         ids=["set-option", "flag", "every-interface", "mode-spec"])
def test_listening_beyond_loopback_without_authentication_stops_startup(emu, tmp_path, listen):
    config = write_config(tmp_path / "balancer.yaml", {"targets": targets_for(emu, ["us-east-1"])})

    process = start_console_script(["--set", f"bedrock_config={config}", "--set", f"confdir={tmp_path}", "-p", "0", *listen])
    output = process.communicate(timeout=30)[0]

    assert process.returncode == 1, output
    assert "without client authentication: anyone who can reach the proxy would spend its AWS credentials" in output
    assert "bedrock_allow_unauthenticated=true" in output and "clients or api_keys" in output


def test_without_authentication_startup_says_only_loopback_clients_are_accepted(emu, tmp_path):
    import threading

    config = write_config(tmp_path / "balancer.yaml", {"targets": targets_for(emu, ["us-east-1"])})
    process = start_console_script(["--set", f"bedrock_config={config}", "--set", f"confdir={tmp_path}", "-p", "0",
                                    "--listen-host", "127.0.0.1"])
    watchdog = threading.Timer(30, process.terminate)  # ends the read below if the line never comes
    watchdog.start()
    output = ""
    try:
        for line in process.stdout:  # the balancer says it once the proxy is up
            output += line
            if "bedrock-balancer: no client authentication" in line:
                break
    finally:
        watchdog.cancel()
        process.terminate()
        output += process.communicate(timeout=10)[0]

    assert "proxy listening at 127.0.0.1:" in output
    assert "no client authentication configured (clients, api_keys): accepting only clients on this machine (loopback)" in output


def test_exposed_without_authentication_only_with_the_explicit_option(emu, proxy_factory, client_via_proxy, tmp_path, monkeypatch):
    from mitmproxy import exceptions

    remote = local_non_loopback_address()
    decoy = Decoy(tmp_path / "decoy")
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])}, listen_host="0.0.0.0", bedrock_allow_unauthenticated=True)
    client = client_via_proxy(seen_from(remote, proxy))

    response = client.converse(modelId=CLAUDE, messages=MESSAGES)
    connect, _ = raw_request((remote, proxy.port), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", connect=f"127.0.0.1:{decoy.port}", source=remote)
    with pytest.raises(exceptions.OptionsError, match="refusing to listen on '0.0.0.0' without client authentication"):
        run_in_proxy(proxy, lambda: proxy.master.options.update(bedrock_allow_unauthenticated=False))

    assert "Hello from" in response["output"]["message"]["content"][0]["text"]
    assert proxy.access_records()[-1]["client"].startswith(f"{remote}:")
    assert (connect.status, connect.error_type) == (403, "AccessDeniedException")  # remote clients reach Bedrock only
    assert decoy.connections == 0


def test_with_authentication_remote_clients_must_authenticate_and_reach_only_bedrock(emu, authed_proxy, boto, tmp_path, monkeypatch):
    remote = local_non_loopback_address()
    decoy = Decoy(tmp_path / "decoy")
    proxy = authed_proxy(listen_host="0.0.0.0")
    address = (remote, proxy.port)

    served = boto(seen_from(remote, proxy)).converse(modelId=CLAUDE, messages=MESSAGES)
    with pytest.raises(ClientError) as raised:
        boto(seen_from(remote, proxy), config=BotoConfig(signature_version=UNSIGNED, retries={"total_max_attempts": 1})).converse(modelId=CLAUDE, messages=MESSAGES)
    own_request = signed_request("POST", f"127.0.0.1:{decoy.port}", CONVERSE_PATH, CONVERSE_BODY, key=VIRTUAL_KEY, secret=VIRTUAL_SECRET)
    tunnel, _ = raw_request(address, own_request, connect=f"127.0.0.1:{decoy.port}", source=remote)
    _, absolute = raw_request(address, signed_request("POST", f"127.0.0.1:{decoy.port}", CONVERSE_PATH, CONVERSE_BODY, key=VIRTUAL_KEY,
                                                      secret=VIRTUAL_SECRET, target=f"http://127.0.0.1:{decoy.port}{CONVERSE_PATH}"), source=remote)
    metadata, _ = raw_request(address, b"GET / HTTP/1.1\r\n\r\n", connect="169.254.169.254:80", source=remote)

    assert "Hello from" in served["output"]["message"]["content"][0]["text"]
    assert proxy.access_records()[0]["client"].startswith(f"{remote}:")
    assert error_of(raised) == (403, "MissingAuthenticationTokenException")
    assert [(r.status, r.error_type) for r in (tunnel, absolute, metadata)] == [(403, "AccessDeniedException")] * 3
    assert decoy.connections == 0
    assert len(emu.requests) == 1


def test_an_exposed_proxy_cannot_be_reconfigured_into_an_open_one(emu, authed_proxy, boto):
    from mitmproxy import exceptions

    from pathlib import Path

    remote = local_non_loopback_address()
    proxy = authed_proxy(listen_host="0.0.0.0")
    path = proxy.master.options.bedrock_config
    write_config(Path(path), {"targets": targets_for(emu, ["us-east-1"])})  # the operator edits the file: no clients

    with pytest.raises(exceptions.OptionsError, match="without client authentication"):
        run_in_proxy(proxy, lambda: proxy.master.options.update(bedrock_config=path))  # and reloads it
    with pytest.raises(ClientError) as raised:
        boto(seen_from(remote, proxy), config=BotoConfig(signature_version=UNSIGNED, retries={"total_max_attempts": 1})).converse(
            modelId=CLAUDE, messages=MESSAGES)

    assert proxy.balancer.config.authenticates_clients
    assert error_of(raised) == (403, "MissingAuthenticationTokenException")  # still authenticating
    assert emu.requests == []


# -- credentials only where they belong: attacks aimed at a decoy ----------------------------------------


@pytest.fixture
def decoy(tmp_path):
    server = Decoy(tmp_path / "decoy-certs")
    yield server
    server.close()


@pytest.fixture
def hostile_network(emu, authed_proxy, decoy):
    """An authenticating proxy on a network where every connection mitmproxy opens lands on the decoy
    (``ssl_insecure``: a certificate mismatch must not be what stops a leak)."""

    def start(**options):
        proxy = authed_proxy(ssl_insecure=True, **options)
        run_in_proxy(proxy, lambda: proxy.master.addons.add(RouteToDecoy(decoy, proxy.balancer.relay.address)))
        return proxy

    return start


def own_request(host: str, target: str | None = None, path: str = CONVERSE_PATH) -> bytes:
    """A Bedrock request the client signs validly with its own virtual key, for ``host``."""
    return signed_request("POST", host, path, CONVERSE_BODY, key=VIRTUAL_KEY, secret=VIRTUAL_SECRET, target=target)


LOOKALIKE = f"{BEDROCK_HOST}.example.net"
# Attacks whose bytes the proxy passes on as the client's own (a loopback client tunnelling elsewhere):
# the decoy sees the client's key (it was reachable), never the proxy's.
PASSED_THROUGH = {
    "absolute-url-to-another-host": lambda d: dict(request=own_request(f"127.0.0.1:{d.port}", f"http://127.0.0.1:{d.port}{CONVERSE_PATH}")),
    "absolute-url-to-a-lookalike-name": lambda d: dict(request=own_request(LOOKALIKE, f"http://{LOOKALIKE}{CONVERSE_PATH}")),
    "connect-to-another-host": lambda d: dict(request=own_request(f"127.0.0.1:{d.port}"), connect=f"127.0.0.1:{d.port}"),
    "connect-to-a-lookalike-name": lambda d: dict(request=own_request(LOOKALIKE), connect=f"{LOOKALIKE}:443"),
    "connect-to-a-name-ending-like-bedrock": lambda d: dict(request=own_request("evil" + BEDROCK_HOST), connect=f"evil{BEDROCK_HOST}:443"),
}


@pytest.mark.parametrize("bedrock_only", [True, False], ids=["bedrock_only", "intercept-all"])
@pytest.mark.parametrize("attack", PASSED_THROUGH)
def test_requests_for_other_hosts_never_carry_the_proxys_signature(emu, hostile_network, decoy, attack, bedrock_only):
    proxy = hostile_network(bedrock_only=bedrock_only)

    connect, response = raw_request(("127.0.0.1", proxy.port), **PASSED_THROUGH[attack](decoy))

    assert response is not None and response.json() == {"decoy": True}
    assert decoy.saw(f"Credential={VIRTUAL_KEY}/")  # the client's own signature, as the client sent it
    assert not decoy.saw(PROXY_KEY)
    assert emu.requests == []


# Attacks the proxy answers itself (or serves from a configured target): nothing reaches the decoy at all.
REFUSED_OR_SERVED = {
    "host-header-disagrees-with-connect": (
        lambda d: dict(request=own_request(f"127.0.0.1:{d.port}"), connect=f"{BEDROCK_HOST}:443", tls_host=BEDROCK_HOST),
        (400, "ValidationException"), 0),
    "host-header-disagrees-with-absolute-url": (
        lambda d: dict(request=own_request(f"127.0.0.1:{d.port}", f"http://{BEDROCK_HOST}{CONVERSE_PATH}")),
        (400, "ValidationException"), 0),
    "host-header-port-disagrees": (
        lambda d: dict(request=own_request(f"{BEDROCK_HOST}:{d.port}"), connect=f"{BEDROCK_HOST}:443", tls_host=BEDROCK_HOST),
        (400, "ValidationException"), 0),
    "userinfo-bedrock-at-decoy": (
        lambda d: dict(request=own_request(BEDROCK_HOST, f"http://{BEDROCK_HOST}@127.0.0.1:{d.port}{CONVERSE_PATH}")),
        (400, None), 0),
    "userinfo-decoy-at-bedrock": (
        lambda d: dict(request=own_request(BEDROCK_HOST, f"http://127.0.0.1:{d.port}@{BEDROCK_HOST}{CONVERSE_PATH}")),
        (400, None), 0),
    "connect-with-userinfo": (
        lambda d: dict(request=own_request(BEDROCK_HOST), connect=f"{BEDROCK_HOST}@127.0.0.1:{d.port}"),
        (400, None), 0),
    "bedrock-name-on-another-port": (
        lambda d: dict(request=own_request(f"{BEDROCK_HOST}:{d.port}"), connect=f"{BEDROCK_HOST}:{d.port}", tls_host=BEDROCK_HOST),
        (200, None), 1),
    "plain-http-absolute-bedrock-url": (
        lambda d: dict(request=own_request(BEDROCK_HOST, f"http://{BEDROCK_HOST}{CONVERSE_PATH}")),
        (200, None), 1),
    "bedrock-name-with-trailing-dot-and-capitals": (
        lambda d: dict(request=own_request("BEDROCK-RUNTIME.US-EAST-1.AMAZONAWS.COM."), connect="BEDROCK-RUNTIME.US-EAST-1.AMAZONAWS.COM.:443",
                       tls_host=BEDROCK_HOST),
        (200, None), 1),
}


@pytest.mark.parametrize("attack", REFUSED_OR_SERVED)
def test_bedrock_requests_are_signed_only_for_configured_targets(emu, hostile_network, decoy, attack):
    proxy = hostile_network()
    make, expected, upstream = REFUSED_OR_SERVED[attack]

    connect, response = raw_request(("127.0.0.1", proxy.port), ca_cert=proxy.ca_cert, **make(decoy))

    answer = response if response is not None else connect
    assert (answer.status, answer.error_type) == expected
    assert decoy.connections == 0
    assert len(emu.requests) == upstream and all(r.access_key_id == PROXY_KEY for r in emu.requests)


class Redirector:
    """A configured target that answers every request with a redirect to the decoy."""

    def __init__(self, decoy: Decoy, status: int = 307) -> None:
        import http.server
        import threading

        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                owner.requests.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(status)
                self.send_header("Location", f"http://127.0.0.1:{decoy.port}{self.path}")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.requests: list[dict] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("status", [301, 307, 308])
def test_redirects_from_upstream_are_not_followed(emu, authed_proxy, boto, decoy, status):
    redirector = Redirector(decoy, status)
    try:
        config = auth_config(emu)
        config["targets"] = [{"region": "us-east-1", "endpoint_url": redirector.url, "profile": "proxy"}]
        client = boto(authed_proxy(config))

        with pytest.raises(ClientError) as raised:
            client.converse(modelId=CLAUDE, messages=MESSAGES)
        stream = client.converse_stream  # the streaming path goes through mitmproxy to the relay: same rule
        with pytest.raises(ClientError) as raised_stream:
            stream(modelId=CLAUDE, messages=MESSAGES)
    finally:
        redirector.close()

    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert raised_stream.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert raised.value.response["ResponseMetadata"]["HTTPHeaders"]["location"].startswith(f"http://127.0.0.1:{decoy.port}/")
    assert len(redirector.requests) == 2 and all(f"Credential={PROXY_KEY}/" in r["authorization"] for r in redirector.requests)
    assert decoy.connections == 0


def test_client_credentials_are_never_forwarded(emu, proxy_factory, monkeypatch):
    """Without client authentication too: a loopback client's keys, session token and API key stay at the proxy."""
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])})
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("AWS_CA_BUNDLE", proxy.ca_cert)
    token = "FwoGZXIvYXdzEXAMPLESESSIONTOKEN"
    sigv4_client = boto3.client("bedrock-runtime", region_name="us-east-1", aws_access_key_id=CLIENT_KEY,
                                aws_secret_access_key=CLIENT_SECRET, aws_session_token=token, config=NO_RETRIES)
    sigv4_client.converse(modelId=CLAUDE, messages=MESSAGES)
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", API_KEY)
    boto3.client("bedrock-runtime", region_name="us-east-1", config=NO_RETRIES).converse(modelId=CLAUDE, messages=MESSAGES)
    query = f"?X-Amz-Credential={CLIENT_KEY}%2F20250101%2Fus-east-1%2Fbedrock%2Faws4_request&X-Amz-Signature={'0' * 64}"
    _, presigned = raw_request(("127.0.0.1", proxy.port), own_request(BEDROCK_HOST, path=CONVERSE_PATH + query),
                               connect=f"{BEDROCK_HOST}:443", tls_host=BEDROCK_HOST, ca_cert=proxy.ca_cert)

    assert (presigned.status, presigned.error_type) == (400, "ValidationException")
    assert "query string" in presigned.json()["message"]
    assert len(emu.requests) == 2
    for recorded in emu.requests:
        assert recorded.access_key_id == PROXY_KEY and recorded.auth_method == "sigv4"
        sent = repr(recorded.headers) + recorded.raw_path
        assert CLIENT_KEY not in sent and token not in sent and API_KEY not in sent and "Bearer" not in sent


# -- the proxy's own listeners are not destinations (CVE-2025-23217) --------------------------------------


class FakeWebUI:
    """Declares mitmweb's options (web_host, web_port) the way mitmweb does; the decoy plays the web UI."""

    def load(self, loader) -> None:
        loader.add_option("web_host", str, "127.0.0.1", "mitmweb's address")
        loader.add_option("web_port", int, 8081, "mitmweb's port")


def test_the_web_ui_and_the_proxys_own_listeners_are_unreachable_through_the_proxy(emu, proxy_factory, decoy):
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])})

    def install():
        proxy.master.addons.add(FakeWebUI())
        proxy.master.options.update(web_port=decoy.port)

    run_in_proxy(proxy, install)
    relay_port = proxy.balancer.relay.address[1]
    remote = local_non_loopback_address()
    web = decoy.port
    attempts = {
        "absolute-url": dict(request=b"GET http://127.0.0.1:%d/flows HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (web, web)),
        "absolute-url-localhost": dict(request=b"GET http://localhost:%d/flows HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % (web, web)),
        "absolute-url-ipv6": dict(request=b"GET http://[::1]:%d/flows HTTP/1.1\r\nHost: [::1]:%d\r\n\r\n" % (web, web)),
        "absolute-url-this-hosts-address": dict(request=b"GET http://%s:%d/ HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (remote.encode(), web, remote.encode(), web)),
        "absolute-url-short-form-ip": dict(request=b"GET http://127.1:%d/flows HTTP/1.1\r\nHost: 127.1:%d\r\n\r\n" % (web, web)),
        "connect": dict(request=b"GET /flows HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", connect=f"127.0.0.1:{web}"),
        "connect-localhost": dict(request=b"GET /flows HTTP/1.1\r\nHost: localhost\r\n\r\n", connect=f"localhost:{web}"),
        "connect-unspecified": dict(request=b"GET /flows HTTP/1.1\r\nHost: 0.0.0.0\r\n\r\n", connect=f"0.0.0.0:{web}"),
        "the-proxy-itself": dict(request=b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (proxy.port, proxy.port)),
        "the-relay": dict(request=b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", connect=f"127.0.0.1:{relay_port}"),
    }

    answers = {}
    for name, attempt in attempts.items():
        connect, response = raw_request(("127.0.0.1", proxy.port), **attempt)
        answer = response if response is not None else connect
        answers[name] = (answer.status, answer.error_type)

    # Refused with a Bedrock-format 403 where the name shows it; a name that only resolves to this machine
    # is refused by the connection gate (mitmproxy's 502 "connection killed").
    assert answers == {name: (403, "AccessDeniedException") for name in attempts} | {"absolute-url-short-form-ip": (502, None)}
    assert decoy.connections == 0


# -- hostile and malformed input: a Bedrock-format 4xx, nothing upstream, and the proxy carries on ----------


def signed(path: str = CONVERSE_PATH, body: bytes = CONVERSE_BODY, method: str = "POST", headers=(), **kwargs) -> bytes:
    return signed_request(method, BEDROCK_HOST, path, body, key=VIRTUAL_KEY, secret=VIRTUAL_SECRET, extra_headers=list(headers), **kwargs)


def unsigned(lines: list[str], body: bytes = b"") -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def with_authorization(value: str) -> bytes:
    return unsigned([f"POST {CONVERSE_PATH} HTTP/1.1", f"Host: {BEDROCK_HOST}", f"Authorization: {value}",
                     "X-Amz-Date: 20250101T000000Z", f"Content-Length: {len(CONVERSE_BODY)}"], CONVERSE_BODY)


def duplicated(header: str) -> bytes:
    """A validly signed request with one header repeated after the signature."""
    request = signed()
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    original = next(line for line in lines if line.lower().startswith(header.lower().encode() + b":"))
    return b"\r\n".join(lines + [original]) + b"\r\n\r\n" + body


HOSTILE = {
    # malformed Authorization
    "authorization-algorithm-only": (with_authorization("AWS4-HMAC-SHA256"), 400, "IncompleteSignatureException"),
    "authorization-missing-fields": (with_authorization(f"AWS4-HMAC-SHA256 Credential={VIRTUAL_KEY}/20250101/us-east-1/bedrock/aws4_request"), 400, "IncompleteSignatureException"),
    "authorization-empty-fields": (with_authorization("AWS4-HMAC-SHA256 Credential=, SignedHeaders=, Signature="), 400, "IncompleteSignatureException"),
    "authorization-bad-scope": (with_authorization(f"AWS4-HMAC-SHA256 Credential={VIRTUAL_KEY}/yesterday, SignedHeaders=host, Signature={'0' * 64}"), 400, "IncompleteSignatureException"),
    "authorization-bad-signature": (with_authorization(f"AWS4-HMAC-SHA256 Credential={VIRTUAL_KEY}/20250101/us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature=xyz"), 400, "IncompleteSignatureException"),
    "authorization-basic": (with_authorization("Basic dXNlcjpwYXNzd29yZA=="), 400, "IncompleteSignatureException"),
    "authorization-binary": (with_authorization("AWS4-HMAC-SHA256 Credential=\xe9\xff/\x7e, Signature=\xa0"), 400, "IncompleteSignatureException"),
    "authorization-empty-bearer": (with_authorization("Bearer "), 403, "AccessDeniedException"),
    "two-authorization-headers": (duplicated("authorization"), 400, "IncompleteSignatureException"),
    # ambiguous headers
    "two-host-headers": (duplicated("host"), 400, "ValidationException"),
    "two-date-headers": (duplicated("x-amz-date"), 400, "ValidationException"),
    "two-content-types": (duplicated("content-type"), 400, "ValidationException"),
    "conflicting-content-lengths": (unsigned([f"POST {CONVERSE_PATH} HTTP/1.1", f"Host: {BEDROCK_HOST}", "Content-Length: 2", "Content-Length: 3"], b"{}"), 400, None),
    "content-length-and-chunked": (unsigned([f"POST {CONVERSE_PATH} HTTP/1.1", f"Host: {BEDROCK_HOST}", "Content-Length: 2", "Transfer-Encoding: chunked"], b"2\r\n{}\r\n0\r\n\r\n"), 400, None),
    "control-character-in-a-header": (signed(headers=[("x-note", "a\x01b")]), 400, "ValidationException"),
    # unknown operations (validly signed: authentication comes first, as at AWS)
    "unknown-action": (signed(f"/model/{TITAN}/explode"), 404, "UnknownOperationException"),
    "unknown-path": (signed("/admin/config"), 404, "UnknownOperationException"),
    "get-a-post-operation": (signed(CONVERSE_PATH, b"", method="GET"), 404, "UnknownOperationException"),
    "delete-async-invoke": (signed("/async-invoke", b"", method="DELETE"), 404, "UnknownOperationException"),
    # model ids
    "encoded-traversal": (signed("/model/..%2F..%2Fadmin/converse"), 400, "ValidationException"),
    "raw-traversal": (signed("/model/a/../../admin/x/converse"), 400, "ValidationException"),
    "nul-in-model-id": (signed("/model/amazon.titan%00/converse"), 400, "ValidationException"),
    "crlf-in-model-id": (signed("/model/amazon.titan%0D%0AX-Injected:%201/converse"), 400, "ValidationException"),
    "non-ascii-in-path": (signed("/model/amazon.caf\xe9/converse"), 400, "ValidationException"),
    # bodies
    "not-json": (signed(body=b"hello, bedrock"), 400, "ValidationException"),
    "json-but-not-an-object": (signed(body=b"[1, 2, 3]"), 400, "ValidationException"),
    "invalid-utf8": (signed(body=b'{"messages": "\xff\xfe"}'), 400, "ValidationException"),
    "deeply-nested": (signed(body=b'{"a":' * 5000 + b"1" + b"}" * 5000), 400, "ValidationException"),
    "invoke-not-json": (signed(f"/model/{TITAN}/invoke", b"{not json"), 400, "ValidationException"),
    "huge-declared-length": (unsigned([f"POST {CONVERSE_PATH} HTTP/1.1", f"Host: {BEDROCK_HOST}", "Content-Length: 10000000000"]), 413, None),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_input_gets_a_4xx_and_nothing_goes_upstream(emu, authed_proxy, case):
    proxy = authed_proxy()
    request, status, error_type = HOSTILE[case]
    tunnel = dict(connect=f"{BEDROCK_HOST}:443", tls_host=BEDROCK_HOST, ca_cert=proxy.ca_cert)

    _, response = raw_request(("127.0.0.1", proxy.port), request, **tunnel)
    _, afterwards = raw_request(("127.0.0.1", proxy.port), signed(), **tunnel)

    assert (response.status, response.error_type) == (status, error_type), response.body
    if error_type:
        assert response.headers["x-bedrock-balancer-error"] == "true" and "message" in response.json()
    assert afterwards.status == 200  # the proxy carries on
    assert len(emu.requests) == 1


def test_body_over_the_limit_is_413_and_boto3_says_so(emu, authed_proxy, boto):
    proxy = authed_proxy(bedrock_max_body=4096)
    client = boto(proxy)

    with pytest.raises(ClientError) as raised:
        client.converse(modelId=CLAUDE, messages=[{"role": "user", "content": [{"text": "x" * 5000}]}])
    client.converse(modelId=CLAUDE, messages=MESSAGES)

    assert error_of(raised) == (413, "RequestEntityTooLargeException")
    assert "the limit is 4096 bytes (option bedrock_max_body)" in raised.value.response["Error"]["Message"]
    assert len(emu.requests) == 1


# -- secrets never in logs -------------------------------------------------------------------------------


def test_secrets_tokens_and_signatures_never_reach_the_logs(emu, authed_proxy, boto, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    proxy = authed_proxy(bedrock_debug_signatures=True)
    tunnel = dict(connect=f"{BEDROCK_HOST}:443", tls_host=BEDROCK_HOST, ca_cert=proxy.ca_cert)
    client_signatures = []
    for secret in (VIRTUAL_SECRET, "a-wrong-secret-for-team-a-000"):
        request = signed_request("POST", BEDROCK_HOST, CONVERSE_PATH, CONVERSE_BODY, key=VIRTUAL_KEY, secret=secret)
        client_signatures.append(re.search(rb"Signature=([0-9a-f]{64})", request).group(1).decode())
        raw_request(("127.0.0.1", proxy.port), request, **tunnel)
    token_request = signed(headers=[("x-amz-security-token", "FwoGZXIvYXdzSECRETSESSIONTOKEN")])
    raw_request(("127.0.0.1", proxy.port), token_request, **tunnel)
    raw_request(("127.0.0.1", proxy.port), with_authorization(f"Bearer {API_KEY}"), **tunnel)
    raw_request(("127.0.0.1", proxy.port), with_authorization("Bearer ABSKaW52YWxpZC1idXQtc2VjcmV0LWtleQ=="), **tunnel)
    boto(proxy, key=OTHER_VIRTUAL_KEY, secret=OTHER_VIRTUAL_SECRET).converse(modelId=CLAUDE, messages=MESSAGES)

    upstream_signatures = [re.search(r"Signature=([0-9a-f]{64})", r.header("authorization")).group(1) for r in emu.requests]
    # Everything the proxy logged, at every level (its thread, its workers), not the test's own botocore debug logs.
    proxy_records = [r for r in caplog.records if r.threadName != "MainThread" and not r.name.startswith("bedrock_balancer.emulator")]
    logs = "\n".join(caplog.handler.format(r) for r in proxy_records) + proxy.access_log.read_text()
    assert any("bedrock Converse" in r.getMessage() for r in proxy_records)
    assert len(upstream_signatures) == 3 and len(proxy.access_records()) == 6
    for secret in (VIRTUAL_SECRET, OTHER_VIRTUAL_SECRET, PROXY_SECRET, API_KEY, "ABSKaW52YWxpZC1idXQtc2VjcmV0LWtleQ==",
                   "FwoGZXIvYXdzSECRETSESSIONTOKEN", *client_signatures, *upstream_signatures):
        assert secret not in logs
    assert not re.search(r"Signature=[0-9a-f]{64}", logs)
    assert [r["client_name"] for r in proxy.access_records()] == ["team-a", None, None, "team-c", None, "team-b"]


def test_flows_shown_in_mitmweb_keep_no_client_credentials(emu, authed_proxy):
    from mitmproxy import http as mhttp

    shown: list[str] = []

    class Recorder:
        def response(self, flow: mhttp.HTTPFlow) -> None:
            shown.append(repr(list(flow.request.headers.items(multi=True))))

    proxy = authed_proxy()
    run_in_proxy(proxy, lambda: proxy.master.addons.add(Recorder()))
    tunnel = dict(connect=f"{BEDROCK_HOST}:443", tls_host=BEDROCK_HOST, ca_cert=proxy.ca_cert)
    requests = [
        signed(),  # served
        signed_request("POST", BEDROCK_HOST, CONVERSE_PATH, CONVERSE_BODY, key=VIRTUAL_KEY, secret="a-wrong-secret-for-team-a-000"),
        signed(headers=[("x-amz-security-token", "FwoGZXIvYXdzSECRETSESSIONTOKEN")]),
        with_authorization(f"Bearer {API_KEY}"),
    ]
    signatures = [re.search(rb"Signature=([0-9a-f]{64})", r).group(1).decode() for r in requests[:3]]
    statuses = [raw_request(("127.0.0.1", proxy.port), r, **tunnel)[1].status for r in requests]

    assert statuses == [200, 403, 403, 200] and len(shown) == 4
    for text in shown:
        assert API_KEY not in text and "FwoGZXIvYXdzSECRETSESSIONTOKEN" not in text
        assert not any(signature in text for signature in signatures)


# -- refusals and a proxy without targets keep and forward no client credentials ---------------------------


def test_a_refused_request_keeps_no_client_credentials_in_its_flow(emu, proxy_factory):
    # An app whose endpoint_url is a regular-mode proxy addresses the proxy's own listener: refused, and the
    # flow mitmweb shows and -w saves keeps neither its signature nor its session token.
    from mitmproxy import http as mhttp

    shown: list[str] = []

    class Recorder:
        def response(self, flow: mhttp.HTTPFlow) -> None:
            shown.append(repr(list(flow.request.headers.items(multi=True))))

    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])})
    run_in_proxy(proxy, lambda: proxy.master.addons.add(Recorder()))
    own = f"127.0.0.1:{proxy.port}"
    request = signed_request("POST", own, CONVERSE_PATH, CONVERSE_BODY, key=CLIENT_KEY, secret=CLIENT_SECRET,
                             target=f"http://{own}{CONVERSE_PATH}", extra_headers=[("x-amz-security-token", "FwoGZXIvYXdzAPPSESSIONTOKEN")])
    signature = re.search(rb"Signature=([0-9a-f]{64})", request).group(1).decode()

    _, answer = raw_request(("127.0.0.1", proxy.port), request)

    assert (answer.status, answer.error_type) == (403, "AccessDeniedException")
    (text,) = shown
    assert "FwoGZXIvYXdzAPPSESSIONTOKEN" not in text and signature not in text and "<redacted>" in text


def test_without_targets_a_bedrock_request_is_answered_by_the_proxy_never_forwarded(emu, proxy_factory, client_via_proxy):
    # A mistyped option (bedrock_regoins) leaves the proxy without targets: it must not pass the client's own
    # signed request through to AWS, but say what is missing.
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])}, mode=f"reverse:{emu.endpoint_url('us-east-1')}", bedrock_config="")
    client = boto3.client("bedrock-runtime", region_name="us-east-1", endpoint_url=proxy.url, aws_access_key_id=PROXY_KEY,
                          aws_secret_access_key=PROXY_SECRET, config=BotoConfig(retries={"total_max_attempts": 1}))

    with pytest.raises(ClientError) as raised:
        client.converse(modelId=CLAUDE, messages=MESSAGES)

    assert error_of(raised) == (503, "ServiceUnavailableException")
    assert "no targets configured" in raised.value.response["Error"]["Message"]
    assert emu.requests == []


def test_a_proxy_started_without_targets_serves_them_once_they_are_set(emu, proxy_factory, tmp_path):
    # mitmweb -s addons/balancer.py, then bedrock_config set in its options editor.
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])}, mode=f"reverse:{emu.endpoint_url('us-east-1')}", bedrock_config="")
    config = write_config(tmp_path / "late.yaml", {"targets": targets_for(emu, ["us-west-2"])})

    run_in_proxy(proxy, lambda: proxy.master.options.update(bedrock_config=str(config)))
    wait_for(lambda: proxy.balancer.relay is not None and proxy.balancer.relay.address, 10, "the relay")
    client = boto3.client("bedrock-runtime", region_name="us-east-1", endpoint_url=proxy.url, aws_access_key_id=CLIENT_KEY,
                          aws_secret_access_key=CLIENT_SECRET, config=BotoConfig(retries={"total_max_attempts": 1}))
    answer = client.converse(modelId=CLAUDE, messages=MESSAGES)
    events = list(client.converse_stream(modelId=CLAUDE, messages=MESSAGES)["stream"])

    assert answer["ResponseMetadata"]["HTTPHeaders"]["x-bedrock-balancer-region"] == "us-west-2"
    assert "metadata" in events[-1]
    assert [(r.region, r.access_key_id) for r in emu.requests] == [("us-west-2", PROXY_KEY)] * 2


def test_the_admin_listener_on_a_port_the_system_picks_is_unreachable_through_the_proxy(emu, proxy_factory):
    proxy = proxy_factory({"targets": targets_for(emu, ["us-east-1"])}, bedrock_admin="127.0.0.1:0")
    admin_port = proxy.balancer.admin.address[1]

    _, answer = raw_request(("127.0.0.1", proxy.port), b"GET http://127.0.0.1:%d/status HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (admin_port, admin_port))

    assert (answer.status, answer.error_type) == (403, "AccessDeniedException")


def test_a_running_proxy_takes_new_clients_but_refuses_new_targets(emu, authed_proxy, boto, tmp_path):
    # The relay was built for the targets the proxy started with: a config that changes them (from mitmweb's
    # options editor, say) is refused, naming what needs a restart, and the proxy carries on as it was. One
    # that changes only the clients takes effect at once.
    from pathlib import Path

    from mitmproxy import exceptions

    proxy = authed_proxy()
    path = proxy.master.options.bedrock_config
    config = yaml.safe_load(Path(path).read_text())
    retargeted = tmp_path / "retargeted.yaml"
    write_config(retargeted, {**config, "targets": targets_for(emu, ["us-west-2"])})
    with pytest.raises(exceptions.OptionsError, match="restart it"):
        run_in_proxy(proxy, lambda: proxy.master.options.update(bedrock_config=str(retargeted)))
    served = boto(proxy).converse(modelId=CLAUDE, messages=MESSAGES)
    assert served["ResponseMetadata"]["HTTPHeaders"]["x-bedrock-balancer-region"] == "us-east-1"

    write_config(Path(path), {**config, "clients": [c for c in config["clients"] if c["access_key_id"] != VIRTUAL_KEY]})
    new_log = tmp_path / "new-access.jsonl"
    run_in_proxy(proxy, lambda: proxy.master.options.update(bedrock_config=path, bedrock_access_log=str(new_log)))
    with pytest.raises(ClientError) as raised:
        boto(proxy).converse(modelId=CLAUDE, messages=MESSAGES)

    assert error_of(raised)[1] == "UnrecognizedClientException"  # team A's key is gone
    assert [r.region for r in emu.requests] == ["us-east-1"]
    run_in_proxy(proxy, lambda: proxy.balancer.access_log.flush())
    assert json.loads(new_log.read_text())["error"].startswith("UnrecognizedClientException")  # the same update's other option
